"""Faithful CPU references of the fused ET-VK ops (DESIGN §4).

ExecuTorch's own CPU implementations of these ops (``custom_ops_lib``) compute
in float and ignore the activation quantization. The functions here compute
what the GPU kernels compute: activations quantized to int8 with the given
qparams, weights taken as integers, products accumulated exactly in integers
(int64 here; the kernels' int32 never overflows for K < 2**31 / (128 * 128)),
then scaled in float32.

Each op has two layers:

* ``*_int`` functions take unpacked integer weights and unpadded scales/sums,
  so a test can feed them the eager quantized model's own integers;
* the op functions (named as the ops, e.g. :func:`linear_dq8ca_q4gsw`) take
  the operands exactly as the VkGraph stores them (packed, transposed,
  padded), unpack them with :mod:`qlower.pack`, and call the ``*_int`` layer.

``OPS`` maps qualified op names to the op functions, for the golden executor.
"""

from __future__ import annotations

from typing import Any, Callable

import math

import torch

from .pack import (unpack_conv_transposed_weight, unpack_conv_weight, unpack_dw_weight,
                   unpack_group_scales, unpack_int4, unpad)
from .unpack_cache import CACHE

INT8_MIN = -128
INT8_MAX = 127


# --- activation quantization ---------------------------------------------------


