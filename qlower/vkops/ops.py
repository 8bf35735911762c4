"""The ``qlower::*`` runtime ops for torch (CPU = the references) and for ExecuTorch's Vulkan backend.

Importing this module defines the ops (idempotent); :func:`register_vulkan_features`
tells ET-VK's op registry how their tensors may be stored, which its memory-layout pass
reads. The schemas (:data:`qlower.vkops.SCHEMAS`) are the op library's contract
(``runtime/README.md``): inputs in this order, then the output(s).
"""

from __future__ import annotations

import torch

from .. import references
from . import SCHEMAS

_LIB: torch.library.Library | None = None


def _linear_out(x, weights, epilogue):
    n = weights.shape[0] // 2 if epilogue == "silu_mul" else weights.shape[0]
    return x.new_empty((*x.shape[:-1], n))


def define_ops() -> None:
    """Define ``torch.ops.qlower.{linear_q4gsw, linear_q4gsw_split, rms_norm, sdpa_with_kv_cache}`` once."""
    global _LIB
    if _LIB is not None or hasattr(torch.ops.qlower, "linear_q4gsw"):
        return
    lib = torch.library.Library("qlower", "FRAGMENT")
    for schema in SCHEMAS:
        lib.define(schema)
    impls = {
        "linear_q4gsw": (references.qlower_linear_q4gsw,
                         lambda x, w, s, sc, g, b, r, q, e: _linear_out(x, w, e)),
        "linear_q4gsw_split": (references.qlower_linear_q4gsw_split,
                               lambda x, w, s, sc, g, b, q, sizes, d: [
                                   x.new_empty((*x.shape[:-1], n // d, d)) for n in sizes]),
        "rms_norm": (references.rms_norm, lambda x, w, eps: torch.empty_like(x)),
        "sdpa_with_kv_cache": (references.sdpa_with_kv_cache,
                               lambda q, k, v, kc, vc, pos, n, mask=None, p=0.0, causal=False, scale=None:
                               torch.empty_like(q)),
    }
    for name, (cpu, fake) in impls.items():
        lib.impl(name, cpu, "CPU")
        lib.impl(name, fake, "Meta")
        torch.library.register_fake(f"qlower::{name}", fake, lib=lib)
    _LIB = lib


def edge_ops():
    """The ops as ExecuTorch edge-dialect targets (their VkGraph names are ``qlower.<name>.default``)."""
    define_ops()
    from executorch.exir.dialects._ops import ops as exir_ops

    ns = exir_ops.edge.qlower
    return ns.linear_q4gsw.default, ns.linear_q4gsw_split.default, ns.rms_norm.default, ns.sdpa_with_kv_cache.default


_REGISTERED = False


def register_vulkan_features() -> None:
    """Declare the ops to ET-VK's op registry: activations in contiguous buffers (the library's fast kernels
    read buffers; its fallback serves any storage), constants prepacked by the op, dynamic shapes."""
    global _REGISTERED
    if _REGISTERED:
        return
    from executorch.backends.vulkan import utils
    from executorch.backends.vulkan.op_registry import OpFeatures, update_features

    linear, split, rms, sdpa = edge_ops()
    buf, none = utils.CONTIGUOUS_BUFFER, utils.NO_STORAGE

    @update_features(linear)
    def _linear():
        return OpFeatures(inputs_storage=[buf, none, none, none, none, none, buf, none, none],
                          outputs_storage=[buf], inputs_dtypes=utils.FP_T, supports_resize=True,
                          supports_prepacking=True)

    @update_features(split)
    def _split():
        return OpFeatures(inputs_storage=[buf, none, none, none, none, none, none, none, none],
                          outputs_storage=[buf], inputs_dtypes=utils.FP_T, supports_resize=True,
                          supports_prepacking=True)

    @update_features(rms)
    def _rms():
        return OpFeatures(inputs_storage=[buf, none, none], outputs_storage=[buf], inputs_dtypes=utils.FP_T,
                          supports_resize=True, supports_prepacking=True)

    @update_features(sdpa)
    def _sdpa():
        return OpFeatures(inputs_storage=[buf, buf, buf, none, none, none, none, none, none, none, none],
                          outputs_storage=[buf], inputs_dtypes=utils.FP_T, supports_resize=True,
                          supports_prepacking=True)

    _REGISTERED = True
