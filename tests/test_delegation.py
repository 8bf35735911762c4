"""Delegation fix-ups: one Vulkan partition, no CPU kernels, only what the runtime has."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
from executorch.exir import EdgeCompileConfig, to_edge
from torch import nn

from qlower import delegation
from qlower.hf import conv1d_to_linear
from qlower.lower_speedups import PATTERN_FAMILY_OPS, program_ops, vulkan_patterns_once
from qlower.runtime_caps import summarize_pte

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
# fp32 graphs: the rewrites are exact up to float reassociation.
ATOL = 1e-5

logging.getLogger("").setLevel(logging.WARNING)  # the partitioner logs every op


def edge_program(model, inputs):
    ep = torch.export.export(model, inputs)
    return to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))


def lower(edge):
    with vulkan_patterns_once(edge.exported_program()):
        return summarize_pte(edge.to_backend(VulkanPartitioner()).to_executorch().buffer)


def targets(ep):
    return {getattr(n.target, "__name__", str(n.target)) for n in ep.graph.nodes if n.op == "call_function"}


def assert_fully_delegated(model, inputs, quantize=False):
    if quantize:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        quantize_(model, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    with torch.no_grad():
        expected = model(*inputs)
    edge = edge_program(model, inputs)
    ep = edge.exported_program()
    delegation.run_delegation_passes(ep)
    assert delegation.cpu_notes(ep) == []
    with torch.no_grad():
        got = ep.module()(*inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)
    summary = lower(edge)
    assert summary.partitions == 1
    assert summary.cpu_kernels == {}
    assert summary.problems == []
    return ep


# ---------------------------------------------------------------------------
# models


class Attention(nn.Module):
    """SDPA with is_causal: arange/le/logical_* mask, -inf guard, mul.Scalar."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class TinyDecoder(nn.Module):
    def __init__(self, vocab=256, dim=64, layers=1):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Attention(dim) for _ in range(layers))
        self.mlp = nn.Sequential(nn.Linear(dim, 128, bias=False), nn.SiLU(), nn.Linear(128, dim, bias=False))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x + self.mlp(x))


def tokens(n=7, vocab=256):
    return (torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0)),)


# ---------------------------------------------------------------------------
# whole models


def test_llama_style_decoder_one_partition_fp32():
    torch.manual_seed(0)
    ep = assert_fully_delegated(TinyDecoder().eval(), tokens())
    assert not targets(ep) & {"aten.logical_not.default", "aten.any.dim", "aten.mul.Scalar",
                              "aten.scalar_tensor.default", "aten.arange.start_step"}


def test_llama_style_decoder_one_partition_quantized():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantize_(model, Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    edge = edge_program(model, tokens())
    delegation.run_delegation_passes(edge.exported_program())
    summary = lower(edge)
    assert (summary.partitions, summary.cpu_kernels, summary.problems) == (1, {}, [])


# Linear projections each recipe has (2 blocks): Llama/Qwen2 7 per block + LM
# head; GPT-2 4 per block (its Conv1D projections) + LM head.
# 2 blocks: Q/K/V are one op (Llama, Qwen2 with biases); GPT-2's c_attn already is.
HF_FUSED_LINEARS = {"hf_llama": 11, "hf_qwen2": 11, "hf_gpt2": 9}


@pytest.mark.parametrize("name", sorted(HF_FUSED_LINEARS))
def test_hf_recipe_one_partition_and_verifies(name):
    pytest.importorskip("transformers")
    import qlower

    # verify=2: the example inputs and a random batch, at the default thresholds.
    summary = qlower.export(os.path.join(EXAMPLES, f"{name}.py"), None, verify=2)
    assert (summary["vulkan_partitions"], summary["cpu_ops"], summary["runtime_problems"]) == (1, {}, [])
    assert summary["fused_ops"]["linear_dq8ca_q4gsw"] == HF_FUSED_LINEARS[name]
    assert summary["layers"]["unfused"] == 0
    assert summary["verification"]["passed"]


# ---------------------------------------------------------------------------
# single passes


def test_fold_keeps_parameters_and_folds_mask():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 5))

        def forward(self, x):
            i = torch.arange(5)
            mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
            return (x @ self.w.t()) + mask

    x = torch.randn(5, 5)
    model = M()
    edge = edge_program(model, (x,))
    ep = edge.exported_program()
    assert delegation.fold_constant_subgraphs(ep)
    ops = targets(ep)
    assert "aten.arange.start_step" not in ops and "aten.where.self" not in ops
    assert "aten.permute_copy.default" in ops  # parameter transpose left for linear fusion
    torch.testing.assert_close(ep.module()(x), model(x))