def quantize_per_token(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] from float [..., K] with one (scale, zp) per token.

    As torchao's ``quantize_affine`` (and the qta8a shader): ``1/scale`` is
    rounded to float32 once, the product once, then rounded half to even.
    """
    k = x.shape[-1]
    x = x.reshape(-1, k).to(torch.float32)
    inv = (1.0 / scales.reshape(-1, 1).to(torch.float32)).to(torch.float32)
    zp = zero_points.reshape(-1, 1).to(torch.int32)
    return torch.clamp(torch.round(x * inv).to(torch.int32) + zp, INT8_MIN, INT8_MAX).to(torch.int8)


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """int8 from float with one (scale, zp), as ``quantized_decomposed.quantize_per_tensor``."""
    inv = torch.tensor(1.0 / float(scale), dtype=torch.float32)
    q = torch.round(x.to(torch.float32) * inv).to(torch.int32) + int(zero_point)
    return torch.clamp(q, INT8_MIN, INT8_MAX).to(torch.int8)


def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.to(torch.int32) - int(zero_point)).to(torch.float32) * torch.tensor(float(scale), dtype=torch.float32)


# --- integer cores (unpacked operands) -----------------------------------------


def linear_qta8a_qga4w_int(
    xq: torch.Tensor,
    x_scales: torch.Tensor,
    x_zp: torch.Tensor,
    w: torch.Tensor,
    w_sums: torch.Tensor,
    w_scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token int8 activations × group-wise int4 weights → float32 [M, N].

    ``xq`` int8 [M, K]; ``x_scales``/``x_zp`` [M]; ``w`` int8 [N, K] in [-8, 7];
    ``w_sums`` int32 [G, N] (per-group weight sums, used to remove the
    activation zero point after integer accumulation, as the kernel does);
    ``w_scales`` float [N, G]; ``bias`` [N] or None.

        acc[m, n, g] = Σ_k∈g xq[m, k] · w[n, k] − zp[m] · w_sums[g, n]     (integer)
        y[m, n]      = (Σ_g acc[m, n, g] · w_scales[n, g]) · x_scales[m] + bias[n]
    """
    m, k = xq.shape
    n = w.shape[0]
    g = k // group_size
    acc = torch.einsum("mgk,ngk->mng", xq.to(torch.int64).reshape(m, g, group_size), w.to(torch.int64).reshape(n, g, group_size))
    acc = acc - x_zp.to(torch.int64).reshape(m, 1, 1) * w_sums.to(torch.int64).t().reshape(1, n, g)
    y = (acc.to(torch.float32) * w_scales.to(torch.float32).reshape(1, n, g)).sum(dim=2)
    y = y * x_scales.to(torch.float32).reshape(m, 1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def dequantize_qga4w(w: torch.Tensor, w_scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [N, K] of int4 values ``w`` [N, K] with group scales [N, K / group_size]."""
    n, k = w.shape
    g = k // group_size
    return (w.to(torch.float32).reshape(n, g, group_size) * w_scales.to(torch.float32).reshape(n, g, 1)).reshape(n, k)


def linear_qga4w_int(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float activations × group-wise int4 weights: dequantize in float32, then a float matmul."""
    k = w.shape[1]
    wf = dequantize_qga4w(w, w_scales, group_size)
    y = x.reshape(-1, k).to(torch.float32) @ wf.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def linear_q8ta_q8csw_int(
    xq: torch.Tensor,
    x_scale: float,
    x_zp: int,
    w: torch.Tensor,
    w_sums: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-tensor int8 activations × per-channel int8 weights → float32 [M, N].

        acc[m, n] = Σ_k xq[m, k] · w[n, k] − x_zp · w_sums[n]     (integer)
        y[m, n]   = acc[m, n] · (x_scale · w_scales[n]) + bias[n]
    """
    acc = xq.to(torch.int64) @ w.to(torch.int64).t() - int(x_zp) * w_sums.to(torch.int64).reshape(1, -1)
    scale = torch.tensor(float(x_scale), dtype=torch.float32) * w_scales.to(torch.float32)
    y = acc.to(torch.float32) * scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def conv2d_q8ta_q8csw_int(
    xq: torch.Tensor,
    x_scale: float,
    x_zp: int,
    w: torch.Tensor,
    w_sums: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> torch.Tensor:
    """Per-tensor int8 NCHW activations ⊛ per-channel int8 weights [OC, ICg, KH, KW] → float32 NCHW.

        acc[n, oc, y, x] = Σ xq[n, ic, y·s + kh·d − p, x·s + kw·d − p] · w[oc, ic, kh, kw]
                           − x_zp · w_sums[oc]                                   (integer)
        out              = acc · (x_scale · w_scales[oc]) + bias[oc]

    Positions in the padding read ``x_zp`` (the int8 code of 0.0), as the
    shaders do, so the zero-point correction through ``w_sums`` is exact
    there too. The products are summed in float64 on integer values, which
    is exact (|acc| < 2**53 for any kernel that fits a GPU).
    """
    ph, pw = (int(p) for p in padding)
    xp = torch.nn.functional.pad(xq.to(torch.float64), (pw, pw, ph, ph), value=float(int(x_zp)))
    acc = torch.nn.functional.conv2d(xp, w.to(torch.float64), None, list(stride), 0, list(dilation), int(groups))
    acc = acc.round().to(torch.int64) - int(x_zp) * w_sums.to(torch.int64).reshape(1, -1, 1, 1)
    return _scaled_conv_acc(acc, x_scale, w_scales, bias)


def conv_transpose2d_q8ta_q8csw_int(
    xq: torch.Tensor,
    x_scale: float,
    x_zp: int,
    w: torch.Tensor,
    w_sums: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    output_padding,
    groups: int = 1,
) -> torch.Tensor:
    """Per-tensor int8 NCHW activations ⊛ᵀ per-channel int8 weights [IC, OCg, KH, KW] → float32 NCHW.

    As ``q8ta_conv2d_transposed.glsl`` (dilation 1): every output position
    visits every kernel tap and input channel, reading the input at
    ``((y + p − kh) / s, (x + p − kw) / s)`` where that division is exact and
    lands inside the input, and ``x_zp`` everywhere else::

        acc[n, oc, y, x] = Σ_{kh, kw, ic} (xq[n, ic, iy, ix] or x_zp) · w[ic, oc, kh, kw]
                           − x_zp · w_sums[oc]                                   (integer)
        out              = acc · (x_scale · w_scales[oc]) + bias[oc]

    The raw sum is the transposed convolution of ``xq − x_zp`` plus
    ``x_zp · Σ w`` (every tap reads ``x_zp`` or ``x_zp + (xq − x_zp)``),
    summed here in float64 on integers (exact); the stored ``w_sums`` then
    take ``x_zp · Σ w`` back, as on the GPU, so wrong sums show.
    ``output_padding`` only adds output rows and columns, computed the same way.
    """
    xc = xq.to(torch.float64) - float(int(x_zp))
    centred = torch.nn.functional.conv_transpose2d(xc, w.to(torch.float64), None, list(stride), list(padding),
                                                   list(output_padding), int(groups), 1)
    ocg = w.shape[1]
    taps = w.to(torch.int64).reshape(int(groups), -1, ocg, w.shape[2] * w.shape[3]).sum(dim=(1, 3)).reshape(-1)
    raw = centred.round().to(torch.int64) + int(x_zp) * taps.reshape(1, -1, 1, 1)
    acc = raw - int(x_zp) * w_sums.to(torch.int64).reshape(1, -1, 1, 1)
    return _scaled_conv_acc(acc, x_scale, w_scales, bias)


def _scaled_conv_acc(acc: torch.Tensor, x_scale: float, w_scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A q8ta conv's integer accumulator [N, OC, H, W] → float32: ``acc · (x_scale · w_scales[oc]) + bias[oc]``."""
    scale = torch.tensor(float(x_scale), dtype=torch.float32) * w_scales.to(torch.float32)
    y = acc.to(torch.float32) * scale.reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(1, -1, 1, 1)
    return y


def requantize(y: torch.Tensor, output_scale: float, output_zp: int, activation: str = "none") -> torch.Tensor:
    """Float accumulator → int8 output of the q8ta family, with the fused activation."""
    if activation == "relu":
        y = torch.relu(y)
    elif activation != "none":
        raise ValueError(f"unknown fused activation {activation!r}")
    return quantize_per_tensor(y, output_scale, output_zp)


# --- ops, operands as serialized -------------------------------------------------


def _tokens(x: torch.Tensor) -> tuple[torch.Size, int]:
    return x.shape[:-1], x.shape[-1]


def is_gemv(x: torch.Tensor) -> bool:
    """Whether ET-VK runs a linear on ``x`` as a GEMV: one row (size 1 at dim -2), as ``is_gemv`` in its runtime.

    ET-VK's ``linear_dq8ca_q4gsw`` then skips the activation quantization and
    computes weight-only in float (``linear_dq8ca_q4gsw_coop``, the same math
    as ``linear_q4gsw``; ``QuantizeDequantize.cpp`` dispatches no quantize
    node for it): a decode step's linears and an LLM's output projection,
    which sees only the last token.
    """
    return x.dim() >= 2 and x.shape[-2] == 1


def linear_dq8ca_q4gsw(x, input_scales, input_zp, weights, weight_sums, weight_scales, group_size, bias=None):
    """As ET-VK computes it: int8 activations × int4 weights, or weight-only in float for one row (:func:`is_gemv`)."""
    if is_gemv(x):
        return linear_q4gsw(x, weights, weight_scales, group_size, bias)
    lead, k = _tokens(x)
    n = weights.shape[0]
    w = CACHE.get("int4", (weights,), (k,), lambda: unpack_int4(weights, k))
    xq = quantize_per_token(x, input_scales, input_zp)
    sums = weight_sums[:, :n]
    scales = unpack_group_scales(weight_scales, n)
    y = linear_qta8a_qga4w_int(xq, input_scales.reshape(-1), input_zp.reshape(-1), w, sums, scales, int(group_size),
                               unpad(bias, n) if bias is not None else None)
    return y.reshape(*lead, n).to(x.dtype)


def linear_q4gsw(x, weights, weight_scales, group_size, bias=None):
    lead, k = _tokens(x)
    n = weights.shape[0]
    wf = CACHE.get("q4gsw", (weights, weight_scales), (k, int(group_size)),
                   lambda: dequantize_qga4w(unpack_int4(weights, k), unpack_group_scales(weight_scales, n), int(group_size)))
    y = x.reshape(-1, k).to(torch.float32) @ wf.t()
    if bias is not None:
        y = y + unpad(bias, n).to(torch.float32)
    return y.reshape(*lead, n).to(x.dtype)


def linear_q8ta_q8csw(x, input_scale, input_zero_point, weights, weight_sums, weight_scales, bias=None):
    lead, k = _tokens(x)
    n = weights.shape[0]
    xq = quantize_per_tensor(x.reshape(-1, k), input_scale, input_zero_point)
    y = linear_q8ta_q8csw_int(xq, input_scale, input_zero_point, weights, unpad(weight_sums, n), unpad(weight_scales, n),
                              unpad(bias, n) if bias is not None else None)
    return y.reshape(*lead, n).to(x.dtype)


def q8ta_linear(x, input_scale, input_zero_point, weights, weight_sums, weight_scales, output_scale, output_zero_point,
                bias=None, activation="none"):
    lead, k = _tokens(x)
    n = weights.shape[0]
    y = linear_q8ta_q8csw_int(x.reshape(-1, k), input_scale, input_zero_point, weights, unpad(weight_sums, n),
                              unpad(weight_scales, n), unpad(bias, n) if bias is not None else None)
    return requantize(y, output_scale, output_zero_point, activation).reshape(*lead, n)


def q8ta_conv2d(x, input_scale, input_zero_point, weights, weight_sums, weight_scales, output_scale, output_zero_point,
                bias, kernel_size, stride, padding, dilation, groups, activation):
    """q8ta_conv2d and q8ta_conv2d_pw: weights as the [OC, ceil4(KH·KW·ICg)] matrix."""
    oc = weights.shape[0]
    w = unpack_conv_weight(weights, x.shape[1] // int(groups), tuple(kernel_size))
    return _q8ta_conv(x, input_scale, input_zero_point, w, weight_sums, weight_scales, output_scale, output_zero_point,
                      bias, stride, padding, dilation, groups, activation, oc)


def q8ta_conv2d_dw(x, input_scale, input_zero_point, weights, weight_sums, weight_scales, output_scale,
                   output_zero_point, bias, kernel_size, stride, padding, dilation, groups, activation):
    """q8ta_conv2d_dw: weights as [KH, KW, ceil4(C)]."""
    c = x.shape[1]
    w = unpack_dw_weight(weights, c)
    return _q8ta_conv(x, input_scale, input_zero_point, w, weight_sums, weight_scales, output_scale, output_zero_point,
                      bias, stride, padding, dilation, groups, activation, c)


def q8ta_conv2d_transposed(x, input_scale, input_zero_point, weights, weight_sums, weight_scales, output_scale,
                           output_zero_point, bias, kernel_size, stride, padding, output_padding, dilation, groups,
                           activation):
    """q8ta_conv2d_transposed: weights as the conv matrix [OC, ceil4(KH·KW·ICg)] of the unflipped kernel."""
    if any(int(d) != 1 for d in dilation):
        raise ValueError(f"q8ta_conv2d_transposed takes dilation 1 only, got {list(dilation)}")
    oc = weights.shape[0]
    w = unpack_conv_transposed_weight(weights, x.shape[1] // int(groups), tuple(kernel_size), int(groups))
    y = conv_transpose2d_q8ta_q8csw_int(x, input_scale, input_zero_point, w, unpad(weight_sums, oc),
                                        unpad(weight_scales, oc), unpad(bias, oc) if bias is not None else None,
                                        stride, padding, output_padding, groups)
    return requantize(y, output_scale, output_zero_point, activation or "none")


def _q8ta_conv(x, input_scale, input_zero_point, w, weight_sums, weight_scales, output_scale, output_zero_point,
               bias, stride, padding, dilation, groups, activation, oc):
    y = conv2d_q8ta_q8csw_int(x, input_scale, input_zero_point, w, unpad(weight_sums, oc), unpad(weight_scales, oc),
                              unpad(bias, oc) if bias is not None else None, stride, padding, dilation, groups)
    return requantize(y, output_scale, output_zero_point, activation or "none")


def q8ta_relu(x, input_scale, input_zero_point, output_scale, output_zero_point):
    return requantize(dequantize_per_tensor(x, input_scale, input_zero_point), output_scale, output_zero_point, "relu")


def q8ta_add(input_a, input_b, input_a_scale, input_a_zero_point, input_b_scale, input_b_zero_point,
             output_scale, output_zero_point, alpha):
    a = dequantize_per_tensor(input_a, input_a_scale, input_a_zero_point)
    b = dequantize_per_tensor(input_b, input_b_scale, input_b_zero_point)
    return quantize_per_tensor(a + float(alpha) * b, output_scale, output_zero_point)


def unpack_embedding_int4(weight: torch.Tensor, is_linear_weight: bool = False) -> torch.Tensor:
    """uint8 [vocab, dim/2] → int8 [vocab, dim].

    Embedding tables hold the even element in the high nibble
    (``((w[2i] + 8) << 4) | (w[2i+1] + 8)``); a table shared with a linear
    weight uses the linear layout (even element low).
    """
    if is_linear_weight:
        return unpack_int4(weight, weight.shape[1] * 2)
    high = (weight >> 4).to(torch.int16) - 8
    low = (weight & 0x0F).to(torch.int16) - 8
    return torch.stack([high, low], dim=-1).reshape(weight.shape[0], -1).to(torch.int8)


def embedding_q4gsw(weight, weight_scales, group_size, indices, is_linear_weight=False):
    """Group-wise int4 embedding: scales [vocab, dim / group_size]. Only the looked-up rows are unpacked
    (row by row the same values as the whole table's)."""
    flat = indices.reshape(-1).to(torch.int64)
    vocab = weight.shape[0]
    w = unpack_embedding_int4(weight[flat], bool(is_linear_weight))
    dim = w.shape[1]
    groups = dim // int(group_size)
    scales = weight_scales.reshape(vocab, -1)[flat, :groups].to(torch.float32)
    rows = (w.to(torch.float32).reshape(len(flat), groups, -1) * scales.unsqueeze(-1)).reshape(len(flat), dim)
    return rows.reshape(*indices.shape, dim)


def conv_with_clamp(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                    output_min=None, output_max=None):
    """Convolution with a fused clamp (the float conv + relu/hardtanh fusion).

    An unbounded side is serialized as the largest double, which torch.clamp
    cannot convert to float32; it is clipped to the dtype's range.
    """
    y = torch.convolution(x, weight, bias, stride, padding, dilation, bool(transposed), output_padding, int(groups))
    info = torch.finfo(y.dtype)
    lo = None if output_min is None else max(float(output_min), info.min)
    hi = None if output_max is None else min(float(output_max), info.max)
    return y if lo is None and hi is None else torch.clamp(y, lo, hi)


def sdpa_with_kv_cache(q, k, v, k_cache, v_cache, start_pos, seq_len=None, attn_mask=None, dropout_p=0.0,
                       is_causal=True, scale=None):
    """ET-VK's fused KV-cache attention; writes ``k``/``v`` into the caches in place.

    ``q [1, T, Hq, D]``, ``k, v [1, T, Hkv, D]``, caches ``[1, S, Hkv, D]``.
    As the Vulkan op: rows ``start_pos .. start_pos+T`` of each cache are
    overwritten, then query ``i`` attends causally to cache positions
    ``0 .. start_pos+i`` with scale ``1/sqrt(D)`` (the op ignores ``seq_len``
    and takes no mask, no dropout and no other scale). Query heads are grouped
    over the key/value heads (``Hq / Hkv`` queries share one).
    """
    if attn_mask is not None or (dropout_p or 0.0) != 0.0 or scale is not None or is_causal is False:
        raise ValueError("ET-VK's sdpa_with_kv_cache takes no mask, dropout, custom scale or non-causal attention")
    start = int(start_pos)
    t, hq, d = q.shape[1], q.shape[2], q.shape[3]
    hkv = k.shape[2]
    if start < 0 or start + t > k_cache.shape[1]:
        raise ValueError(f"positions {start}..{start + t - 1} are outside the cache of {k_cache.shape[1]}")
    k_cache[:, start:start + t] = k.to(k_cache.dtype)
    v_cache[:, start:start + t] = v.to(v_cache.dtype)
    context = start + t
    keys = k_cache[0, :context].float().repeat_interleave(hq // hkv, dim=1)  # [S', Hq, D]
    values = v_cache[0, :context].float().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("thd,shd->hts", q[0].float(), keys) / math.sqrt(d)
    allowed = torch.arange(context).unsqueeze(0) <= (start + torch.arange(t)).unsqueeze(1)  # [T, S']
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), values)
    return out.unsqueeze(0).to(q.dtype)


def select_as_symint(x, dim, index):
    """A tensor element read as an integer (ET-VK's ``select_copy`` + ``item`` fusion)."""
    return int(x.select(dim, index).item())


# --- qlower's own runtime ops (qlower/vkops; the op library in runtime/) -------------


def rms_norm(x, weight, eps):
    """``x * rsqrt(mean(x², -1) + eps) * weight``, accumulated in float32, as ET-VK's ``rms_norm``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + float(eps)) * weight.float()
    return y.to(x.dtype)


def stock_linear_call(x, weights, weight_sums, weight_scales, group_size, bias=None, quantize_input=True
                      ) -> tuple[str, list]:
    """(stock op, its operands as serialized) that qlower's runtime linear computes its layer output as:
    ``choose_qparams_affine`` per token then ``linear_dq8ca_q4gsw`` (which is weight-only in float on one row,
    :func:`is_gemv`), or ``linear_q4gsw`` when ``quantize_input`` is off."""
    if not quantize_input:
        return "et_vk.linear_q4gsw.default", [x, weights, weight_scales, group_size, bias]
    scales = zps = None  # one row: linear_dq8ca_q4gsw computes weight-only and never reads them
    if not is_gemv(x):
        block = [1] * (x.dim() - 1) + [x.shape[-1]]  # per token, as quantized_linear.per_token_qparams_args
        scales, zps = torch.ops.torchao.choose_qparams_affine(x, "ASYMMETRIC", block, torch.int8, INT8_MIN, INT8_MAX,
                                                              None, None, torch.int8)
    return "et_vk.linear_dq8ca_q4gsw.default", [x, scales, zps, weights, weight_sums, weight_scales, group_size, bias]


def dynamic_linear_q4gsw(x, weights, weight_sums, weight_scales, group_size, bias=None, quantize_input=True):
    """An int4 linear as ET-VK's stock ops compute it (:func:`stock_linear_call`)."""
    name, args = stock_linear_call(x, weights, weight_sums, weight_scales, group_size, bias, quantize_input)
    return OPS[name](*args)


def linear_epilogue(y, residual=None, epilogue="none"):
    """What qlower's runtime linear does after the layer: ``"silu_mul"`` (gate rows stacked over up rows, N = 2F:
    ``silu(y[..., :F]) * y[..., F:]``) or ``"none"``, then ``+ residual``."""
    if epilogue == "silu_mul":
        f = y.shape[-1] // 2
        y = torch.nn.functional.silu(y[..., :f]) * y[..., f:]
    elif epilogue != "none":
        raise ValueError(f"unknown linear epilogue {epilogue!r} (known: {', '.join(EPILOGUES)})")
    return y if residual is None else y + residual


def split_heads(y, split_sizes, head_dim):
    """``y``'s columns cut into parts, each viewed as ``[..., n_i / head_dim, head_dim]``."""
    head_dim = int(head_dim)
    return [part.reshape(*part.shape[:-1], part.shape[-1] // head_dim, head_dim).contiguous()
            for part in torch.split(y, [int(n) for n in split_sizes], dim=-1)]


EPILOGUES = ("none", "silu_mul")


def qlower_linear_q4gsw(x, weights, weight_sums, weight_scales, group_size, bias=None, residual=None,
                        quantize_input=True, epilogue="none"):
    """``qlower.linear_q4gsw``: :func:`dynamic_linear_q4gsw`, then :func:`linear_epilogue`."""
    y = dynamic_linear_q4gsw(x, weights, weight_sums, weight_scales, group_size, bias, quantize_input)
    return linear_epilogue(y, residual, epilogue)


def qlower_linear_q4gsw_split(x, weights, weight_sums, weight_scales, group_size, bias=None, quantize_input=True,
                              split_sizes=(), head_dim=1):
    """``qlower.linear_q4gsw_split``: one int4 linear whose output columns are cut into parts, each viewed as
    heads (a merged Q/K/V projection): :func:`dynamic_linear_q4gsw`, then :func:`split_heads`."""
    y = dynamic_linear_q4gsw(x, weights, weight_sums, weight_scales, group_size, bias, quantize_input)
    return split_heads(y, split_sizes, head_dim)


# qlower's runtime linears as a stock layer op and what follows it: op → (where its quantize_input flag is
# among the operands after the first six, which are stock_linear_call's; the rest → the op's result).
RUNTIME_LINEARS: dict[str, tuple[int, Callable]] = {
    "qlower.linear_q4gsw.default": (1, lambda y, residual, quantize_input, epilogue:
                                    linear_epilogue(y, residual, epilogue)),
    "qlower.linear_q4gsw_split.default": (0, lambda y, quantize_input, split_sizes, head_dim:
                                          split_heads(y, split_sizes, head_dim)),
}


def runtime_linear_steps(name: str, args: list) -> tuple[str, list, Callable[[torch.Tensor], Any]]:
    """A qlower runtime linear as (stock layer op, its operands, layer output → the op's result)."""
    flag_at, after = RUNTIME_LINEARS[name]
    rest = args[6:]
    stock, stock_args = stock_linear_call(*args[:6], quantize_input=bool(rest[flag_at]))
    return stock, stock_args, lambda y: after(y, *rest)


# Quantized et_vk ops → qlower's references (operands as serialized).
OPS: dict[str, Callable] = {
    "llama.sdpa_with_kv_cache.default": sdpa_with_kv_cache,
    "et_vk.select_as_symint.default": select_as_symint,
    "et_vk.linear_dq8ca_q4gsw.default": linear_dq8ca_q4gsw,
    "et_vk.linear_q4gsw.default": linear_q4gsw,
    "et_vk.linear_q8ta_q8csw.default": linear_q8ta_q8csw,
    "et_vk.q8ta_linear.default": q8ta_linear,
    "et_vk.q8ta_linear_gemv.default": q8ta_linear,
    "et_vk.q8ta_conv2d.default": q8ta_conv2d,
    "et_vk.q8ta_conv2d_pw.default": q8ta_conv2d,
    "et_vk.q8ta_conv2d_dw.default": q8ta_conv2d_dw,
    "et_vk.q8ta_conv2d_transposed.default": q8ta_conv2d_transposed,
    "et_vk.q8ta_relu.default": q8ta_relu,
    "et_vk.q8ta_add.default": q8ta_add,
    "et_vk.embedding_q4gsw.default": embedding_q4gsw,
    "et_vk.conv_with_clamp.default": conv_with_clamp,
    "qlower.rms_norm.default": rms_norm,
    "qlower.linear_q4gsw.default": qlower_linear_q4gsw,
    "qlower.linear_q4gsw_split.default": qlower_linear_q4gsw_split,
    "qlower.sdpa_with_kv_cache.default": sdpa_with_kv_cache,
}

# Float et_vk ops whose ExecuTorch CPU implementation computes what the
# shader computes (no quantization inside), so torch.ops.et_vk runs them.
FLOAT_ET_VK_OPS = frozenset({
    "et_vk.rms_norm.default",
    "et_vk.sdpa.default",
    "et_vk.apply_rotary_emb.default",
    "et_vk.apply_rotary_emb_hf.default",
    "et_vk.apply_rotary_emb_interleaved.default",
    "et_vk.prepack.default",  # copies a constant into a GPU tensor: the identity on values
})

# Ops whose output is one linear layer's output (for per-layer comparison).
LINEAR_OPS = frozenset({
    "et_vk.linear_dq8ca_q4gsw.default",
    "et_vk.linear_q4gsw.default",
    "et_vk.linear_q8ta_q8csw.default",
    "et_vk.q8ta_linear.default",
    "et_vk.q8ta_linear_gemv.default",
    "aten.linear.default",
})

# Ops whose output is one convolution layer's output (int8, requantized).
CONV_OPS = frozenset({
    "et_vk.q8ta_conv2d.default",
    "et_vk.q8ta_conv2d_pw.default",
    "et_vk.q8ta_conv2d_dw.default",
    "et_vk.q8ta_conv2d_transposed.default",
})

# Where the q8ta layer ops with int8 in and out keep their fused activation string.
ACTIVATION_ARG = {
    "et_vk.q8ta_linear.default": 9,
    "et_vk.q8ta_linear_gemv.default": 9,
    **{op: 14 for op in CONV_OPS},
    "et_vk.q8ta_conv2d_transposed.default": 15,  # output_padding comes before dilation
}

# Every op verify compares layer by layer.
LAYER_OPS = LINEAR_OPS | CONV_OPS
