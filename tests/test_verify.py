"""qlower verify end to end: every scheme on the examples, a corrupted .pte,
a .pte written by the stock ExecuTorch flow, and the CLI contract."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qlower.cli import app, main
from qlower.pte import read_pte
from qlower.metrics import THRESHOLDS
from qlower.verify import verify

SCHEMES = ["qta8a_qga4w", "qga4w", "q8ta_q8csw", "fp16", "fp32"]
# Every scheme on every bundled example (about two minutes on a 2-core machine).
CASES = [pytest.param(example, s, id=f"{example}-{s}") for example in ("mlp", "llama", "cnn") for s in SCHEMES]

runner = CliRunner()


@pytest.mark.parametrize("example,scheme", CASES)
def test_every_scheme_verifies(exported, example, scheme):
    model, pte = exported(example, scheme)
    result = runner.invoke(app, ["verify", str(model), str(pte), "--samples", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["scheme"] == scheme
    t = THRESHOLDS[scheme]
    for out in report["outputs"]:
        assert out["vs_float"]["sqnr_db"] >= t.vs_float
        assert out["vs_quantized"]["sqnr_db"] >= t.vs_quantized
    assert report["layers"] and report["unmatched_layers"] == 0
    assert all(layer["sqnr_db"] >= t.layer for layer in report["layers"])


def _flip_bits(pte_path, out_path, layer_index=0, bits=8):
    """Copy the .pte with a few bits flipped in the packed weight of the Nth fused linear."""
    pte = read_pte(pte_path)
    fused = [(d, op) for d in pte.vulkan_delegates for op in d.ops if op.name.startswith("et_vk.linear")]
    delegate, op = fused[layer_index]
    weight = delegate.graph.values[op.args[3 if "dq8ca" in op.name else 1]].value
    key = delegate.graph.constants[weight.constant_id].named_key
    constant = pte.named_bytes(key)
    data = bytearray(pte_path.read_bytes())
    start = data.find(constant)
    assert start >= 0 and data.find(constant, start + 1) < 0
    for i in range(bits):
        data[start + 97 * i + 5] ^= 0x80  # the high nibble's sign bit: the int4 value moves by 8
    out_path.write_bytes(bytes(data))


def test_corrupted_weight_fails_and_names_the_layer(exported, tmp_path, capsys):
    model, pte = exported("mlp", "qta8a_qga4w")
    bad = tmp_path / "bad.pte"
    _flip_bits(pte, bad, layer_index=0)
    assert main(["verify", str(model), str(bad), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert not report["passed"]
    assert "layer fc1" in report["failures"][0]
    assert "error: verification failed: layer fc1" in captured.err


def test_stock_executorch_flow_pte_verifies(exported, tmp_path):
    """A .pte lowered by ExecuTorch's own API (no qlower) verifies too."""
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from qlower.loader import load_model

    model, _ = exported("mlp", "qta8a_qga4w")  # also imports the libraries quietly
    loaded = load_model(model)
    quantize_(loaded.module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(128)))
    program = to_edge_transform_and_lower(
        torch.export.export(loaded.module, loaded.example_inputs), partitioner=[VulkanPartitioner()]
    ).to_executorch()
    stock = tmp_path / "stock.pte"
    stock.write_bytes(program.buffer)
    report = verify(model, stock, samples=2)
    assert report["passed"], report["failures"]
    assert report["scheme"] == "qta8a_qga4w" and report["group_size"] == 128