def test_fold_computed_norm_weight_into_a_constant():
    """Gemma's RMSNorm scales by ``1 + weight``: folded, so ET-VK's rms_norm gets the constant it prepacks."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8))
            self.proj = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return (x * (1.0 + self.weight)) @ self.proj.t()

    x = torch.randn(2, 8)
    model = M()
    ep = edge_program(model, (x,)).exported_program()
    assert delegation.fold_constant_subgraphs(ep)
    muls = [n for n in ep.graph.nodes if n.op == "call_function" and "mul" in str(n.target)]
    assert muls and all(a.op == "placeholder" for a in muls[0].all_input_nodes)  # 1 + w is a constant now
    assert "aten.permute_copy.default" in targets(ep)  # the matrix is not folded
    torch.testing.assert_close(ep.module()(x), model(x))


def test_fold_inverse_permutes_and_dedupe_copies():
    class M(nn.Module):
        def forward(self, x, c):
            y = x.transpose(1, 2).transpose(1, 2) + 1
            return y * c[0] + c[0]

    x, c = torch.randn(1, 3, 4, 5), torch.randn(2, 5)
    model = M()
    ep = edge_program(model, (x, c)).exported_program()
    assert delegation.fold_inverse_permutes(ep)
    delegation.dedupe_copies(ep)  # (the exporter may have merged the two selects already)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not any("permute" in o for o in ops)
    assert sum("select" in o for o in ops) == 1
    torch.testing.assert_close(ep.module()(x, c), model(x, c))


def test_split_becomes_slices():
    class M(nn.Module):
        def forward(self, x):
            a, b, c = x.split([3, 5, 4], dim=-1)
            return a.sum(-1) + b.sum(-1) + c[..., :2].sum(-1)

    x = torch.randn(2, 6, 12)
    model = M()
    ep = edge_program(model, (x,)).exported_program()
    assert "aten.split_with_sizes_copy.default" in targets(ep)
    assert delegation.split_to_slices(ep)
    assert "aten.split_with_sizes_copy.default" not in targets(ep)
    torch.testing.assert_close(ep.module()(x), model(x))


def test_softmax_guard_with_dynamic_mask_uses_amax():
    class M(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q = k = v = torch.randn(1, 2, 4, 8)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2, :] = float("-inf")  # a fully masked row: the guard makes it 0
    inputs = (q, k, v, mask)
    expected = M()(*inputs)
    ep = edge_program(M(), inputs).exported_program()
    if "aten.logical_not.default" not in targets(ep):
        pytest.skip("this torch does not emit the fully-masked-row guard for float masks")
    assert delegation.rewrite_softmax_guard(ep)
    ops = targets(ep)
    assert "aten.amax.default" in ops
    assert not ops & {"aten.logical_not.default", "aten.any.dim"}
    got = ep.module()(*inputs)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.all(got[..., 2, :] == 0)


def test_scalar_ops_become_tensor_ops():
    class M(nn.Module):
        def forward(self, x):
            return torch.ops.aten.mul.Scalar(x, 0.25) + 1

    x = torch.randn(3, 5)
    ep = edge_program(M(), (x,)).exported_program()
    assert "aten.mul.Scalar" in targets(ep)
    assert delegation.scalar_ops_to_tensor(ep)
    assert "aten.mul.Scalar" not in targets(ep)
    torch.testing.assert_close(ep.module()(x), x * 0.25 + 1)


def test_int_compare_moves_to_float():
    class M(nn.Module):
        def forward(self, a, b):
            return torch.where(a == b, 1.0, 0.0)

    a = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    b = torch.tensor([[1, 0, 3]], dtype=torch.int32)
    ep = edge_program(M(), (a, b)).exported_program()
    assert delegation.int_compare_to_float(ep)
    eq = next(n for n in ep.graph.nodes if getattr(n.target, "__name__", "") == "aten.eq.Tensor")
    assert all(arg.meta["val"].dtype == torch.float32 for arg in eq.args)
    torch.testing.assert_close(ep.module()(a, b), torch.tensor([[1.0, 0.0, 1.0]]))


def test_passes_are_idempotent():
    torch.manual_seed(0)
    ep = edge_program(TinyDecoder().eval(), tokens()).exported_program()
    assert delegation.run_delegation_passes(ep)
    assert delegation.run_delegation_passes(ep) == []


# ---------------------------------------------------------------------------
# GPT-2 Conv1D


def test_conv1d_to_linear_same_math():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 5), nn.ReLU(), Conv1D(3, 12))
    x = torch.randn(2, 7, 5)
    expected = model(x)
    assert conv1d_to_linear(model) == 2
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2))
    torch.testing.assert_close(model(x), expected)


# ---------------------------------------------------------------------------
# pattern graphs built once


def test_pattern_family_ops_are_in_every_pattern_graph():
    from executorch.backends.vulkan.patterns import fusable_patterns

    for family, needs in PATTERN_FAMILY_OPS.items():
        for graph in fusable_patterns[family].get_graphs_fn():
            ops = {getattr(n.target, "__name__", str(n.target))
                   for n in graph.graph.nodes if n.op == "call_function"}
            assert needs <= ops, family


def test_vulkan_patterns_once_prunes_and_restores():
    from executorch.backends.vulkan.patterns import fusable_patterns

    before = {k: e.get_graphs_fn for k, e in fusable_patterns.items()}
    ep = edge_program(nn.Linear(8, 8), (torch.randn(2, 8),)).exported_program()
    assert "aten.neg.default" not in program_ops(ep)
    with vulkan_patterns_once(ep):
        assert fusable_patterns["hf_rope"].get_graphs_fn() == []
    assert {k: e.get_graphs_fn for k, e in fusable_patterns.items()} == before


# ---------------------------------------------------------------------------
# the bundled examples through qlower's own stages


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny_llama"])
def test_bundled_example_one_partition(name, request):
    import qlower

    path = request.getfixturevalue("tiny_llama") if name == "tiny_llama" else os.path.join(EXAMPLES, f"{name}.py")
    summary = qlower.export(path, None)
    assert summary["cpu_notes"] == []
    assert (summary["vulkan_partitions"], summary["cpu_ops"], summary["runtime_problems"]) == (1, {}, [])
