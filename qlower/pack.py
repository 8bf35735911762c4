"""Pure pack/unpack functions for the constants of the ET-VK quantized linears.

Every function here is pure (no graph, no program), returns a new contiguous
tensor, and produces exactly the bytes that ExecuTorch 1.5.1's Vulkan pattern
pass (``backends/vulkan/patterns/quantized_linear.py``) writes for the same
input, so that a ``.pte`` lowered by qlower and one lowered the stock way hold
identical constants. Each pack function that loses shape information has an
inverse that takes the original size back.

Padding rules (ET-VK 1.5.1, checked against its source; one exception below):

===========================  ==========================  =================
constant                     layout                      padded dim → mult.
===========================  ==========================  =================
int4 weight (q4gsw, dq8ca)   uint8 [N, ceil8(K)/2]       K → 8 (zeros)
int4 group scales            [num_groups, ceil4(N)]      N → 4 (zeros)
int4 group sums (dq8ca)      int32 [num_groups, ceil4(N)] N → 4 (zeros)
int8 weight (q8ta linears)   int8 [N, K]                 none
int8 conv weight (q8ta_conv  int8 [OC, ceil4(KH·KW·ICg)] K → 4 (zeros)
  2d, _pw)                     K ordered (kh, kw, ic)
int8 depthwise weight        int8 [KH, KW, ceil4(OC)]    OC → 4 (zeros)
  (q8ta_conv2d_dw)
int8 transposed conv weight  as the conv weight, from    K → 4 (zeros)
  (q8ta_conv2d_transposed)     [IC, OCg, KH, KW]: the
                               kernel is not flipped
int8 channel scales          [ceil4(N)]                  N → 4 (zeros)
int8 channel sums            int32 [ceil4(N)]            N → 4 (zeros)
bias (every quantized op)    [ceil4(N)]                  N → 4 (zeros)
===========================  ==========================  =================

The exception: ExecuTorch's pattern pass pads the group sums to 8 along N, but
the runtime reads group ``g`` at ``g * ceil4(N)`` (``linear_int_weight_sums_load.glslh``,
``t_weight_sums[quant_group_idx * N4 + n4]``), so with N = 4 mod 8 every group
after the first read the wrong sums on multi-row inputs (measured -5 dB at
N=20). qlower pads them to 4, the stride the runtime reads; for N a multiple of
8 the bytes are ExecuTorch's.

A layer ET-VK computes wrong at its group size is stored at a divisor of it
(``runtime_caps.stored_group_size``): :func:`split_groups` repeats its scales
and its group sums are computed at the stored size.

Padding only ever appends zeros at the end of the last dimension, and a
tensor already aligned is returned unchanged (values and dtype), so applying
a pad twice is harmless; packing int4 twice is not, which is why the fusion
passes track what they have already packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_MIN = -8
INT4_MAX = 7
# Unsigned nibble = signed int4 + INT4_OFFSET.
INT4_OFFSET = 8

INT4_K_ALIGN = 8  # packed int4 weight: K padded to a multiple of this
GROUP_SCALES_N_ALIGN = 4  # transposed group scales: N padded to this
GROUP_SUMS_N_ALIGN = 4  # per-group weight sums: N padded to this (the runtime's row stride)
CHANNEL_N_ALIGN = 4  # per-channel scales / sums and every bias: N padded to this


def ceil_to(x: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``x``."""
    return -(-x // multiple) * multiple


def pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Append zeros along ``dim`` until its size is a multiple of ``multiple``.

    Returns ``t`` itself (same object) when it is already aligned, matching
    ET-VK's ``align_width_and_update_state_dict``, which leaves aligned
    tensors untouched.
    """
    dim = dim % t.dim()
    size = t.shape[dim]
    extra = ceil_to(size, multiple) - size
    if extra == 0:
        return t
    # F.pad lists (left, right) pairs starting from the last dimension.
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return F.pad(t, pad).contiguous()


def is_int4_range(w: torch.Tensor) -> bool:
    """True when ``w`` is an 8-bit integer tensor whose values fit in int4."""
    if w.dtype not in (torch.int8, torch.uint8):
        return False
    if w.numel() == 0:
        return True
    return int(w.min()) >= INT4_MIN and int(w.max()) <= INT4_MAX


def _check_int4(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    if not is_int4_range(w):
        raise ValueError("weights outside the int4 range [-8, 7]")


def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values (held one per int8) two per byte along K.

    ``w``: int8 [N, K], every value in [-8, 7]. K is first zero-padded to a
    multiple of 8; then, for each row and i in [0, ceil8(K)/2)::

        byte[n, i] = ((w[n, 2i+1] + 8) << 4) | (w[n, 2i] + 8)

    i.e. the even K index sits in the low nibble, the odd one in the high
    nibble, both offset to unsigned. A padded zero becomes nibble 0x8.

    Returns uint8 [N, ceil8(K) / 2].
    """
    _check_int4(w)
    w = pad_to(w, 1, INT4_K_ALIGN)
    u = (w.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return ((u[:, 1::2] << 4) | u[:, 0::2]).contiguous()


def packed_int4_width(k: int) -> int:
    """Bytes per row of :func:`pack_int4`'s output for K values."""
    return -(-k // INT4_K_ALIGN) * INT4_K_ALIGN // 2


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, ceil8(k)/2] → int8 [N, k]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("expected a 2-D uint8 packed weight")
    if packed.shape[1] * 2 < k:
        raise ValueError(f"packed width {packed.shape[1]} cannot hold K={k}")
    low = (packed & 0x0F).to(torch.int16) - INT4_OFFSET
    high = (packed >> 4).to(torch.int16) - INT4_OFFSET
    # Interleave back: column 2i from the low nibble, 2i+1 from the high one.
    full = torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)
    return full[:, :k].to(torch.int8).contiguous()


def group_sums(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group sums of the int4 weights, transposed, for ``linear_dq8ca_q4gsw``.

    ``w``: int8 [N, K] (unpacked, unpadded), ``group_size`` divides K.
    ``sums[g, n] = sum(w[n, g*group_size : (g+1)*group_size])``, so the kernel
    can subtract ``input_zp * sums`` after integer accumulation.

    Returns int32 [K / group_size, ceil4(N)], padded columns zero.
    """
    return pack_group_sums(row_group_sums(w, group_size))


def row_group_sums(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """int32 [N, K / group_size]: each row's per-group sums (rows are independent: computable a chunk at a time)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"group size {group_size} does not divide K={k}")
    return w.reshape(n, k // group_size, group_size).sum(dim=2, dtype=torch.int32)


def pack_group_sums(sums: torch.Tensor) -> torch.Tensor:
    """Per-row group sums [N, num_groups] → the fused op's layout [num_groups, ceil4(N)] (padding zero)."""
    return pad_to(sums.t().contiguous(), 1, GROUP_SUMS_N_ALIGN).contiguous()


def pack_group_scales(scales: torch.Tensor) -> torch.Tensor:
    """Transpose per-group scales [N, num_groups] → [num_groups, ceil4(N)].

    Padded columns are zero; the dtype is kept.
    """
    if scales.dim() != 2:
        raise ValueError(f"expected [N, num_groups] scales, got {tuple(scales.shape)}")
    return pad_to(scales.t().contiguous(), 1, GROUP_SCALES_N_ALIGN).contiguous()


def split_groups(scales: torch.Tensor, factor: int) -> torch.Tensor:
    """Per-group scales [N, G] → [N, G * factor]: each group split in ``factor`` equal groups.

    Column ``g * factor + j`` is column ``g``: weights stored at group size
    ``gs / factor`` with these scales dequantize to the same values as at ``gs``.
    """
    if scales.dim() != 2 or factor < 1:
        raise ValueError(f"expected [N, num_groups] scales and a factor >= 1, got {tuple(scales.shape)}, {factor}")
    return scales.repeat_interleave(factor, dim=1).contiguous()


def merge_groups(scales: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`split_groups`: [N, G * factor] → [N, G]; the ``factor`` columns of a group must agree."""
    n, g = scales.shape
    if factor < 1 or g % factor:
        raise ValueError(f"{g} groups cannot merge by {factor}")
    grouped = scales.reshape(n, g // factor, factor)
    if not torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)):
        raise ValueError("scales differ within a merged group")
    return grouped[:, :, 0].contiguous()


def unpack_group_scales(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_group_scales`: [num_groups, ceil4(n)] → [n, num_groups]."""
    return packed[:, :n].t().contiguous()


def channel_sums(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel sums of int8 weights for the q8ta family.

    ``w``: int8 [N, K]. Returns int32 [ceil4(N)], ``sums[n] = sum_k w[n, k]``,
    padded entries zero.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    return pad_to(w.sum(dim=1).to(torch.int32).contiguous(), 0, CHANNEL_N_ALIGN)


def pad_channel_scales(scales: torch.Tensor) -> torch.Tensor:
    """Per-channel weight scales [N] → [ceil4(N)], zero padded, dtype kept."""
    return pad_to(scales, -1, CHANNEL_N_ALIGN)


def pad_bias(bias: torch.Tensor) -> torch.Tensor:
    """Bias [N] → [ceil4(N)], zero padded, dtype kept (every quantized linear)."""
    return pad_to(bias, -1, CHANNEL_N_ALIGN)


def unpad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Drop the padding from the last dimension: inverse of the ``pad_*`` helpers."""
    return t[..., :n].contiguous()


# --- q8ta convolutions ------------------------------------------------------------

CONV_K_ALIGN = 4  # conv weight matrix: KH*KW*ICg padded to this
DW_C_ALIGN = 4  # depthwise weight: channels padded to this


def pack_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 [OC, ICg, KH, KW] → int8 [OC, ceil4(KH*KW*ICg)] (q8ta_conv2d, q8ta_conv2d_pw).

    Row ``oc`` holds the kernel in (kh, kw, ic) order — the im2col order of the
    shaders — then zeros up to a multiple of 4.
    """
    if w.dim() != 4:
        raise ValueError(f"expected a 4-D [OC, ICg, KH, KW] weight, got shape {tuple(w.shape)}")
    oc = w.shape[0]
    return pad_to(w.permute(0, 2, 3, 1).contiguous().reshape(oc, -1), 1, CONV_K_ALIGN).contiguous()


def unpack_conv_weight(packed: torch.Tensor, ic_per_group: int, kernel: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_conv_weight`: back to [OC, ICg, KH, KW]."""
    kh, kw = kernel
    oc = packed.shape[0]
    return packed[:, : kh * kw * ic_per_group].reshape(oc, kh, kw, ic_per_group).permute(0, 3, 1, 2).contiguous()


def transposed_to_conv_layout(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A transposed conv's int8 weight [IC, OCg, KH, KW] → [OC, ICg, KH, KW], the kernel not flipped.

    ``q8ta_conv2d_transposed`` reads ``w[oc, ic, kh, kw]`` for the input at
    ``(oy + p − kh) / s`` (no flip, unlike the equivalent direct conv), so
    only the channel axes move: group ``g`` holds input channels
    ``g·ICg … (g+1)·ICg − 1`` and output channels ``g·OCg …``.
    """
    if w.dim() != 4 or w.shape[0] % groups:
        raise ValueError(f"expected a 4-D [IC, OC/groups, KH, KW] weight with IC divisible by {groups}, got {tuple(w.shape)}")
    ic, ocg, kh, kw = w.shape
    icg = ic // groups
    return w.reshape(groups, icg, ocg, kh, kw).transpose(1, 2).reshape(groups * ocg, icg, kh, kw).contiguous()


def conv_layout_to_transposed(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`transposed_to_conv_layout`: [OC, ICg, KH, KW] → [IC, OCg, KH, KW]."""
    oc, icg, kh, kw = w.shape
    ocg = oc // groups
    return w.reshape(groups, ocg, icg, kh, kw).transpose(1, 2).reshape(groups * icg, ocg, kh, kw).contiguous()


def pack_conv_transposed_weight(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """int8 [IC, OCg, KH, KW] → int8 [OC, ceil4(KH*KW*ICg)] (q8ta_conv2d_transposed): the conv matrix layout."""
    return pack_conv_weight(transposed_to_conv_layout(w, groups))


def unpack_conv_transposed_weight(packed: torch.Tensor, ic_per_group: int, kernel: tuple[int, int], groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_conv_transposed_weight`: back to [IC, OCg, KH, KW]."""
    return conv_layout_to_transposed(unpack_conv_weight(packed, ic_per_group, kernel), groups)


def pack_dw_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 [C, 1, KH, KW] → int8 [KH, KW, ceil4(C)] (q8ta_conv2d_dw), channels last, zero padded."""
    if w.dim() != 4 or w.shape[1] != 1:
        raise ValueError(f"expected a depthwise [C, 1, KH, KW] weight, got shape {tuple(w.shape)}")
    c, _, kh, kw = w.shape
    return pad_to(w.permute(2, 3, 1, 0).contiguous().reshape(kh, kw, c), 2, DW_C_ALIGN).contiguous()


def unpack_dw_weight(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_dw_weight`: back to [C, 1, KH, KW]."""
    kh, kw, _ = packed.shape
    return packed[:, :, :channels].permute(2, 0, 1).reshape(channels, 1, kh, kw).contiguous()


def conv_channel_sums(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel sums of an int8 conv weight [OC, ICg, KH, KW] → int32 [ceil4(OC)]."""
    return pad_to(w.reshape(w.shape[0], -1).sum(dim=1).to(torch.int32).contiguous(), 0, CHANNEL_N_ALIGN)
