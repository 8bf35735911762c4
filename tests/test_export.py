"""qlower export end to end: schemes on the bundled examples, JSON, determinism, atomic writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import qlower
from qlower import pipeline
from qlower.cli import app
from qlower.pte import read_pte

from .conftest import EXAMPLES, write_model

runner = CliRunner()


def fused_ops_in_file(path: Path) -> Counter:
    """Fused-op histogram decoded straight from the .pte's VkGraph(s)."""
    pte = read_pte(path)
    return Counter(op.short_name for d in pte.vulkan_delegates for op in d.ops if op.name.startswith("et_vk."))


MLP_EXPECTED = {
    "qta8a_qga4w": {"linear_dq8ca_q4gsw": 2},
    "qga4w": {"linear_q4gsw": 2},
    "fp16": {},
    "fp32": {},
}


@pytest.mark.parametrize("scheme", list(MLP_EXPECTED))
def test_mlp_every_scheme(tmp_path, scheme):
    out = tmp_path / "mlp.pte"
    summary = qlower.export(EXAMPLES / "mlp.py", out, scheme=scheme, group_size=64)
    assert out.is_file()
    assert dict(fused_ops_in_file(out)) == MLP_EXPECTED[scheme]
    assert summary["fused_ops"] == MLP_EXPECTED[scheme]
    assert summary["vulkan_partitions"] == 1
    assert summary["cpu_ops"] == {}
    assert summary["layers"]["linear"] == 2
    assert summary["size"]["total"] == out.stat().st_size


def test_mlp_static_int8_with_calibration_file(tmp_path):
    calib = tmp_path / "calib.pt"
    torch.save([(torch.randn(4, 256),) for _ in range(4)], calib)
    out = tmp_path / "mlp.pte"
    summary = qlower.export(EXAMPLES / "mlp.py", out, scheme="q8ta_q8csw", calibration=str(calib))
    fused = fused_ops_in_file(out)
    assert sum(n for op, n in fused.items() if "q8ta" in op and "linear" in op) == 2
    assert summary["fused_ops"] == dict(sorted(fused.items()))


def test_static_without_calibration_warns(tmp_path):
    warnings = []
    qlower.export(EXAMPLES / "mlp.py", tmp_path / "m.pte", scheme="q8ta_q8csw", calibration_batches=2, warn=warnings.append)
    assert any("random batches" in w and "accuracy will suffer" in w for w in warnings)


