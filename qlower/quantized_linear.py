"""One graph node per quantized linear, from the quantize stage to the fuse stage.

torchao's quantized weights (``IntxUnpackedToInt8Tensor``) make every linear a
chain of torchao ops in the exported graph: choose_qparams → quantize →
dequantize of the input (dynamic scheme), dequantize of the weight, linear.
Each of those ops is decomposed on fake tensors every time ``torch.export``,
the decomposition and each ExecuTorch pass re-traces the graph, which is
most of the export time of a quantized decoder.

:class:`QuantizedLinear` takes torchao's int values, scales and zero points
and calls ``qlower::quantized_linear`` instead: one opaque op with a shape-only
fake kernel and, on real tensors, exactly the torchao calls the subclass makes
(tested bit for bit). The fuse stage replaces it by the ET-VK fused op
(:mod:`qlower.patterns.linear`). A layer the fused ops cannot take keeps the
explicit torchao chain, which the fuse stage reports as unfused with the
reason.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ExportError

OP = "qlower::quantized_linear"


def int_range(dtype: torch.dtype) -> tuple[int, int]:
    """Signed range of torch.int1 … torch.int8 (torchao's bounds for them)."""
    bits = int(str(dtype).removeprefix("torch.int"))
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def act_block_size(x: torch.Tensor) -> list[int]:
    """Per-token block: one scale per row of the last dimension."""
    return [1] * (x.dim() - 1) + [x.shape[-1]]


def per_token_qparams_args(x, x_value: torch.Tensor) -> tuple:
    """``torchao::choose_qparams_affine`` arguments for per-token asymmetric int8 of ``x``.

    ``x`` is the tensor, or its graph node with ``x_value`` its (fake) value.
    """
    qmin, qmax = int_range(torch.int8)
    return (x, "ASYMMETRIC", act_block_size(x_value), torch.int8, qmin, qmax, None, None, torch.int8)


def torchao_linear(x, weight, weight_scale, weight_zero_point, block_size: list[int], weight_bits: int,
                   dynamic_activations: bool, bias, dtype: torch.dtype) -> torch.Tensor:
    """What torchao's IntxUnpackedToInt8Tensor linear computes, op for op.

    The torchao ops are called directly: their Python wrappers run under
    no_grad, which export records as a higher-order op around each call.
    """
    if dynamic_activations:
        x = _int8_per_token(x)
    return nn.functional.linear(x, dequantized_weight(weight, block_size, weight_scale, weight_zero_point, weight_bits, dtype), bias)


def _int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to per-token asymmetric int8 and back (torchao's ops)."""
    ops = torch.ops.torchao
    block = act_block_size(x)
    qmin, qmax = int_range(torch.int8)
    scale, zero_point = ops.choose_qparams_affine(*per_token_qparams_args(x, x))
    q = ops.quantize_affine(x, block, scale, zero_point, torch.int8, qmin, qmax)
    return ops.dequantize_affine(q, block, scale, zero_point, torch.int8, qmin, qmax, output_dtype=x.dtype)


def dequantized_weight(weight, block_size: list[int], weight_scale, weight_zero_point, weight_bits: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """torchao's dequantization of the int values ``weight`` (one op)."""
    qmin, qmax = int_range(getattr(torch, f"int{weight_bits}"))
    return torch.ops.torchao.dequantize_affine(weight, block_size, weight_scale, weight_zero_point, torch.int8, qmin, qmax,
                                               output_dtype=dtype)


# Bytes of float weight rows dequantized at once by the op on real tensors (bounds its temporaries).
DEQUANTIZE_BYTES = 8 << 20


def _dequantized_rows(weight, in_features: int, block_size: list[int], weight_scale, weight_zero_point,
                      weight_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantized_weight` of int values or packed int4 ``weight``, made a slab of rows at a time
    into the final buffer: each element is the same (every step is elementwise), and the temporaries
    (unpacked int8, torchao's float copies) are a slab's, not the whole weight's."""
    from .pack import unpack_int4

    def rows(start: int, end: int) -> torch.Tensor:
        part = weight[start:end]
        if part.dtype == torch.uint8:
            part = unpack_int4(part, in_features)
        return dequantized_weight(part, block_size, weight_scale[start:end], weight_zero_point[start:end], weight_bits, dtype)

    n = weight.shape[0]
    step = max(1, DEQUANTIZE_BYTES // (4 * max(1, in_features)))
    if block_size[0] != 1 or step >= n:
        return rows(0, n)
    out = torch.empty(n, in_features, dtype=dtype)
    for start in range(0, n, step):
        out[start:start + step] = rows(start, start + step)
    return out


@torch.library.custom_op(OP, mutates_args=())
def quantized_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     weight_zero_point: torch.Tensor, block_size: list[int], weight_bits: int,
                     dynamic_activations: bool, bias: torch.Tensor | None, dtype: torch.dtype,
                     weight_sums: torch.Tensor | None = None) -> torch.Tensor:
    """``weight``: the int values, or (uint8) int4 values packed two per byte along K (``pack.pack_int4``).

    ``weight_sums``: the per-group sums of the int values in the fused op's layout
    (``pack.group_sums``), computed when the weight was quantized so that the fuse
    stage never unpacks a weight; not needed to compute the output.

    A dynamic-activation linear on one row computes weight-only, as ET-VK's
    runtime does for a GEMV (:func:`qlower.references.is_gemv`), so the eager
    quantized model computes what the file computes on the device.
    """
    from .references import is_gemv

    if dynamic_activations and not (weight_bits == 4 and is_gemv(x)):
        x = _int8_per_token(x)
    w = _dequantized_rows(weight, x.shape[-1], block_size, weight_scale, weight_zero_point, weight_bits, dtype)
    return nn.functional.linear(x, w, bias)


@quantized_linear.register_fake
def _(x, weight, weight_scale, weight_zero_point, block_size, weight_bits, dynamic_activations, bias, dtype,
      weight_sums=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class QuantizedLinear(nn.Module):
    """A torchao-quantized linear as plain tensors and one ``qlower::quantized_linear`` call."""

    def __init__(self, qdata, scale, zero_point, block_size, weight_bits: int, dtype: torch.dtype, bias,
                 dynamic_activations: bool, opaque: bool, in_features: int | None = None, weight_sums=None):
        """``qdata``: int8 values [N, K], or int4 values already packed (uint8, ``in_features`` then says K)
        with their ``weight_sums`` (dynamic activations)."""
        super().__init__()
        self.in_features = int(in_features if in_features is not None else qdata.shape[1])
        if opaque and weight_bits == 4 and qdata.dtype == torch.int8:
            # Packed now, as the fuse stage lays it out for ET-VK: half the bytes of one int8 per
            # value from here to the file (a large model's quantized weights dominate peak memory).
            from .pack import group_sums, pack_int4

            if dynamic_activations and weight_sums is None:
                weight_sums = group_sums(qdata, int(block_size[-1]))
            qdata = pack_int4(qdata)
        # Parameters named after the linear's weight, so packed constants keep its name.
        self.weight = nn.Parameter(qdata, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.weight_zero_point = nn.Parameter(zero_point, requires_grad=False)
        self.weight_sums = None if weight_sums is None else nn.Parameter(weight_sums, requires_grad=False)
        self.bias = bias
        self.block_size = [int(b) for b in block_size]
        self.weight_bits = weight_bits
        self.dtype = dtype  # of the dequantized weight
        self.dynamic_activations = dynamic_activations
        self.opaque = opaque  # False: the explicit torchao chain (the fused ops cannot take it)

    @classmethod
    def from_torchao(cls, layer: nn.Linear, fusable) -> "QuantizedLinear":
        """``fusable(qdata, block_size) -> bool``: may the fuse stage take this layer?"""
        from torchao.quantization import IntxUnpackedToInt8Tensor

        w = layer.weight
        if not isinstance(w, IntxUnpackedToInt8Tensor):
            raise ExportError(f"torchao quantized a layer to {type(w).__name__}, expected IntxUnpackedToInt8Tensor",
                              "install the pinned torchao version (pip install -e .)")
        return cls.from_parts(w, w.qdata, w.scale, w.zero_point, layer.bias, fusable)

    @classmethod
    def from_parts(cls, w, qdata, scale, zero_point, bias, fusable) -> "QuantizedLinear":
        """``w`` a torchao weight giving the quantization's attributes; its data as plain tensors."""
        bits = int(str(w.target_dtype).removeprefix("torch.int"))
        return cls(qdata, scale, zero_point, w.block_size, bits, w.dtype, bias,
                   dynamic_activations=w.activation_quantization is not None,
                   opaque=fusable(qdata, w.block_size))

    def int_values(self) -> torch.Tensor:
        """The weight's int values, int8 [N, K] (unpacked when stored packed)."""
        if self.weight.dtype == torch.uint8:
            from .pack import unpack_int4

            return unpack_int4(self.weight.detach(), self.in_features)
        return self.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.weight, self.weight_scale, self.weight_zero_point, self.block_size, self.weight_bits,
                self.dynamic_activations, self.bias, self.dtype)
        if self.opaque:
            return torch.ops.qlower.quantized_linear(*args, self.weight_sums)
        return torchao_linear(*args)


# Module types whose output is one linear layer's (the eager side of verify).
LINEAR_LAYERS = (nn.Linear, QuantizedLinear)
