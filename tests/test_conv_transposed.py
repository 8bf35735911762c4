"""Static int8 transposed convolutions (et_vk.q8ta_conv2d_transposed): packing, guards, the golden
reference vs ExecuTorch's CPU reference and vs the PT2E graph, and a segmentation-style CNN vs the stock flow."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlower
from qlower import fuse, pack, references
from qlower.patterns import conv as conv_family
from qlower.pte import read_pte
from qlower.metrics import sqnr_db
from qlower.verify import verify

from .conftest import ROOT
from .test_conv import MIN_LAYER_SQNR_DB, run_with_references, stock_pte
from .test_fuse import quantize_pt2e_static

OP = "et_vk.q8ta_conv2d_transposed.default"
SEGNET = ROOT / "tests" / "models" / "tiny_segnet.py"
ODD_UPSAMPLE = ROOT / "tests" / "models" / "odd_upsample.py"
# ExecuTorch's CPU reference of the op dequantizes and convolves in float32;
# qlower's sums integers exactly. Where the float sum lands on the other side
# of a rounding tie, one output code differs by one, never more.
MAX_CODE_DIFF = 1
MAX_TIE_FRACTION = 0.01
# The size bar: qlower's file at most this much larger than the stock flow's.
MAX_SIZE_VS_STOCK = 1.05
CONV_FAMILY = ("q8ta_conv2d", "conv_with_clamp", "convolution")


# -- pack / unpack ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 3), icg=st.integers(1, 7), ocg=st.integers(1, 7), kh=st.integers(1, 4), kw=st.integers(1, 4))
def test_transposed_weight_round_trip(groups, icg, ocg, kh, kw):
    w = torch.randint(-127, 128, (groups * icg, ocg, kh, kw), dtype=torch.int8)
    packed = pack.pack_conv_transposed_weight(w, groups)
    assert packed.shape == (groups * ocg, pack.ceil_to(kh * kw * icg, 4)) and packed.dtype == torch.int8
    assert (packed[:, kh * kw * icg:] == 0).all()
    # Row g·OCg + o holds w[g·ICg + i, o, y, x] at (y, x, i), the kernel not flipped.
    g, o, i, y, x = groups - 1, ocg - 1, icg - 1, kh - 1, 0
    assert packed[g * ocg + o, (y * kw + x) * icg + i] == w[g * icg + i, o, y, x]
    torch.testing.assert_close(pack.unpack_conv_transposed_weight(packed, icg, (kh, kw), groups), w, rtol=0, atol=0)


# -- guards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_out, c_in, groups, dilation, problem", [
    (16, 32, 1, [1, 1], None),
    (7, 5, 1, [1, 1], None),  # odd channels pad with zero weights
    (3, 3, 1, [1, 1], None),
    (8, 8, 2, [1, 1], "grouped transposed convolution (groups=2)"),
    (8, 8, 1, [2, 2], "dilation [2, 2]"),
])
def test_transposed_guards(c_out, c_in, groups, dilation, problem):
    got = conv_family.conv_shape_problem(c_out, c_in, groups, transposed=True, dilation=dilation)
    assert (got is None) if problem is None else (problem in got)
    if problem is None:
        assert conv_family.conv_op(c_out, c_in, [2, 2], [2, 2], [0, 0], [1, 1], groups, True) == "q8ta_conv2d_transposed"


# -- golden reference vs ExecuTorch's CPU reference ----------------------------------------------------


def et_cpu_reference(name: str):
    """ExecuTorch's CPU implementation of a q8ta conv op, fed the weight matrix in the order it reads.

    Seen in executorch 1.5.1: the CPU references of ``q8ta_conv2d`` and
    ``q8ta_conv2d_transposed`` view each weight row as (ic, kh, kw), while
    ExecuTorch's pattern pass writes, and the runtime's ``pack_q8_conv2d_weights``
    shader reads, (kh, kw, ic). Only the order inside a row differs; the
    values, padding, sums, scales and arguments are the op's.
    """
    import executorch.backends.vulkan.custom_ops_lib  # noqa: F401  (registers torch.ops.et_vk)

    op = getattr(torch.ops.et_vk, name.split(".")[1])

    def run(x, input_scale, input_zp, weights, *rest):
        kernel = tuple(rest[5])  # after sums, scales, output scale and zp, bias
        groups = rest[-2]
        w = pack.unpack_conv_weight(weights, x.shape[1] // groups, kernel)  # [OC, ICg, KH, KW]
        rows = pack.pad_to(w.reshape(w.shape[0], -1), 1, pack.CONV_K_ALIGN)
        return op(x, input_scale, input_zp, rows, *rest)

    return run


SHAPES = [
    # (c_in, c_out, kernel, stride, padding, output_padding, h, w)
    (3, 5, 2, 2, 0, 0, 5, 7),
    (5, 7, 3, 2, 1, 1, 6, 5),
    (7, 3, 4, 2, 1, 0, 4, 4),
    (8, 8, 2, 2, 0, 0, 8, 8),
    (16, 8, 4, 2, 1, 0, 4, 6),
    (8, 16, 3, 2, 1, 1, 5, 5),
    (16, 16, 3, 1, 1, 0, 4, 4),  # stride 1
    (5, 8, 3, 3, 0, 2, 3, 4),  # stride 3, output padding 2
    (8, 5, 4, 2, 2, 0, 5, 3),  # padding wider than the kernel's half
]


def _operands(c_in, c_out, kernel, bias: bool, gen: torch.Generator):
    w = torch.randint(-127, 128, (c_in, c_out, kernel, kernel), dtype=torch.int8, generator=gen)
    scales = torch.rand(c_out, generator=gen) * 0.02 + 0.005
    b = torch.randn(c_out, generator=gen) * 0.5 if bias else None
    return w, scales, b


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "ic{}_oc{}_k{}_s{}_p{}_op{}".format(*s[:6]))
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_golden_matches_executorch_cpu_reference(shape, activation):
    import executorch.backends.vulkan.custom_ops_lib  # noqa: F401  (registers torch.ops.et_vk)

    c_in, c_out, kernel, stride, padding, output_padding, h, w_ = shape
    gen = torch.Generator().manual_seed(sum(shape))
    w, scales, bias = _operands(c_in, c_out, kernel, activation == "relu", gen)
    x = torch.randint(-128, 128, (1, c_in, h, w_), dtype=torch.int8, generator=gen)
    packed = pack.pack_conv_transposed_weight(w)
    sums = pack.conv_channel_sums(pack.transposed_to_conv_layout(w))
    args = (x, 0.05, 3, packed, sums, pack.pad_channel_scales(scales), 0.08, -5,
            pack.pad_bias(bias) if bias is not None else None, [kernel, kernel], [stride, stride], [padding, padding],
            [output_padding, output_padding], [1, 1], 1, activation)
    ours = references.q8ta_conv2d_transposed(*args)
    theirs = et_cpu_reference(OP)(*args)
    want_shape = torch.nn.functional.conv_transpose2d(x.float(), w.float(), None, stride, padding, output_padding).shape
    assert ours.shape == theirs.shape == want_shape and ours.dtype == torch.int8
    diff = (ours.int() - theirs.int()).abs()
    assert diff.max() <= MAX_CODE_DIFF
    assert (diff > 0).float().mean() <= MAX_TIE_FRACTION


def test_executorch_cpu_reference_reads_rows_in_another_order():
    """The quirk :func:`et_cpu_reference` works around: on the stored matrix as is, ExecuTorch's CPU
    reference disagrees with golden (re-check on an ExecuTorch upgrade; the runtime is the judge)."""
    import executorch.backends.vulkan.custom_ops_lib  # noqa: F401

    gen = torch.Generator().manual_seed(0)
    w, scales, _ = _operands(5, 8, 3, False, gen)
    x = torch.randint(-128, 128, (1, 5, 4, 4), dtype=torch.int8, generator=gen)
    args = (x, 0.05, 0, pack.pack_conv_transposed_weight(w), pack.conv_channel_sums(pack.transposed_to_conv_layout(w)),
            pack.pad_channel_scales(scales), 0.1, 0, None, [3, 3], [2, 2], [1, 1], [0, 0], [1, 1], 1, "none")
    ours = references.q8ta_conv2d_transposed(*args)
    assert not torch.equal(ours, torch.ops.et_vk.q8ta_conv2d_transposed(*args))
    assert (ours.int() - et_cpu_reference(OP)(*args).int()).abs().max() <= MAX_CODE_DIFF


def test_golden_uses_the_stored_weight_sums():
    """The GPU subtracts x_zp · weight_sums from its raw sum: damaged sums must change golden's output."""
    gen = torch.Generator().manual_seed(0)
    w, scales, _ = _operands(5, 7, 3, False, gen)
    x = torch.randint(-128, 128, (1, 5, 4, 4), dtype=torch.int8, generator=gen)
    sums = pack.conv_channel_sums(pack.transposed_to_conv_layout(w))
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1], [1, 1], 1, "none")
    good = references.q8ta_conv2d_transposed(x, 0.05, 7, pack.pack_conv_transposed_weight(w), sums,
                                             pack.pad_channel_scales(scales), 0.05, 0, None, *geometry)
    damaged = sums.clone()
    damaged[2] += 50
    bad = references.q8ta_conv2d_transposed(x, 0.05, 7, pack.pack_conv_transposed_weight(w), damaged,
                                            pack.pad_channel_scales(scales), 0.05, 0, None, *geometry)
    assert torch.equal(good[:, :2], bad[:, :2]) and not torch.equal(good[:, 2], bad[:, 2])


