"""qlower's Vulkan kernels against exact integer references, on any Vulkan
device (lavapipe in CI), plus the checks that the shipped SPIR-V matches its
sources.

Kernel tests skip when no Vulkan device can be opened, unless
QLOWER_REQUIRE_VULKAN=1 (CI sets it), where they fail instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlower.errors import DeviceError
from qlower.shaders import SPV_DIR, load_manifest
from qlower.shaders import build as shader_build

INT8_ATOL = 1          # requantized int8 may round the other way at a float tie
FLOAT_RTOL = 1e-5      # fp32 output, relative to the output's max magnitude
FP16_RTOL = 2e-3       # fp16 output: one half-precision rounding


# ---------------------------------------------------------------------------
# Serialized operands (DESIGN §4), via qlower.pack when present
# ---------------------------------------------------------------------------
def _ceil(a, b):
    return -(-a // b) * b


def _pack_np(w: np.ndarray, scales: np.ndarray, group_size: int):
    """(packed uint8 [N, K8/2], sums int32 [G, N8], scales [G, N4]) in numpy."""
    n, k = w.shape
    u = np.full((n, _ceil(k, 8)), 8, np.uint8)
    u[:, :k] = (w + 8).astype(np.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    g = k // group_size
    sums = np.zeros((g, _ceil(n, 8)), np.int32)
    sums[:, :n] = w.reshape(n, g, group_size).sum(2).T
    sc = np.zeros((g, _ceil(n, 4)), np.float32)
    sc[:, :n] = scales.T
    return packed, sums, sc


def serialize_q4(w: np.ndarray, scales: np.ndarray, group_size: int):
    try:
        import torch
        from qlower import pack
    except ImportError:
        return _pack_np(w, scales, group_size)
    wt = torch.from_numpy(w.astype(np.int8))
    return (
        pack.pack_int4(wt).numpy(),
        pack.group_sums(wt, group_size).numpy(),
        pack.pack_group_scales(torch.from_numpy(scales)).numpy(),
    )


def test_local_packing_matches_qlower_pack():
    pack = pytest.importorskip("qlower.pack")
    import torch

    rng = np.random.default_rng(3)
    w = rng.integers(-8, 8, (13, 40)).astype(np.int8)
    s = rng.uniform(0.1, 1, (13, 5)).astype(np.float32)
    mine = _pack_np(w, s, 8)
    theirs = (
        pack.pack_int4(torch.from_numpy(w)).numpy(),
        pack.group_sums(torch.from_numpy(w), 8).numpy(),
        pack.pack_group_scales(torch.from_numpy(s)).numpy(),
    )
    for a, b in zip(mine, theirs):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Exact references
# ---------------------------------------------------------------------------
def quantize_per_token(x, scale, zp):
    inv = (np.float32(1) / scale).astype(np.float32)
    return np.clip(np.round((x * inv[:, None]).astype(np.float32)) + zp[:, None], -128, 127).astype(np.int64)


def ref_qta8a_qga4w(x, scale, zp, w, wscales, group_size, bias):
    """Per-token int8 x grouped int4: int64 per-group accumulation, then scales."""
    q = quantize_per_token(x, scale, zp)
    n, k = w.shape
    g = k // group_size
    acc = np.einsum("mgk,ngk->mng", q.reshape(-1, g, group_size), w.reshape(n, g, group_size).astype(np.int64))
    acc -= zp[:, None, None] * w.reshape(n, g, group_size).sum(2)[None]
    y = (acc * wscales[None].astype(np.float64)).sum(2) * scale[:, None]
    return y + (bias[None, :n] if bias is not None else 0)


def ref_q8ta(x, xs, xz, w, ws, os_, oz, bias, relu):
    acc = x.astype(np.int64) @ w.astype(np.int64).T - xz * w.astype(np.int64).sum(1)[None]
    y = acc * (np.float64(np.float32(xs)) * ws[None].astype(np.float64)) + (bias[None] if bias is not None else 0)
    if relu:
        y = np.maximum(y, 0)
    return np.clip(np.round(y * np.float32(1.0 / os_)) + oz, -128, 127).astype(np.int8)


# ---------------------------------------------------------------------------
# Shipped SPIR-V
# ---------------------------------------------------------------------------
def test_shipped_spirv_matches_sources():
    assert shader_build.stale() == [], "run `python -m qlower.shaders.build` and commit spv/"


@pytest.mark.skipif(shutil.which("glslc") is None, reason="glslc not installed")
def test_spirv_rebuilds_identically(tmp_path):
    manifest = load_manifest()["shaders"]
    for var in shader_build.variants():
        out = tmp_path / f"{var['name']}.spv"
        shader_build.compile_variant(var, out)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == manifest[var["name"]]["spv_sha256"], var["name"]


def test_variant_names_follow_grammar():
    names = load_manifest()["shaders"]
    for name, entry in names.items():
        assert name.startswith(entry["kernel"]), name
        assert re.fullmatch(r"[a-z0-9_]+_buffer(_(fp32|fp16|int8|uvec4))?", name), name
        assert (SPV_DIR / f"{name}.spv").exists()
    for kernel in ("linear_qta8a_qga4w_gemv", "linear_qta8a_qga4w_gemm", "qta8a_quantize"):
        for dt in ("fp32", "fp16"):
            assert f"{kernel}_buffer_{dt}" in names


# ---------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev():
    from qlower.vk import open_device

    try:
        d = open_device()
    except DeviceError as e:
        if os.environ.get("QLOWER_REQUIRE_VULKAN") == "1":
            raise
        pytest.skip(f"no Vulkan device: {e.message}")
    yield d
    d.close()


def test_unknown_device_is_a_device_error(dev):
    from qlower.vk import open_device

    with pytest.raises(DeviceError, match="no Vulkan device matches"):
        open_device("no-such-gpu-anywhere")
    with pytest.raises(DeviceError, match="out of range"):
        open_device(99)


def test_missing_bindings_are_a_device_error(monkeypatch):
    from qlower.vk import device

    monkeypatch.setitem(sys.modules, "vulkan", None)  # import fails as if absent
    with pytest.raises(DeviceError) as e:
        device.open_device()
    assert e.value.hint and "vulkan" in e.value.hint


def test_env_var_selects_device(dev, monkeypatch):
    from qlower.vk import ENV_DEVICE, open_device

    monkeypatch.setenv(ENV_DEVICE, dev.name[:6])
    with open_device() as d:
        assert d.name == dev.name


QTA8A_SHAPES = [
    # (M, K, N, group_size): aligned, odd N, K not a multiple of 32, small groups, GEMM
    (1, 256, 64, 32),
    (1, 128, 8, 128),
    (1, 96, 37, 32),
    (1, 40, 7, 8),
    (2, 72, 13, 24),
    (3, 64, 21, 16),
    (5, 256, 33, 64),
    (17, 128, 113, 32),
]


@pytest.mark.parametrize("m,k,n,gs", QTA8A_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_qta8a_qga4w(dev, m, k, n, gs, with_bias):
    from qlower.vk import choose_qparams_per_token, run_linear_qta8a_qga4w

    rng = np.random.default_rng(m * 1000 + k + n)
    w = rng.integers(-8, 8, (n, k)).astype(np.int8)
    wscales = rng.uniform(0.01, 0.1, (n, k // gs)).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 3 + 0.5).astype(np.float32)
    bias = rng.standard_normal(_ceil(n, 4)).astype(np.float32) if with_bias else None
    s, z = choose_qparams_per_token(x)
    packed, sums, sc = serialize_q4(w, wscales, gs)
    y = run_linear_qta8a_qga4w(x, s, z, packed, sums, sc, gs, bias, device=dev)
    ref = ref_qta8a_qga4w(x, s, z, w, wscales, gs, bias)
    assert y.shape == (m, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, atol=FLOAT_RTOL * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("m", [1, 6])
def test_linear_qta8a_qga4w_integer_parts_exact(dev, m):
    """Unit scales and integer activations make every float step exact, so the
    kernel's integer accumulation (and zero-point handling) must match exactly."""
    from qlower.vk import run_linear_qta8a_qga4w

    rng = np.random.default_rng(11)
    k, n, gs = 160, 19, 32
    w = rng.integers(-8, 8, (n, k)).astype(np.int8)
    x = rng.integers(-100, 100, (m, k)).astype(np.float32)
    s, z = np.ones(m, np.float32), rng.integers(-20, 20, m).astype(np.int32)
    packed, sums, sc = serialize_q4(w, np.ones((n, k // gs), np.float32), gs)
    y = run_linear_qta8a_qga4w(x, s, z, packed, sums, sc, gs, device=dev)
    q = np.clip(x.astype(np.int64) + z[:, None], -128, 127)
    np.testing.assert_array_equal(y, (q - z[:, None]) @ w.astype(np.int64).T)


@pytest.mark.parametrize("m,k,n,gs", [(1, 96, 37, 32), (9, 64, 10, 16)])
def test_linear_qta8a_qga4w_fp16(dev, m, k, n, gs):
    from qlower.vk import choose_qparams_per_token, run_linear_qta8a_qga4w

    rng = np.random.default_rng(5)
    w = rng.integers(-8, 8, (n, k)).astype(np.int8)
    wscales = rng.uniform(0.01, 0.1, (n, k // gs)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float16)
    s, z = choose_qparams_per_token(x.astype(np.float32))
    packed, sums, sc = serialize_q4(w, wscales, gs)
    y = run_linear_qta8a_qga4w(x, s, z, packed, sums, sc, gs, device=dev, dtype="fp16")
    ref = ref_qta8a_qga4w(x.astype(np.float32), s, z, w, wscales, gs, None)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), ref, atol=FP16_RTOL * np.abs(ref).max(), rtol=0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 9), n=st.integers(1, 40), groups=st.integers(1, 4),
    gs=st.sampled_from([8, 16, 32, 48, 64]), seed=st.integers(0, 2**16),
)
def test_linear_qta8a_qga4w_property(dev, m, n, groups, gs, seed):
    from qlower.vk import choose_qparams_per_token, run_linear_qta8a_qga4w

    k = groups * gs
    rng = np.random.default_rng(seed)
    w = rng.integers(-8, 8, (n, k)).astype(np.int8)
    wscales = rng.uniform(0.01, 0.1, (n, groups)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    s, z = choose_qparams_per_token(x)
    packed, sums, sc = serialize_q4(w, wscales, gs)
    y = run_linear_qta8a_qga4w(x, s, z, packed, sums, sc, gs, device=dev)
    ref = ref_qta8a_qga4w(x, s, z, w, wscales, gs, None)
    np.testing.assert_allclose(y, ref, atol=FLOAT_RTOL * max(np.abs(ref).max(), 1e-3), rtol=0)


def test_unsupported_group_size_is_a_device_error(dev):
    from qlower.vk import run_linear_qta8a_qga4w

    w = np.zeros((4, 12), np.int8)
    packed, sums, sc = _pack_np(w, np.ones((4, 3), np.float32), 4)
    with pytest.raises(DeviceError, match="multiple of 8"):
        run_linear_qta8a_qga4w(np.zeros((1, 12), np.float32), [1.0], [0], packed, sums, sc, 4, device=dev)


Q8TA_SHAPES = [(1, 64, 8), (1, 260, 37), (2, 4, 1), (3, 96, 21), (9, 128, 13), (33, 64, 64)]


@pytest.mark.parametrize("m,k,n", Q8TA_SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_q8ta_linear(dev, m, k, n, relu):
    from qlower.vk import run_q8ta_linear

    rng = np.random.default_rng(m + k + n)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    ws = rng.uniform(0.001, 0.01, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    xs, xz, os_, oz = 0.05, 3, 0.4, -2
    wsum = np.zeros(_ceil(n, 4), np.int32)
    wsum[:n] = w.astype(np.int32).sum(1)
    y = run_q8ta_linear(x, xs, xz, w, wsum, ws, os_, oz, bias, "relu" if relu else "none", device=dev)
    ref = ref_q8ta(x, xs, xz, w, ws, os_, oz, bias, relu)
    assert y.shape == (m, n) and y.dtype == np.int8
    diff = np.abs(y.astype(int) - ref.astype(int))
    assert diff.max() <= INT8_ATOL
    assert (diff > 0).mean() < 0.01


def test_run_op_by_qualified_name(dev):
    from qlower.vk.ops import run_op, supports

    assert supports("et_vk.linear_dq8ca_q4gsw.default") and supports("q8ta_linear_gemv")
    assert not supports("aten.relu.default")
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (8, 16)).astype(np.int8)
    x = rng.integers(-128, 128, (1, 16)).astype(np.int8)
    ws = np.full(8, 0.01, np.float32)
    args = [x, 0.1, 0, w, w.astype(np.int32).sum(1), ws, 0.5, 0, None, "none"]
    y = run_op("et_vk.q8ta_linear_gemv.default", args, device=dev)
    np.testing.assert_array_equal(y, ref_q8ta(x, 0.1, 0, w, ws, 0.5, 0, None, False))
    with pytest.raises(DeviceError, match="no Vulkan kernel"):
        run_op("aten.relu.default", [x], device=dev)


def test_bench_layers_reports_fractions(dev):
    from qlower.bench import bench_layers, random_qga4w

    packed, sums, sc = random_qga4w(64, 128, 32)
    w8 = np.ones((32, 64), np.int8)
    layers = [
        ("layers.0.q", "et_vk.linear_dq8ca_q4gsw.default", [None, None, None, packed, sums, sc, 32]),
        ("layers.0.o", "et_vk.q8ta_linear.default", [None, 0.1, 0, w8, w8.sum(1, dtype=np.int32),
                                                      np.ones(32, np.float32), 0.5, 0, None, "relu"]),
    ]
    doc = bench_layers(layers, device=dev, repeats=2)
    assert doc["device"] == dev.name and doc["copy_gbps"] > 0
    for row in doc["layers"]:
        assert row["time_us"] > 0 and row["gbps"] > 0 and 0 < row["fraction"]
