"""`qlower bench` and `qlower verify --device vulkan` on a real Vulkan device (lavapipe in CI)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from qlower.cli import app
from qlower.errors import DeviceError

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def vulkan_device():
    from qlower.vk import open_device

    try:
        open_device().close()
    except DeviceError as e:
        if os.environ.get("QLOWER_REQUIRE_VULKAN") == "1":
            raise
        pytest.skip(f"no Vulkan device: {e.message}")


def test_verify_on_device_matches_golden(exported):
    model, pte = exported("mlp", "qta8a_qga4w")
    result = runner.invoke(app, ["verify", str(model), str(pte), "--device", "vulkan", "--samples", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    checks = doc["device_layers"]
    assert [c["op"] for c in checks] == ["linear_dq8ca_q4gsw", "linear_dq8ca_q4gsw"]
    assert all(c["passed"] and c["max_abs_diff"] <= c["tolerance"] for c in checks)


def test_verify_on_device_static_int8(exported):
    model, pte = exported("mlp", "q8ta_q8csw")
    result = runner.invoke(app, ["verify", str(model), str(pte), "--device", "vulkan", "--samples", "1", "--json"])
    assert result.exit_code == 0, result.output
    checks = json.loads(result.stdout)["device_layers"]
    assert checks and all(c["passed"] for c in checks)


def test_bench_reports_every_fused_layer(exported):
    _, pte = exported("mlp", "qta8a_qga4w")
    result = runner.invoke(app, ["bench", str(pte), "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["copy_gbps"] > 0
    assert [(l["n"], l["k"]) for l in doc["layers"]] == [(512, 256), (128, 512)]
    assert all(l["gbps"] > 0 and 0 < l["fraction"] for l in doc["layers"])


def test_bench_without_fused_layers_is_an_error(exported):
    _, pte = exported("mlp", "fp32")
    result = runner.invoke(app, ["bench", str(pte)])
    assert result.exit_code == 1
    assert "has no fused layers" in result.stderr


def test_bench_unknown_device_is_an_error(exported):
    _, pte = exported("mlp", "qta8a_qga4w")
    result = runner.invoke(app, ["bench", str(pte), "--device", "no-such-gpu"])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "Traceback" not in result.output
