"""Static int8 convolutions: packing, guards, references, fusion vs ExecuTorch's stock flow, export."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlower
from qlower import fuse, pack, references
from qlower.errors import StrictError
from qlower.patterns import conv as conv_family
from qlower.pte import read_pte
from qlower.metrics import THRESHOLDS, sqnr_db

from .conftest import EXAMPLES
from .test_fuse import fused_ops, lower_stock, quantize_pt2e_static, vk_graphs

VISION = ["resnet", "mobilenet_v2"]
# Golden q8ta conv (integer accumulation) vs the PT2E graph's dq → conv → q in
# float: equal but for rounding ties, far above what a damaged weight gives.
MIN_LAYER_SQNR_DB = 60.0
# One flipped weight byte in one conv must show in that layer.
MAX_DAMAGED_LAYER_SQNR_DB = 40.0


# -- pack / unpack ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(oc=st.integers(1, 13), icg=st.integers(1, 7), kh=st.integers(1, 5), kw=st.integers(1, 5))
def test_conv_weight_round_trip(oc, icg, kh, kw):
    w = torch.randint(-127, 128, (oc, icg, kh, kw), dtype=torch.int8)
    packed = pack.pack_conv_weight(w)
    assert packed.shape == (oc, pack.ceil_to(kh * kw * icg, 4)) and packed.dtype == torch.int8
    assert (packed[:, kh * kw * icg:] == 0).all()
    # Row oc holds the kernel in (kh, kw, ic) order.
    assert packed[oc - 1, (kh - 1) * kw * icg + (kw - 1) * icg + icg - 1] == w[oc - 1, icg - 1, kh - 1, kw - 1]
    torch.testing.assert_close(pack.unpack_conv_weight(packed, icg, (kh, kw)), w, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 13), kh=st.integers(1, 5), kw=st.integers(1, 5))
def test_dw_weight_round_trip(c, kh, kw):
    w = torch.randint(-127, 128, (c, 1, kh, kw), dtype=torch.int8)
    packed = pack.pack_dw_weight(w)
    assert packed.shape == (kh, kw, pack.ceil_to(c, 4))
    assert (packed[:, :, c:] == 0).all() and packed[kh - 1, 0, c - 1] == w[c - 1, 0, kh - 1, 0]
    torch.testing.assert_close(pack.unpack_dw_weight(packed, c), w, rtol=0, atol=0)
    sums = pack.conv_channel_sums(w)
    assert sums.shape == (pack.ceil_to(c, 4),) and sums[:c].tolist() == w.reshape(c, -1).sum(1).tolist()


# -- guards ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_out, c_in, groups, problem", [
    (16, 3, 1, None),
    (7, 5, 1, None),  # odd channels pad; the general conv takes them
    (8, 8, 8, None),  # depthwise
    (6, 6, 6, "depthwise conv with 6 channels"),
    (16, 16, 2, None),  # 8 in / 8 out per group
    (12, 6, 3, "2 input channels per group"),  # the runtime's grouped shader needs 4k
    (6, 8, 2, "3 output channels per group"),
])
def test_conv_shape_guards(c_out, c_in, groups, problem):
    got = conv_family.conv_shape_problem(c_out, c_in, groups)
    assert (got is None) if problem is None else (problem in got)


def test_3d_convs_are_explained():
    assert "3-D convolution" in conv_family.conv_shape_problem(8, 8, 1, dims=3)
    assert "3-D transposed convolution" in conv_family.conv_shape_problem(8, 8, 1, dims=3, transposed=True)


@pytest.mark.parametrize("kernel, stride, padding, dilation, groups, op", [
    ([1, 1], [1, 1], [0, 0], [1, 1], 1, "q8ta_conv2d_pw"),
    ([1, 1], [2, 2], [0, 0], [1, 1], 1, "q8ta_conv2d"),  # strided 1x1 shortcut
    ([1, 1], [1, 1], [0, 0], [1, 1], 2, "q8ta_conv2d"),  # the pw runtime ignores groups
    ([3, 3], [1, 1], [1, 1], [1, 1], 16, "q8ta_conv2d_dw"),
    ([3, 3], [2, 2], [1, 1], [1, 1], 1, "q8ta_conv2d"),
])
def test_conv_op_choice(kernel, stride, padding, dilation, groups, op):
    assert conv_family.conv_op(16, 16, kernel, stride, padding, dilation, groups) == op


def test_relu6_folds_only_when_int8_saturation_is_the_clamp():
    # Quantizing [0, 6] onto [-128, 127]: 6 lands on 127, so min(x, 6) is the int8 clamp.
    assert conv_family.clamp_problem(0.0, 6.0, 6.0 / 255, -128) is None
    # A wider output range leaves 6 inside it: the clamp would be lost.
    assert "inside the output's int8 range" in conv_family.clamp_problem(0.0, 6.0, 8.0 / 255, -128)
    assert "lower bound" in conv_family.clamp_problem(-1.0, 1.0, 2.0 / 255, 0)


# -- references vs the PT2E graph ------------------------------------------------------------


@pytest.mark.parametrize("make_conv", [
    lambda: nn.Conv2d(5, 7, 3, padding=1),  # odd channels
    lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
    lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),  # depthwise, dilated
    lambda: nn.Conv2d(16, 12, 1),  # pointwise
    lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2),  # grouped
], ids=["odd", "strided", "dw_dilated", "pw", "grouped"])
def test_reference_matches_the_quantized_graph(make_conv):
    """Packed operands through the golden reference equal PT2E's dq → conv → q."""
    torch.manual_seed(0)  # weights made here, seeded, not at collection
    conv = make_conv()
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(1, conv.in_channels, 9, 11)
    gm = quantize_pt2e_static(model, x)
    ep = torch.export.export(gm, (x,))
    from executorch.exir import to_edge

    edge = to_edge(ep)
    report = fuse.run_fusion(edge.exported_program())
    assert [l.fused_op for l in report.layers] == [f"et_vk.{conv_family.conv_op(conv.out_channels, conv.in_channels, list(conv.kernel_size), list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)}"]
    got = run_with_references(edge.exported_program(), x)
    want = gm(x)
    assert sqnr_db(want, got) >= MIN_LAYER_SQNR_DB