def test_cli_json_matches_file(tmp_path):
    out = tmp_path / "mlp.pte"
    result = runner.invoke(app, ["export", str(EXAMPLES / "mlp.py"), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout
    assert doc["ok"] is True
    assert doc["fused_ops"] == dict(fused_ops_in_file(out))
    assert doc["layers"]["fused"] == 2 and doc["layers"]["unfused"] == 0
    assert set(doc["timings_s"]) == {"load", "quantize", "export", "fuse", "lower", "serialize"}


def test_cli_human_summary(tmp_path):
    result = runner.invoke(app, ["export", str(EXAMPLES / "mlp.py"), "-o", str(tmp_path / "m.pte"), "--scheme", "qga4w", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert "linear_q4gsw ×2" in result.stdout
    assert "Vulkan partitions: 1" in result.stdout


def test_tiny_llama_with_int4_embeddings(tmp_path, tiny_llama):
    out = tmp_path / "llama.pte"
    summary = qlower.export(tiny_llama, out, scheme="qta8a_qga4w", group_size=32, quantize_embeddings=True)
    fused = fused_ops_in_file(out)
    assert fused["linear_dq8ca_q4gsw"] == 6  # the block's projections (Q/K/V one op) + LM head
    assert fused["embedding_q4gsw"] == 1
    assert summary["layers"]["embeddings_quantized"] == 1


def test_cnn_static_int8(tmp_path):
    out = tmp_path / "cnn.pte"
    qlower.export(EXAMPLES / "cnn.py", out, scheme="q8ta_q8csw", calibration_batches=2)
    fused = fused_ops_in_file(out)
    assert sum(n for op, n in fused.items() if "q8ta" in op and "linear" in op) == 2


def test_static_int8_with_integer_position_ids(tmp_path):
    """Position ids built as arange + 0 (as transformers does) stay integer
    through PT2E: nothing but the linears is rewritten for quantization."""
    model = write_model(tmp_path, """
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(16, 16)

            def forward(self, x):
                positions = torch.arange(x.shape[1]) + 0
                return self.proj(x)[:, positions.flip(0)] * 2

        torch.manual_seed(0)
        model = M().eval()
        example_inputs = (torch.randn(1, 8, 16),)
    """)
    summary = qlower.export(model, tmp_path / "m.pte", scheme="q8ta_q8csw", calibration_batches=2, verify=2)
    assert summary["vulkan_partitions"] == 1 and summary["verification"]["passed"]
    assert sum(n for op, n in fused_ops_in_file(tmp_path / "m.pte").items() if "q8ta" in op and "linear" in op) == 1


def test_cnn_float(tmp_path):
    out = tmp_path / "cnn.pte"
    summary = qlower.export(EXAMPLES / "cnn.py", out, scheme="fp32")
    assert summary["layers"] == {**summary["layers"], "linear": 2, "quantized": 0}


ODD_MODEL = """
class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(100, 64)   # K=100: group size 32 does not divide it
        self.m = nn.Linear(64, 12)    # N=12: not a multiple of 8 (padded sums), fused
        self.b = nn.Linear(64, 7)     # N=7: not a multiple of 4
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h), self.m(h)
model = Odd()
example_inputs = (torch.randn(2, 100),)
"""


def test_odd_shapes_left_float_and_reported(tmp_path):
    path = write_model(tmp_path, ODD_MODEL)
    summary = qlower.export(path, tmp_path / "odd.pte", scheme="qta8a_qga4w", group_size=32)
    plans = {p["name"]: p for p in summary["layer_report"]}
    assert not plans["a"]["quantized"]
    assert plans["a"]["reason"] == "group size 32 does not divide K=100"
    assert plans["m"]["fused_op"] == "linear_dq8ca_q4gsw"
    assert not plans["b"]["quantized"]
    assert plans["b"]["reason"].startswith("N=7 is not a multiple of 4")
    assert summary["layers"]["fused"] == 1 and summary["layers"]["unfused"] == 2


def test_strict_turns_unquantizable_layer_into_error(tmp_path):
    path = write_model(tmp_path, ODD_MODEL)
    result = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "o.pte"), "--group-size", "32", "--strict"])
    assert result.exit_code == 1
    assert "error: layer 'a' cannot take scheme qta8a_qga4w: group size 32 does not divide K=100" in result.stderr
    assert not (tmp_path / "o.pte").exists()


def test_layer_overrides_from_config(tmp_path, tiny_llama):
    config = tmp_path / "c.toml"
    config.write_text('scheme = "qga4w"\ngroup_size = 32\n[layers]\n"output" = "skip"\n"re:layers\\\\.0\\\\.feed_forward\\\\..*" = { group_size = 64 }\n')
    summary = qlower.export(tiny_llama, tmp_path / "l.pte", config=config)
    plans = {p["name"]: p for p in summary["layer_report"]}
    assert plans["output"]["reason"] == "skipped by a per-layer override"
    assert plans["layers.0.feed_forward.w1"]["group_size"] == 64
    assert plans["layers.0.attention.wq"]["group_size"] == 32
    assert summary["fused_ops"]["linear_q4gsw"] == 5  # 7 projections, Q/K/V one op


def test_flags_override_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('scheme = "fp32"\n')
    summary = qlower.export(EXAMPLES / "mlp.py", tmp_path / "m.pte", config=config, scheme="qga4w", group_size=64)
    assert summary["scheme"] == "qga4w"
    assert summary["fused_ops"] == {"linear_q4gsw": 2}


def test_same_inputs_give_identical_bytes(tmp_path):
    a, b = tmp_path / "a.pte", tmp_path / "b.pte"
    qlower.export(EXAMPLES / "mlp.py", a, seed=3)
    qlower.export(EXAMPLES / "mlp.py", b, seed=3)
    assert a.read_bytes() == b.read_bytes()


def test_failed_export_keeps_existing_output(tmp_path, monkeypatch):
    out = tmp_path / "keep.pte"
    out.write_bytes(b"previous contents")

    def broken_lower(job):
        raise qlower.QlowerError("lowering broke", "a hint")

    monkeypatch.setattr(pipeline, "STAGES", [(n, broken_lower if n == "lower" else f) for n, f in pipeline.STAGES])
    with pytest.raises(qlower.QlowerError):
        qlower.export(EXAMPLES / "mlp.py", out)
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pte"]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "new.pte"

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.os, "replace", failing_replace)
    with pytest.raises(qlower.QlowerError, match="No space left"):
        pipeline.write_atomic(out, b"x" * 100)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_loading(tmp_path):
    from safetensors.torch import save_file

    model_file = write_model(tmp_path, "model = nn.Linear(64, 32)\nexample_inputs = (torch.randn(1, 64),)\n")
    state = {"weight": torch.full((32, 64), 0.5), "bias": torch.zeros(32)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    from qlower.loader import load_model

    for ckpt in ("w.safetensors", "w.pt"):
        loaded = load_model(model_file, checkpoint=tmp_path / ckpt)
        assert torch.equal(loaded.module.weight, state["weight"])


def test_export_verify_passes_and_reports(tmp_path):
    out = tmp_path / "mlp.pte"
    result = runner.invoke(app, ["export", str(EXAMPLES / "mlp.py"), "-o", str(out), "--verify", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verification"]["passed"] is True
    assert "verify" in doc["timings_s"]


UNREACHABLE_SQNR_DB = 400.0  # above SQNR_IDENTICAL_DB: no file meets it


def test_export_verify_failure_writes_nothing(tmp_path, monkeypatch):
    import qlower.verify as verify_module

    real = verify_module.thresholds_for
    # A vs-quantized bar no file meets: a defect of the file.
    monkeypatch.setattr(verify_module, "thresholds_for", lambda scheme, *a: real(scheme, None, UNREACHABLE_SQNR_DB))
    out = tmp_path / "mlp.pte"
    result = runner.invoke(app, ["export", str(EXAMPLES / "mlp.py"), "-o", str(out), "--verify"])
    assert result.exit_code == 1
    assert "error: verification failed" in result.stderr and "nothing was written" in result.stderr
    assert not out.exists()


def test_export_verify_writes_despite_quality_unless_a_float_bar_is_given(tmp_path, monkeypatch):
    """What quantization costs against float warns by default; --min-sqnr-float makes it refuse (exit 3)."""
    import dataclasses

    from qlower import metrics

    scheme = "qta8a_qga4w"
    monkeypatch.setitem(metrics.THRESHOLDS, scheme, dataclasses.replace(metrics.THRESHOLDS[scheme], vs_float=UNREACHABLE_SQNR_DB))
    out = tmp_path / "mlp.pte"
    result = runner.invoke(app, ["export", str(EXAMPLES / "mlp.py"), "-o", str(out), "--scheme", scheme, "--verify", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verification"]["defects"] == [] and doc["verification"]["quality"]["below"] is True
    assert "warning: quantization costs" in result.stderr and out.exists()
    out.unlink()
    result = runner.invoke(app, ["export", str(EXAMPLES / "mlp.py"), "-o", str(out), "--scheme", scheme,
                                 "--min-sqnr-float", str(UNREACHABLE_SQNR_DB)])
    assert result.exit_code == 3, result.output
    assert "error: quantization costs" in result.stderr and "nothing was written" in result.stderr
    assert not out.exists()


STACKED_LAYERS = 3


def test_repeated_layers_share_a_row(tmp_path, monkeypatch):
    """examples/llama.py with three blocks: each projection and each attention product of the
    blocks is one row, the block with another group size stays apart; --all-layers and --json list each."""
    model = write_model(tmp_path, f"""
        import importlib.util
        _spec = importlib.util.spec_from_file_location("example_llama", {str(EXAMPLES / "llama.py")!r})
        _llama = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_llama)
        CONFIG = _llama.LlamaConfig(vocab_size=256, dim=64, n_layers={STACKED_LAYERS}, n_heads=2, hidden_dim=128, seq_len=8)

        def make_model():
            return _llama.make_model(CONFIG)

        def make_example_inputs():
            return _llama.make_example_inputs(CONFIG)
    """)
    config = tmp_path / "c.toml"
    config.write_text('scheme = "qga4w"\ngroup_size = 32\n[layers]\n"layers.1.feed_forward.w2" = { group_size = 64 }\n')
    out = tmp_path / "stack.pte"
    result = runner.invoke(app, ["export", str(model), "-o", str(out), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows, groups = doc["layer_report"], doc["layer_groups"]
    assert sorted(i for g in groups for i in g["rows"]) == list(range(len(rows)))
    by_name = {g["name"]: g for g in groups}
    assert by_name["layers.{0..2}.attention.wq"]["count"] == STACKED_LAYERS
    assert by_name["layers.{0,2}.feed_forward.w2"]["group_size"] == 32
    assert by_name["layers.1.feed_forward.w2"]["group_size"] == 64 and by_name["layers.1.feed_forward.w2"]["count"] == 1
    products = [g for g in groups if g["kind"] not in ("linear", "embedding")]
    assert products and all(g["name"] == "layers.{0..2}.attention" and g["count"] == STACKED_LAYERS for g in products)
    assert all(r.get("node") for r in rows if r["kind"] not in ("linear", "embedding"))  # each product keeps its graph node
    # The human summary of the same export, grouped and with --all-layers (rendered from the summary, not exported again).
    monkeypatch.setattr("qlower.api.export", lambda *args, **kwargs: doc)
    grouped = runner.invoke(app, ["export", str(model), "-o", str(out)])
    full = runner.invoke(app, ["export", str(model), "-o", str(out), "--all-layers"])
    assert grouped.exit_code == full.exit_code == 0, grouped.output + full.output
    assert f"layers.{{0..2}}.attention.wq ×{STACKED_LAYERS}" in grouped.stdout and "layers.1.feed_forward.w2 " in grouped.stdout
    assert all(f"layers.{i}.attention.wq " in full.stdout for i in range(STACKED_LAYERS))
    assert len(full.stdout.splitlines()) - len(grouped.stdout.splitlines()) == len(rows) - len(groups) - 1  # less the note
