"""export --runtime qlower: qlower's runtime ops in the file, their references, and every reader of such a file."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import qlower
from qlower import references
from qlower.cli import app
from qlower.errors import ConfigError
from qlower.golden import GoldenExecutor
from qlower.inspect import inspect_pte
from qlower.loader import load_model
from qlower.metrics import THRESHOLDS, sqnr_db
from qlower.pack import group_sums, pack_group_scales, pack_int4
from qlower.pte import fused_op_histogram, read_pte
from qlower.verify import verify
from qlower.vkops import LIBRARY_OPS

from .conftest import EXAMPLES

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bundled Llama-style model exported for each runtime (no KV cache: every linear is a layer verify sees)."""
    out = {}
    d = tmp_path_factory.mktemp("vkops")
    for runtime in ("stock", "qlower"):
        path = d / f"llama_{runtime}.pte"
        out[runtime] = (path, qlower.export(EXAMPLES / "llama.py", path, runtime=runtime))
    return out


def test_default_export_is_unchanged_for_stock_runtimes(files):
    _, summary = files["stock"]
    assert summary["runtime"] == "stock" and summary["runtime_problems"] == []
    assert not any(op.startswith("qlower.") for op in summary["fused_ops"])


def test_qlower_runtime_file_uses_the_library_ops(files):
    path, summary = files["qlower"]
    stock = files["stock"][1]["fused_ops"]
    ops = summary["fused_ops"]
    assert summary["runtime"] == "qlower" and summary["vulkan_partitions"] == 1 and summary["cpu_ops"] == {}
    # Loads on a runtime with the library (what export checks against) ...
    assert summary["runtime_problems"] == []
    # ... every stock linear became a library op: Q/K/V as one split op, gate/up as one SiLU·mul op.
    blocks = (stock["linear_dq8ca_q4gsw"] - 1) // 5  # merged Q/K/V, O, gate, up, down a block; the head
    assert ops["qlower.linear_q4gsw_split"] == blocks  # Q/K/V straight into heads
    assert ops["qlower.linear_q4gsw"] == 3 * blocks + 1  # O (+ residual), gate/up (SiLU·mul), down (+ residual); the head
    assert ops["qlower.rms_norm"] == stock["rms_norm"]
    assert "linear_dq8ca_q4gsw" not in ops and "rms_norm" not in ops
    assert set(op for op in ops if op.startswith("qlower.")) <= {n.rsplit(".", 1)[0] for n in LIBRARY_OPS}


def test_inspect_names_the_runtime_and_predicts_the_stock_load_failure(files):
    path, _ = files["qlower"]
    report = inspect_pte(path, [])
    assert report["runtime"] == "qlower"
    missing = {p["op"] for p in report["runtime_problems"]}
    assert missing and missing <= LIBRARY_OPS
    assert all(p["message"] == f"Missing operator: {p['op']}" for p in report["runtime_problems"])
    assert inspect_pte(files["stock"][0], [])["runtime"] == "stock"
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0 and "linked with qlower's op library" in result.output


def test_golden_of_both_files_agree_and_verify_checks_each_layer(files):
    loaded = load_model(EXAMPLES / "llama.py")
    inputs = tuple(loaded.example_inputs)
    stock = GoldenExecutor(read_pte(files["stock"][0])).run(inputs)
    ours = GoldenExecutor(read_pte(files["qlower"][0])).run(inputs)
    assert sqnr_db(stock[0].float(), ours[0].float()) > 100
    report = verify(EXAMPLES / "llama.py", files["qlower"][0])
    assert report["passed"]
    stock_report = verify(EXAMPLES / "llama.py", files["stock"][0])
    assert [layer["name"] for layer in report["layers"]] == [layer["name"] for layer in stock_report["layers"]]
    assert all(layer["sqnr_db"] >= THRESHOLDS["qta8a_qga4w"].layer for layer in report["layers"])


def test_unknown_runtime_is_a_config_error():
    with pytest.raises(ConfigError, match="runtime"):
        qlower.export(EXAMPLES / "mlp.py", "x.pte", runtime="vendor")
    result = runner.invoke(app, ["export", str(EXAMPLES / "mlp.py"), "--runtime", "vendor"])
    assert result.exit_code == 2


# --- the references: each op computes what the stock ops it replaces compute --------------------


def _int4_linear(n: int, k: int, group_size: int, gen: torch.Generator):
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // group_size, generator=gen) * 0.02 + 0.001
    return pack_int4(q), group_sums(q, group_size), pack_group_scales(scales), q, scales


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n,k,group_size", [(20, 72, 8), (64, 256, 64)])
def test_linear_reference_is_the_stock_composition(rows, n, k, group_size):
    gen = torch.Generator().manual_seed(n + k + rows)
    w, sums, scales, _, _ = _int4_linear(2 * n, k, group_size, gen)
    x = torch.randn(1, rows, k, generator=gen)
    residual = torch.randn(1, rows, n, generator=gen)
    plain = references.qlower_linear_q4gsw(x, w, sums, scales, group_size)
    if rows == 1:  # one row: weight-only in float, as ET-VK's GEMV
        assert torch.equal(plain, references.linear_q4gsw(x, w, scales, group_size))
    else:
        xs, xz = torch.ops.torchao.choose_qparams_affine(x, "ASYMMETRIC", [1, 1, k], torch.int8, -128, 127, None, None, torch.int8)
        assert torch.equal(plain, references.linear_dq8ca_q4gsw(x, xs, xz, w, sums, scales, group_size))
    fused = references.qlower_linear_q4gsw(x, w, sums, scales, group_size, None, residual, True, "silu_mul")
    assert torch.allclose(fused, torch.nn.functional.silu(plain[..., :n]) * plain[..., n:] + residual)
    parts = references.qlower_linear_q4gsw_split(x, w, sums, scales, group_size, None, True, [n, n // 2, n // 2], 2)
    assert [tuple(p.shape) for p in parts] == [(1, rows, n // 2, 2), (1, rows, n // 4, 2), (1, rows, n // 4, 2)]
    assert torch.equal(torch.cat([p.flatten(-2) for p in parts], -1), plain)


def test_unknown_epilogue_is_refused():
    gen = torch.Generator().manual_seed(0)
    w, sums, scales, _, _ = _int4_linear(8, 16, 8, gen)
    with pytest.raises(ValueError, match="epilogue"):
        references.qlower_linear_q4gsw(torch.randn(1, 2, 16), w, sums, scales, 8, None, None, True, "gelu")


def test_rms_norm_reference():
    x, w = torch.randn(3, 7), torch.randn(7)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(references.rms_norm(x, w, 1e-5), want, atol=1e-6)


def test_runtime_ops_histogram_counts_them_apart_from_et_vk(files):
    hist = fused_op_histogram(read_pte(files["qlower"][0]))
    assert hist["qlower.linear_q4gsw"] > 0 and hist["linear_q4gsw"] == 0
