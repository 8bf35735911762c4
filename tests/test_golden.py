"""The golden executor and the fused-op references."""

from __future__ import annotations

import copy

import pytest
import torch

from qlower import references
from qlower.errors import VerifyError
from qlower.golden import GoldenExecutor, OpRecord, run_pte
from qlower.pack import group_sums, pack_group_scales, pack_int4, pad_bias
from qlower.pte import read_pte

# ExecuTorch's CPU reference of linear_q4gsw and ours both compute in float32;
# only the summation order differs.
FLOAT_RTOL = 1e-5
# Golden run vs the eager quantized model: same integers, float rounding only.
MIN_SQNR_VS_QUANTIZED_DB = 100.0


def _quantized_eager(model_path, scheme):
    from qlower.config import make_options
    from qlower.loader import load_model
    from qlower.quantize import plan_layers, quantize_eager

    loaded = load_model(model_path)
    quantize_eager(loaded.module, plan_layers(loaded.module, make_options(scheme=scheme)))
    return loaded


def _records(pte, inputs, name):
    records: list[OpRecord] = []
    run_pte(pte, inputs, on_op=lambda r: records.append(r) if r.name == name else None)
    return records


@pytest.mark.parametrize("scheme", ["qta8a_qga4w", "qga4w"])
def test_fused_op_equals_reference_on_eager_weights_bit_for_bit(exported, scheme):
    """The op as the file stores it (packed, transposed, padded) gives exactly what the
    reference gives on the eager quantized model's own integers and scales."""
    model, pte = exported("mlp", scheme)
    loaded = _quantized_eager(model, scheme)
    op = "et_vk.linear_dq8ca_q4gsw.default" if scheme == "qta8a_qga4w" else "et_vk.linear_q4gsw.default"
    records = _records(pte, loaded.example_inputs, op)
    layers = [loaded.module.fc1, loaded.module.fc2]
    assert len(records) == len(layers)
    for record, layer in zip(records, layers):
        w = layer.int_values()  # QuantizedLinear: torchao's int values and scales as plain tensors
        scales = layer.weight_scale
        group_size = w.shape[1] // scales.shape[1]
        x = record.args[0]
        if scheme == "qta8a_qga4w":
            x_scales, x_zp = record.args[1], record.args[2]
            xq = references.quantize_per_token(x, x_scales, x_zp)
            sums = w.reshape(w.shape[0], -1, group_size).sum(-1).to(torch.int32).t()
            expected = references.linear_qta8a_qga4w_int(xq, x_scales.reshape(-1), x_zp.reshape(-1), w, sums, scales,
                                                          group_size, layer.bias.detach())
        else:
            expected = references.linear_qga4w_int(x, w, scales, group_size, layer.bias.detach())
        assert torch.equal(record.output, expected.reshape(record.output.shape))


def test_q4gsw_reference_matches_executorch_cpu_impl():
    """Our reading of the serialized layout agrees with ExecuTorch's own (float) reference."""
    import executorch.backends.vulkan.custom_ops_lib  # noqa: F401  registers et_vk ops

    gen = torch.Generator().manual_seed(0)
    n, k, group_size = 12, 96, 32  # ExecuTorch's reference cannot unpad N, so N % 4 == 0 here
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // group_size, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen)
    x = torch.randn(5, k, generator=gen)
    args = (x, pack_int4(w), pack_group_scales(scales), group_size, pad_bias(bias))
    ours = references.linear_q4gsw(*args)
    theirs = torch.ops.et_vk.linear_q4gsw(*args)[..., :n]
    torch.testing.assert_close(ours, theirs, rtol=FLOAT_RTOL, atol=FLOAT_RTOL * theirs.abs().max().item())


def test_dq8ca_reference_is_integer_exact_on_odd_sizes():
    """Integer accumulation with weight sums equals dequantize-then-multiply in float64."""
    gen = torch.Generator().manual_seed(1)
    n, k, group_size, m = 7, 64, 16, 3
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // group_size, generator=gen) + 0.1
    x = torch.randn(m, k, generator=gen)
    x_scales = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255
    x_zp = (-128 - torch.round(x.amin(1).clamp(max=0) / x_scales)).to(torch.int8)
    y = references.linear_dq8ca_q4gsw(x, x_scales, x_zp, pack_int4(w), group_sums(w, group_size), pack_group_scales(scales), group_size)
    xq = references.quantize_per_token(x, x_scales, x_zp).double()
    xd = (xq - x_zp.double().reshape(-1, 1)) * x_scales.double().reshape(-1, 1)
    wd = (w.double().reshape(n, -1, group_size) * scales.double().unsqueeze(-1)).reshape(n, k)
    torch.testing.assert_close(y.double(), xd @ wd.t(), rtol=1e-5, atol=1e-5)


