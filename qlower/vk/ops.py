"""Fused ET-VK ops computed by qlower's Vulkan kernels (``verify --device vulkan``).

``run_op(op, args)`` takes an operator call as the VkGraph records it: the
op's qualified name and its inputs in schema order (tensors as numpy arrays or
torch tensors, scalars as Python values), and returns the output as numpy.
"""

from __future__ import annotations

import numpy as np

from qlower.errors import DeviceError
from qlower.vk.device import Device, open_device
from qlower.vk.kernels import LinearQta8aQga4w, Q8taLinear, _np

# Qualified op name -> qlower kernel family.
OPS = {
    "et_vk.linear_dq8ca_q4gsw.default": "linear_qta8a_qga4w",
    "et_vk.q8ta_linear.default": "q8ta_linear",
    "et_vk.q8ta_linear_gemv.default": "q8ta_linear",
}
# Float outputs are compared against the golden executor with this relative
# tolerance (of the output's max magnitude): only summation order differs.
FLOAT_RTOL = 1e-4
# Requantized int8 outputs may differ by one step where y / scale lands within
# float rounding of a .5 tie.
INT8_ATOL = 1


def _qualified(op: str) -> str:
    op = op if op.startswith("et_vk.") else f"et_vk.{op}"
    return op if op.endswith(".default") else f"{op}.default"


def supports(op: str) -> bool:
    return _qualified(op) in OPS


def build_layer(dev: Device, op: str, args):
    """Upload (and prepack) one fused layer's constants; returns (layer, family)."""
    kind = OPS.get(_qualified(op))
    if kind is None:
        raise DeviceError(f"no Vulkan kernel in qlower for {op}", f"supported: {sorted(OPS)}")
    if kind == "linear_qta8a_qga4w":
        x, _, _, weights, sums, scales, group_size = args[:7]
        bias = args[7] if len(args) > 7 else None
        k = int(_np(scales).shape[0]) * int(group_size)
        if x is not None and hasattr(x, "shape") and x.shape[-1] != k:
            raise DeviceError(f"{op}: input K={x.shape[-1]} but the weight covers K={k}")
        return LinearQta8aQga4w(dev, weights, sums, scales, int(group_size), bias, k=k), kind
    _, xs, xz, weights, sums, scales, os_, oz = args[:8]
    bias = args[8] if len(args) > 8 else None
    act = args[9] if len(args) > 9 else "none"
    return Q8taLinear(dev, weights, sums, scales, float(xs), int(xz), float(os_), int(oz), bias, act), kind


def run_op(op: str, args, device: Device | str | int | None = None) -> np.ndarray:
    """Compute one fused op on the Vulkan device; returns float32 or int8."""
    dev = device if isinstance(device, Device) else open_device(device)
    try:
        layer, kind = build_layer(dev, op, args)
        if kind == "linear_qta8a_qga4w":
            x = _np(args[0])
            dtype = "fp16" if x.dtype == np.float16 else "fp32"
            return layer(x.astype(np.float32) if dtype == "fp32" else x, args[1], args[2], dtype=dtype)
        return layer(args[0])
    finally:
        if dev is not device:
            dev.close()