def run_with_references(prog, x: torch.Tensor, reference=None) -> torch.Tensor:
    """Runs a fused edge program on ``x``: its fused et_vk nodes with qlower's references (or ``reference(name)``)."""
    env = {}
    consts = {**prog.state_dict, **prog.constants}
    sig = prog.graph_signature
    lookup = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    for node in prog.graph.nodes:
        if node.op == "placeholder":
            env[node] = consts[lookup[node.name]] if node.name in lookup else x
        elif node.op == "call_function":
            args = [env.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
            if conv_family.FUSED_TAG in node.meta:
                name = f"et_vk.{node.target.__name__.split('.')[-2]}.default"
                fn = reference(name) if reference is not None else references.OPS[name]
                env[node] = fn(*args)
            else:
                env[node] = node.target(*args, **node.kwargs)
        elif node.op == "output":
            return env[node.args[0][0]]
    raise AssertionError("graph has no output")


# -- differential against the stock flow -----------------------------------------------------------


class Residual(nn.Module):
    """Odd channels beside aligned ones: 3 → 8 strided, 8 depthwise, 8 → 8 pw, residual add, 8 → 5 odd."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 8, 1)
        self.odd = nn.Conv2d(8, 5, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.pw(self.relu(self.dw(x)))
        return self.odd(self.relu(x + y))


def _lower_ours(ep):
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.exir import to_edge

    edge = to_edge(ep)
    report = fuse.run_fusion(edge.exported_program())
    return vk_graphs(edge.to_backend(VulkanPartitioner()).to_executorch().buffer), report


@pytest.fixture(scope="module")
def lowered_residual():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 13, 15)
    ep = torch.export.export(quantize_pt2e_static(Residual().eval(), x), (x,))
    stock, _ = lower_stock(ep)
    (ours, _), report = _lower_ours(ep)
    return stock, ours, report


def test_same_ops_and_bytes_as_executorch(lowered_residual):
    stock, ours, report = lowered_residual
    assert len(ours) == len(stock) == 1
    (s_chain, s_consts), (o_chain, o_consts) = stock[0], ours[0]
    assert fused_ops(o_chain) == fused_ops(s_chain)
    assert [op for op in o_chain if "q8ta" in op] == [
        "et_vk.q8ta_conv2d.default", "et_vk.q8ta_conv2d_dw.default", "et_vk.q8ta_conv2d_pw.default",
        "et_vk.q8ta_add.default", "et_vk.q8ta_conv2d.default"]
    # Packed weights, scales, sums and bias: same dtype, dims and bytes.
    assert sorted(o_consts) == sorted(s_consts)
    assert [l.fused_op for l in report.layers] == [f"et_vk.{op}" for op in ("q8ta_conv2d", "q8ta_conv2d_dw", "q8ta_conv2d_pw", "q8ta_conv2d")]


# -- export of the bundled models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_exports(tmp_path_factory):
    out = {}
    directory = tmp_path_factory.mktemp("vision")
    for name in VISION:
        pte = directory / f"{name}.pte"
        out[name] = (pte, qlower.export(EXAMPLES / f"{name}.py", pte, config=str(EXAMPLES.parent / "configs" / "vision.toml"), verify=2))
    return out


@pytest.mark.parametrize("name", VISION)
def test_vision_example_is_int8_end_to_end_in_one_partition(vision_exports, name):
    pte, summary = vision_exports[name]
    assert summary["scheme"] == "q8ta_q8csw"
    assert summary["vulkan_partitions"] == 1 and summary["cpu_ops"] == {} and not summary["runtime_problems"]
    convs = [r for r in summary["layer_report"] if r["kind"] == "conv"]
    assert convs and all(r["fused_op"].startswith("q8ta_conv2d") for r in convs)
    assert summary["layers"]["conv"] == summary["layers"]["conv_fused"] == len(convs)
    assert all(r["kernel"] and r["stride"] and r["groups"] for r in convs)
    # int8 between ops: the only float <-> int8 conversions are the model input, the pooling, the output.
    chain = [c.name for d in read_pte(pte.read_bytes()).vulkan_delegates for c in d.graph.chain]
    assert chain.count("quantized_decomposed.quantize_per_tensor.default") == 2
    assert chain.count("quantized_decomposed.dequantize_per_tensor.default") == 2
    assert not any(op in chain for op in ("aten.hardtanh.default", "aten.relu.default", "aten.convolution.default"))
    v = summary["verification"]
    assert v["passed"] and v["unmatched_layers"] == 0
    assert all(l["sqnr_db"] >= MIN_LAYER_SQNR_DB for l in v["layers"])
    assert min(o["vs_float"]["sqnr_db"] for o in v["outputs"]) >= THRESHOLDS["q8ta_q8csw"].vs_float


def test_relu6_folds_into_the_mobilenet_convs(vision_exports):
    _, summary = vision_exports["mobilenet_v2"]
    ops = summary["fused_ops"]
    assert ops["q8ta_conv2d_dw"] == 4 and ops["q8ta_conv2d_pw"] == 8 and ops["q8ta_add"] == 2
    notes = [r.get("note") for r in summary["layer_report"] if r["kind"] == "conv"]
    assert notes.count("ReLU6 folded into the output quantization") == 9


def test_a_damaged_conv_weight_fails_verify_in_that_layer(vision_exports, tmp_path):
    """Flip bytes of one packed conv weight in the file: verify names that layer."""
    from qlower.golden import vk_constant_bytes  # noqa: F401  (the file's constants are what golden reads)
    from qlower.verify import verify

    pte, _ = vision_exports["resnet"]
    data = bytearray(pte.read_bytes())
    file = read_pte(bytes(data))
    graph = file.vulkan_delegates[0].graph
    # The fourth conv's packed weight (int8, 2-D): find its bytes in the file and damage them.
    weights = [graph.values[c.args[3]].value for c in graph.chain if c.name == "et_vk.q8ta_conv2d.default"]
    target = bytes(vk_constant_bytes(file, 0, graph, weights[3].constant_id))
    at = bytes(data).find(target)
    assert at > 0 and bytes(data).count(target) == 1
    for i in range(0, 64, 7):
        data[at + i] ^= 0x40
    damaged = tmp_path / "damaged.pte"
    damaged.write_bytes(bytes(data))
    report = verify(EXAMPLES / "resnet.py", damaged, samples=1)
    assert not report["passed"]
    by_name = {l["name"]: l["sqnr_db"] for l in report["layers"]}
    assert by_name["layer2.conv1"] < MAX_DAMAGED_LAYER_SQNR_DB
    assert "layer2.conv1" in report["failures"][0]


def stock_pte(path) -> bytes:
    """The stock flow: XNNPACKQuantizer per-channel symmetric, calibrated on the model's batches,
    to_edge_transform_and_lower with VulkanPartitioner."""
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from qlower.loader import load_model

    loaded = load_model(path)
    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    gm = prepare_pt2e(torch.export.export(loaded.module, loaded.example_inputs).module(), q)
    for batch in loaded.calibration_inputs:
        gm(*batch)
    ep = torch.export.export(convert_pt2e(gm), loaded.example_inputs)
    return to_edge_transform_and_lower(ep, partitioner=[VulkanPartitioner()]).to_executorch().buffer


def test_pte_no_larger_than_the_stock_flow(vision_exports):
    from qlower.runtime_caps import summarize_pte

    pte, _ = vision_exports["mobilenet_v2"]
    stock = stock_pte(EXAMPLES / "mobilenet_v2.py")
    assert pte.stat().st_size <= len(stock)
    # The stock file runs the global average pool on the CPU between two partitions
    # (a CPU mean.out kernel, which the golden executor runs as mean.dim).
    assert summarize_pte(stock).partitions == 2
    from qlower.golden import GoldenExecutor
    from qlower.loader import load_model

    loaded = load_model(EXAMPLES / "mobilenet_v2.py")
    inputs = tuple(loaded.example_inputs)
    with torch.no_grad():
        want = loaded.module(*inputs)
    ours = GoldenExecutor(read_pte(pte.read_bytes())).run(inputs)[0]
    theirs = GoldenExecutor(read_pte(bytes(stock))).run(inputs)[0]
    assert sqnr_db(want, ours) >= sqnr_db(want, theirs) - 1.0


def test_strict_and_layer_overrides_apply_to_convs(tmp_path):
    model = tmp_path / "dw6.py"
    model.write_text(
        "import torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),"
        " nn.ReLU(), nn.Conv2d(6, 8, 1))\n"
        "example_inputs = (torch.randn(1, 3, 8, 8),)\n"
        "calibration_inputs = [(torch.randn(1, 3, 8, 8),) for _ in range(2)]\n"
    )
    summary = qlower.export(model, tmp_path / "a.pte", scheme="q8ta_q8csw")
    rows = {r["name"]: r for r in summary["layer_report"]}
    assert rows["0"]["fused_op"] == "q8ta_conv2d" and rows["2"]["fused_op"] is None
    assert "depthwise conv with 6 channels" in rows["2"]["reason"] and rows["4"]["fused_op"] == "q8ta_conv2d_pw"
    with pytest.raises(StrictError, match="layer '2'.*depthwise"):
        qlower.export(model, tmp_path / "b.pte", scheme="q8ta_q8csw", strict=True)
    config = tmp_path / "skip.toml"
    config.write_text('scheme = "q8ta_q8csw"\nstrict = true\n[layers]\n"2" = "skip"\n"re:[04]" = "skip"\n')
    summary = qlower.export(model, tmp_path / "c.pte", config=str(config))
    assert not any(r["fused_op"] for r in summary["layer_report"])
    assert all(r["reason"] == "skipped by a per-layer override" for r in summary["layer_report"] if r["kind"] == "conv")


def test_int4_schemes_leave_convs_float_and_say_so(tmp_path):
    model = tmp_path / "convhead.py"
    model.write_text(
        "import torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))\n"
        "example_inputs = (torch.randn(1, 3, 4, 4),)\n"
    )
    # --strict asks the int4 schemes for their linears only.
    summary = qlower.export(model, None, scheme="qta8a_qga4w", group_size=32, strict=True)
    conv = next(r for r in summary["layer_report"] if r["kind"] == "conv")
    assert not conv["quantized"] and "keeps convolutions float (only q8ta_q8csw" in conv["reason"]
    assert summary["layers"]["fused"] == 1 and summary["layers"]["conv"] == 1 and summary["layers"]["conv_fused"] == 0