# -- golden reference vs the PT2E graph ------------------------------------------------------------


@pytest.mark.parametrize("make_conv", [
    lambda: nn.ConvTranspose2d(3, 5, 2, stride=2),
    lambda: nn.ConvTranspose2d(5, 7, 3, stride=2, padding=1, output_padding=1),
    lambda: nn.ConvTranspose2d(7, 8, 4, stride=2, padding=1, bias=False),
    lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
    lambda: nn.ConvTranspose2d(8, 16, 3, stride=1, padding=1),
], ids=["odd_k2", "odd_k3_outpad", "odd_k4_nobias", "aligned_k4", "aligned_s1"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
def test_reference_matches_the_quantized_graph(make_conv, relu):
    """The fused graph through golden equals PT2E's dq → conv_transpose2d [→ relu] → q."""
    from executorch.exir import to_edge

    # Weights made here, seeded: made at collection they would depend on what other test modules drew first.
    torch.manual_seed(0)
    conv = make_conv()
    # A second layer keeps the plain conv's output quantized (int8 out), as in a network.
    model = nn.Sequential(conv, nn.ReLU() if relu else nn.Identity(), nn.Conv2d(conv.out_channels, 4, 1)).eval()
    x = torch.randn(1, conv.in_channels, 5, 7)
    gm = quantize_pt2e_static(model, x)
    edge = to_edge(torch.export.export(gm, (x,)))
    report = fuse.run_fusion(edge.exported_program())
    assert [l.fused_op for l in report.layers] == [OP.removesuffix(".default"), "et_vk.q8ta_conv2d_pw"]
    got = run_with_references(edge.exported_program(), x)
    assert sqnr_db(gm(x), got) >= MIN_LAYER_SQNR_DB


def test_executorch_reference_agrees_on_the_fused_graph():
    """ExecuTorch's own CPU reference of the op, run on qlower's fused graph, agrees with the PT2E graph
    (the packed weight, sums, scales and argument order are what the op's schema means)."""
    from executorch.exir import to_edge

    torch.manual_seed(1)
    model = nn.Sequential(nn.ConvTranspose2d(5, 7, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                          nn.Conv2d(7, 4, 1)).eval()
    x = torch.randn(1, 5, 6, 5)
    gm = quantize_pt2e_static(model, x)
    edge = to_edge(torch.export.export(gm, (x,)))
    fuse.run_fusion(edge.exported_program())
    got = run_with_references(edge.exported_program(), x, reference=et_cpu_reference)
    assert sqnr_db(gm(x), got) >= MIN_LAYER_SQNR_DB


def test_grouped_and_dilated_transposed_convs_stay_float_with_a_reason(tmp_path):
    model = tmp_path / "grouped.py"
    model.write_text(
        "import torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),"
        " nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, stride=2, dilation=2), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, stride=2))\n"
        "example_inputs = (torch.randn(1, 3, 6, 6),)\n"
        "calibration_inputs = [(torch.randn(1, 3, 6, 6),) for _ in range(2)]\n"
    )
    summary = qlower.export(model, None, scheme="q8ta_q8csw")
    rows = {r["name"]: r for r in summary["layer_report"]}
    assert "grouped transposed convolution" in rows["2"]["reason"] and not rows["2"]["quantized"]
    assert "dilation [2, 2]" in rows["4"]["reason"] and not rows["4"]["quantized"]
    assert rows["6"]["fused_op"] == "q8ta_conv2d_transposed"


# -- the segmentation-style CNN vs the stock flow ------------------------------------------------------


def _conv_ops(pte_bytes: bytes) -> Counter:
    chain = [c.name for d in read_pte(pte_bytes).vulkan_delegates for c in d.graph.chain]
    return Counter(op for op in chain if any(k in op for k in CONV_FAMILY))


@pytest.fixture(scope="module")
def segnet(tmp_path_factory):
    pte = tmp_path_factory.mktemp("segnet") / "segnet.pte"
    summary = qlower.export(SEGNET, pte, config=str(ROOT / "configs" / "vision.toml"))
    return pte, summary, stock_pte(SEGNET)


def test_segnet_fuses_every_conv_as_the_stock_flow_does(segnet):
    pte, summary, stock = segnet
    ours = _conv_ops(pte.read_bytes())
    assert ours == _conv_ops(stock)
    assert ours == {"et_vk.q8ta_conv2d.default": 4, OP: 1, "et_vk.q8ta_conv2d_pw.default": 1}
    assert summary["layers"]["conv"] == summary["layers"]["conv_fused"] == 6
    assert summary["vulkan_partitions"] == 1 and summary["cpu_ops"] == {} and not summary["runtime_problems"]
    assert pte.stat().st_size <= len(stock) * MAX_SIZE_VS_STOCK
    # int8 from conv to conv: the transposed conv takes the int8 tensor and gives one.
    graph = read_pte(pte.read_bytes()).vulkan_delegates[0].graph
    up = next(c for c in graph.chain if c.name == OP)
    producer = next(c for c in graph.chain if up.args[0] in c.args[-1:])
    assert producer.name == "et_vk.q8ta_conv2d.default"
    assert graph.values[up.args[-1]].value.datatype == graph.values[up.args[0]].value.datatype


def test_segnet_constants_equal_the_stock_flow(segnet):
    """Packed transposed weight, sums, scales, bias: the same bytes as ExecuTorch's own pattern pass writes."""
    from .test_fuse import vk_graphs

    pte, _, stock = segnet
    ours, _ = vk_graphs(pte.read_bytes())
    theirs, _ = vk_graphs(stock)
    assert len(ours) == len(theirs) == 1
    assert sorted(ours[0][1]) == sorted(theirs[0][1])


def test_segnet_verifies(segnet):
    pte, _, _ = segnet
    report = verify(SEGNET, pte, samples=2)
    assert report["passed"] and report["unmatched_layers"] == 0
    by_name = {l["name"]: l for l in report["layers"]}
    assert len(by_name) == 6 and by_name["up"]["op"] == OP
    assert all(l["sqnr_db"] >= MIN_LAYER_SQNR_DB for l in report["layers"]), by_name


@pytest.mark.parametrize("layer, planned", [
    (nn.ConvTranspose2d(4, 8, 2, stride=2), True),
    (nn.ConvTranspose2d(4, 8, 2, stride=2, groups=2), False),
    (nn.Conv1d(4, 8, 3), False),
    (nn.ConvTranspose1d(4, 8, 2, stride=2), False),
], ids=["transposed_2d", "transposed_grouped", "conv_1d", "transposed_1d"])
def test_only_planned_convs_get_quantized_weights(layer, planned):
    """The static quantizer annotates exactly the convs the plan quantizes (a 1-D or grouped transposed conv
    left float must not be quantized behind the report's back)."""
    from qlower.config import ExportOptions
    from qlower.quantize import plan_layers
    from qlower.static_int8 import quantize_static

    model = nn.Sequential(layer, nn.ReLU()).eval()
    x = torch.randn(1, 4, 6) if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)) else torch.randn(1, 4, 5, 6)
    plans = plan_layers(model, ExportOptions(scheme="q8ta_q8csw"))
    assert [p.quantized for p in plans] == [planned]
    gm = quantize_static(model, (x,), plans, [(x,)])
    per_channel = [n for n in gm.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(per_channel) == int(planned)
    if planned:  # output channels: axis 1 of the [IC, OC, KH, KW] weight
        assert per_channel[0].args[3] == 1
