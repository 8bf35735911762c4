"""The to_edge speed-up builds exactly the edge program ExecuTorch builds."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
from executorch.exir import EdgeCompileConfig, to_edge
from executorch.exir.program._program import _gen_edge_manager_for_partitioners
from torch import nn

from qlower.lower_speedups import edge_passes_merged, merge_edge_passes, to_edge_for_partitioner

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
logging.getLogger("").setLevel(logging.WARNING)


class MixedOps(nn.Module):
    """Every merged pass has work here: views, t(), Python scalars, int + float,
    a memory-format copy, a symbolic size used as a tensor."""

    def forward(self, x, idx):
        y = x.t().reshape(-1, 4) * 2 + idx.shape[0]
        y = y + idx.sum()  # int64 tensor + float tensor
        y = y.contiguous(memory_format=torch.contiguous_format).to(torch.float32)
        return y.transpose(0, 1).unsqueeze(0), torch.ops.aten.scalar_tensor(x.shape[0])


def described(edge) -> list[tuple]:
    ep = edge.exported_program()
    nodes = [
        (n.name, n.op, str(n.target), str(n.args), str(n.kwargs),
         repr(getattr(n.meta.get("val"), "shape", n.meta.get("val"))),
         str(getattr(n.meta.get("val"), "dtype", None)), n.meta.get("debug_handle"))
        for n in ep.graph.nodes
    ]
    return [ep.graph_module.code, str(ep.graph_signature), sorted(ep.state_dict), sorted(ep.constants), *nodes]


def load(example):
    from qlower.loader import load_model

    loaded = load_model(os.path.join(EXAMPLES, example))
    return loaded.module, tuple(loaded.example_inputs)


CASES = {
    "mixed": lambda: (MixedOps(), (torch.randn(4, 6), torch.arange(5))),
    "mixed_dynamic": lambda: (MixedOps(), (torch.randn(4, 6), torch.arange(5))),
    "cnn": lambda: load("cnn.py"),
    "mlp_int4": lambda: quantized(*load("mlp.py")),
}


def quantized(model, inputs):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    return model, inputs


def exported(case):
    torch.manual_seed(0)
    model, inputs = CASES[case]()
    dynamic = None
    if case == "mixed_dynamic":
        dynamic = ({1: torch.export.Dim("n", min=2, max=64)}, {0: torch.export.Dim("m", min=2, max=64)})
    return torch.export.export(model.eval(), inputs, dynamic_shapes=dynamic, strict=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_edge_passes_build_executorchs_edge_program(case):
    ep = exported(case)
    config = EdgeCompileConfig(_check_ir_validity=False)
    stock = to_edge(ep, compile_config=config)
    with edge_passes_merged():
        ours = to_edge(ep, compile_config=config)
    assert described(ours) == described(stock)


def test_to_edge_for_partitioner_matches_executorch():
    from tests.test_delegation import TinyDecoder, tokens

    torch.manual_seed(0)
    ep = torch.export.export(TinyDecoder().eval(), tokens(), strict=False)
    ours = to_edge_for_partitioner(ep, VulkanPartitioner())
    stock = _gen_edge_manager_for_partitioners(
        {"forward": [VulkanPartitioner()]}, {"forward": ep}, EdgeCompileConfig(_check_ir_validity=False), {}, False
    )
    assert described(ours) == described(stock)


def test_merge_keeps_order_and_cuts_runs_at_graph_passes():
    from executorch.exir.program import _program as p

    pre, _ = p._get_aten_to_edge_passes(EdgeCompileConfig())
    passes = [p.RemoveNonCoreAtenOpGraphAssertsPass(), p.ReplaceViewOpsWithViewCopyOpsPass(), *pre,
              p.OpReplacePass(), p.MemoryFormatOpsPass()]
    names = [type(x).__name__ for x in merge_edge_passes(passes)]
    assert names == [
        "RemoveNonCoreAtenOpGraphAssertsPass",
        "ReplaceSymSizeOpPass",
        "Chained_ViewOpsToViewCopy_NormalizeTransposePass_ReplaceBrokenOpsWithFunctionalOpsPass"
        "_ScalarToTensorPass_SymToTensorPass",
        "RemoveNoopPass", "PruneEmptyTensorsPass", "RemoveToCopyPass", "FoldRedundantDequantizeQuantizePass",
        "Chained_RemoveMixedTypeOperators_OpReplacePass_MemoryFormatOpsPass",
    ]