def test_q8ta_linear_reference_requantizes_with_relu():
    gen = torch.Generator().manual_seed(2)
    n, k = 5, 12
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    ws = torch.rand(n, generator=gen) * 0.01
    x = torch.randint(-128, 128, (3, k), generator=gen, dtype=torch.int8)
    out = references.q8ta_linear(x, 0.05, 3, w, w.sum(1).to(torch.int32), ws, 0.02, -4, None, "relu")
    y = ((x.double() - 3) * 0.05) @ (w.double() * ws.double().reshape(-1, 1)).t()
    expected = torch.clamp(torch.round(torch.relu(y) / 0.02) - 4, -128, 127)
    assert out.dtype == torch.int8
    assert (out.double() - expected).abs().max() <= 1  # a float rounding tie may go either way


def test_program_with_cpu_kernels_between_partitions(exported):
    """The stock flow's llama .pte runs as several Vulkan delegates with CPU kernels between them."""
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from qlower.metrics import sqnr_db

    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from qlower.loader import load_model

    model, _ = exported("llama", "qta8a_qga4w")
    loaded = load_model(model)  # quantized as the stock flow does it: torchao alone
    quantize_(loaded.module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    ep = torch.export.export(loaded.module, loaded.example_inputs, strict=False)
    pte = read_pte(to_edge_transform_and_lower(ep, partitioner=[VulkanPartitioner()]).to_executorch().buffer)
    kinds = {s.kind for s in pte.steps}
    assert kinds == {"delegate", "kernel"} and len(pte.vulkan_delegates) > 1
    (out,) = run_pte(pte, loaded.example_inputs)
    with torch.no_grad():
        expected = loaded.module(*loaded.example_inputs)
    assert sqnr_db(expected, out) > MIN_SQNR_VS_QUANTIZED_DB


def _renamed(pte_path, new_name):
    pte = read_pte(pte_path)
    pte = copy.copy(pte)
    graph = pte.vulkan_delegates[0].graph
    graph.chain[0].name = new_name
    return pte


@pytest.mark.parametrize("name", ["et_vk.mystery_linear.default", "aten.no_such_op.default"])
def test_unknown_op_is_an_error_naming_it(exported, name):
    _, pte_path = exported("mlp", "fp32")
    pte = _renamed(pte_path, name)
    with pytest.raises(VerifyError, match=name.replace(".", r"\.")):
        GoldenExecutor(pte).run((torch.randn(4, 256),))


def test_input_of_the_wrong_shape_is_an_error(exported):
    _, pte_path = exported("mlp", "fp32")
    with pytest.raises(VerifyError, match=r"shape \[2, 256\].*\[4, 256\]"):
        run_pte(pte_path, (torch.randn(2, 256),))


def test_dq8ca_linear_on_one_row_is_weight_only_as_on_the_runtime():
    """ET-VK runs ``linear_dq8ca_q4gsw`` on one row (a decode step, an LLM's last-token head) as a GEMV
    that skips the activation quantization (``linear_dq8ca_q4gsw_coop``); several rows go through int8."""
    from qlower import pack, references
    from qlower.quantized_linear import quantized_linear
    from qlower.metrics import sqnr_db

    torch.manual_seed(0)
    n, k, g = 12, 64, 32
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // g) * 0.01 + 0.001
    args = (pack.pack_int4(w), pack.group_sums(w, g), pack.pack_group_scales(scales), g)

    def qparams(x):
        return torch.ops.torchao.choose_qparams_affine(x, "ASYMMETRIC", [1] * (x.dim() - 1) + [k], torch.int8, -128, 127,
                                                       None, None, torch.int8)

    for rows in (1, 3):
        x = torch.randn(1, rows, k)
        s, z = qparams(x)
        got = references.linear_dq8ca_q4gsw(x, s, z, *args)
        weight_only = references.linear_q4gsw(x, args[0], args[2], g)
        eager = quantized_linear(x, w, scales, torch.zeros_like(scales, dtype=torch.int8), [1, g], 4, True, None,
                                 torch.float32)
        assert torch.equal(got, weight_only) == (rows == 1), rows
        assert sqnr_db(eager, got) > 100, rows
