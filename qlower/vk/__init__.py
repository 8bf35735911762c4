"""Vulkan harness and the runners for qlower's fused kernels.

Importing this package needs nothing; opening a device needs the ``vulkan``
package and a Vulkan loader, and raises ``DeviceError`` when either is missing.
"""

from qlower.vk.device import ENV_DEVICE, Device, list_devices, open_device
from qlower.vk.kernels import (
    LinearQta8aQga4w,
    Q8taLinear,
    choose_qparams_per_token,
    run_linear_qta8a_qga4w,
    run_q8ta_linear,
)

__all__ = [
    "ENV_DEVICE", "Device", "list_devices", "open_device", "LinearQta8aQga4w", "Q8taLinear",
    "choose_qparams_per_token", "run_linear_qta8a_qga4w", "run_q8ta_linear",
]