def test_layers_plot_and_inputs_file(exported, tmp_path):
    model, pte = exported("mlp", "qga4w")
    inputs = tmp_path / "inputs.pt"
    torch.save([(torch.randn(4, 256),), (torch.randn(4, 256),)], inputs)
    plot = tmp_path / "layers.png"
    result = runner.invoke(app, ["verify", str(model), str(pte), "--inputs", str(inputs), "--layers", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "fc1" in result.stdout and "fc2" in result.stdout and "passed" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


UNREACHABLE_SQNR_DB = 400.0  # above SQNR_IDENTICAL_DB: no file meets it


def test_float_bar_given_fails_as_quality_with_exit_3(exported):
    model, pte = exported("mlp", "fp16")
    result = runner.invoke(app, ["verify", str(model), str(pte), "--min-sqnr-float", "200", "--json"])
    assert result.exit_code == 3
    report = json.loads(result.stdout)  # the report is the one document, not an error document
    assert report["ok"] is False and not report["passed"]
    assert report["defects"] == []  # the file computes what the quantized model computes
    assert report["quality"]["below"] and report["quality"]["enforced"] and report["quality"]["threshold_db"] == 200
    assert report["thresholds"]["vs_float"] == 200 and "against the float model" in report["failures"][0]
    assert "error: quantization costs" in result.stderr


def test_quality_below_the_default_bar_warns_and_passes(exported, monkeypatch):
    import dataclasses

    from qlower import metrics

    model, pte = exported("mlp", "fp16")
    monkeypatch.setitem(metrics.THRESHOLDS, "fp16", dataclasses.replace(metrics.THRESHOLDS["fp16"], vs_float=UNREACHABLE_SQNR_DB))
    result = runner.invoke(app, ["verify", str(model), str(pte), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["passed"] and report["defects"] == [] and report["failures"] == []
    assert report["quality"]["below"] and not report["quality"]["enforced"]
    assert "warning: quantization costs" in result.stderr and "error:" not in result.stderr


def test_defect_fails_with_exit_1(exported):
    model, pte = exported("mlp", "fp16")
    result = runner.invoke(app, ["verify", str(model), str(pte), "--min-sqnr-quantized", str(UNREACHABLE_SQNR_DB), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["defects"] and "vs the quantized eager model" in report["failures"][0]
    assert "error: verification failed" in result.stderr and "does not compute what the model does" in result.stderr


def test_inputs_of_the_wrong_shape_are_a_user_error(exported, tmp_path, capsys):
    model, pte = exported("mlp", "fp32")
    inputs = tmp_path / "inputs.pt"
    torch.save((torch.randn(3, 256),), inputs)
    assert main(["verify", str(model), str(pte), "--inputs", str(inputs)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "float32[3, 256]" in err and "float32[4, 256]" in err and "hint:" in err


def test_verify_after_export_reuses_the_job(tmp_path):
    from qlower.config import make_options
    from qlower.pipeline import ExportJob, run_stages
    from qlower.verify import verify_after_export

    from pathlib import Path

    mlp = Path(__file__).resolve().parents[1] / "examples" / "mlp.py"
    job = ExportJob.of(model_path=mlp, output=tmp_path / "mlp.pte", options=make_options(scheme="qta8a_qga4w"), verify_samples=2)
    run_stages(job)  # the verify stage keeps the quantized model for this call
    assert job.made.verification["passed"] and job.made.verification["samples"] == 2
    report = verify_after_export(job, samples=2)
    assert report["passed"], report["failures"]
    assert report["outputs"][0]["vs_quantized"]["sqnr_db"] >= THRESHOLDS["qta8a_qga4w"].vs_quantized


def test_float_layers_are_compared_in_isolation():
    """A float (skipped) linear is fed the golden run's own input, like a fused
    one, so upstream rounding ties do not count against it; an unfused
    quantized layer is not, since its graph input is already quantized."""
    from torch import nn

    from qlower.golden import OpRecord
    from qlower.quantized_linear import QuantizedLinear
    from qlower.verify import isolated_eager_layer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(2, 8)
    record = OpRecord(0, 0, "aten.linear.default", [x, model[0].weight, model[0].bias], None)
    torch.testing.assert_close(isolated_eager_layer(model, "0", record), model[0](x), rtol=0, atol=0)
    chain = QuantizedLinear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int8),
                            [1, 8], 4, torch.float32, None, dynamic_activations=True, opaque=False)
    assert isolated_eager_layer(nn.Sequential(chain), "0", record) is None


REPEATED_BLOCKS = 4


def test_layers_report_groups_repeated_layers(tmp_path):
    """verify --layers: repeated blocks share a row (least and median SQNR); --all-layers lists each one."""
    from qlower.api import export

    from .conftest import write_model

    model = write_model(tmp_path, f"""
        class Blocks(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range({REPEATED_BLOCKS}))
                self.head = nn.Linear(64, 24)

            def forward(self, x):
                for block in self.blocks:
                    x = torch.relu(block(x))
                return self.head(x)

        def make_model():
            torch.manual_seed(0)
            return Blocks()

        def make_example_inputs():
            return (torch.randn(3, 64),)
    """)
    pte = tmp_path / "blocks.pte"
    export(model, pte, scheme="qga4w", group_size=32)
    result = runner.invoke(app, ["verify", str(model), str(pte), "--samples", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (blocks,) = [g for g in report["layer_groups"] if g["count"] > 1]
    assert blocks["name"] == f"blocks.{{0..{REPEATED_BLOCKS - 1}}}" and blocks["count"] == REPEATED_BLOCKS
    values = sorted(report["layers"][i]["sqnr_db"] for i in blocks["rows"])
    assert blocks["sqnr_min_db"] == values[0] and values[0] <= blocks["sqnr_median_db"] <= values[-1]
    assert sum(g["count"] for g in report["layer_groups"]) == len(report["layers"])
    grouped = runner.invoke(app, ["verify", str(model), str(pte), "--samples", "2", "--layers"])
    assert grouped.exit_code == 0, grouped.output
    assert f"blocks.{{0..{REPEATED_BLOCKS - 1}}}" in grouped.stdout and f"×{REPEATED_BLOCKS}" in grouped.stdout
    full = runner.invoke(app, ["verify", str(model), str(pte), "--samples", "2", "--all-layers"])
    assert full.exit_code == 0, full.output
    assert all(f"blocks.{i} " in full.stdout for i in range(REPEATED_BLOCKS))


def test_a_merged_projection_splits_into_its_eager_layers():
    from qlower.golden import OpRecord
    from qlower.verify import LayerOutput, match_layers, split_stacked

    op = "et_vk.linear_dq8ca_q4gsw.default"
    qkv = LayerOutput("", torch.arange(2 * 12.0).reshape(1, 2, 12), op, 0, 3)
    o = LayerOutput("", torch.zeros(1, 2, 8), op, 0, 9)
    r_qkv, r_o = OpRecord(0, 3, op, [], None, blob=0), OpRecord(0, 9, op, [], None, blob=0)
    eager = [LayerOutput(f"attn.{name}", torch.zeros(1, 2, n)) for name, n in (("q", 8), ("k", 2), ("v", 2), ("o", 8))]
    parts = {(0, 3): [8, 2, 2]}  # what the file says of op 3 (qlower.verify_sample.file_layers)
    layers, records = split_stacked([qkv, o], [r_qkv, r_o], parts)
    assert [tuple(layer.output.shape) for layer in layers] == [(1, 2, 8), (1, 2, 2), (1, 2, 2), (1, 2, 8)]
    assert records == [r_qkv, r_qkv, r_qkv, r_o]
    assert torch.equal(torch.cat([layer.output for layer in layers[:3]], dim=-1), qkv.output)
    assert match_layers(layers, eager) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # A layer the file does not split stays whole, whatever the eager layers' widths; so does one of another delegate.
    same = LayerOutput("", torch.zeros(1, 2, 12), op, 0, 3)
    assert len(split_stacked([same], [OpRecord(0, 3, op, [], None, blob=1)], parts)[0]) == 1
    assert len(split_stacked([o], [r_o], parts)[0]) == 1


def test_sample_pairs_each_part_of_a_merged_op_with_its_layer():
    from types import SimpleNamespace

    from qlower.errors import VerifyError
    from qlower.verify_sample import pair_layers

    def plan(name, n, k=64, kind="linear"):
        return SimpleNamespace(name=name, n=n, k=k, kind=kind, quantized=True)

    plans = [plan("q", 64), plan("k", 16), plan("v", 16), plan("o", 64)]
    # The merged op's parts (read from the file: its view to heads and the slices after it) have widths 64, 16, 16;
    # its N (96) is also the shape of an unrelated layer, which must not be taken for it.
    plans.append(plan("gate", 96))
    ops = [{"kind": "linear", "n": 96, "k": 64, "op": "et_vk.linear_dq8ca_q4gsw.default", "parts": [64, 16, 16]},
           {"kind": "linear", "n": 64, "k": 64, "op": "et_vk.linear_dq8ca_q4gsw.default", "parts": None},
           {"kind": "linear", "n": 96, "k": 64, "op": "et_vk.linear_dq8ca_q4gsw.default", "parts": None}]
    pairs = pair_layers(ops, plans)
    assert [(p.name, op.get("columns")) for op, p in pairs] == [
        ("q", (0, 64)), ("k", (64, 80)), ("v", (80, 96)), ("o", None), ("gate", None)]
    with pytest.raises(VerifyError):
        pair_layers(ops[:1], plans)  # o and gate left unpaired
