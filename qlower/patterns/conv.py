"""The q8ta convolution family and the int8 residual add: detectors and builders.

Anchors: ``aten.convolution`` (2-D, regular or transposed) and
``aten.add.Tensor`` of the edge dialect, in the static int8 graph that PT2E
leaves::

    q → dq → convolution [→ relu | hardtanh] → q        ⇒  et_vk.q8ta_conv2d / _dw / _pw / _transposed
          (weight: dq_per_channel(int8 constant), axis 0; transposed: axis 1)
    q → dq ┐
    q → dq ┴ add [→ relu] → q                            ⇒  et_vk.q8ta_add

The fused ops take the int8 tensor (the quantize node, or the q8ta op before)
and give int8, so activations stay int8 from one op to the next.

Which conv op (the same choice as ExecuTorch 1.5.1's ``quantized_convolution``
pattern, where that choice is right for the runtime):

=========================================  ==========================
conv                                       fused op
=========================================  ==========================
transposed                                 ``et_vk.q8ta_conv2d_transposed``
groups == C_out == C_in (depthwise)        ``et_vk.q8ta_conv2d_dw``
1×1, stride 1, padding 0, dilation 1,      ``et_vk.q8ta_conv2d_pw``
  groups 1
anything else                              ``et_vk.q8ta_conv2d``
=========================================  ==========================

Guards (:func:`conv_shape_problem`, also asked by the quantize stage so that a
conv that cannot fuse is never quantized): 2-D; a transposed conv has
dilation 1 (the runtime's ``q8ta_conv2d_transposed`` checks it) and groups 1
(the weight's per-channel axis 1 holds one group's output channels, so its
scales would cover one group; XNNPACK's quantizer leaves such convs float too);
its padding, output padding (only the output size: the shader computes every
output position the same way), stride, kernel and channel counts are free
(channels pad to 4 with zero weights, and input positions that are out of
range or off the stride grid read the input zero point, which the weight sums
cancel). A depthwise
conv has C_out a multiple of 4 (its weights are packed 4 channels to a texel;
ExecuTorch's pass asserts); a grouped conv has C_in and C_out per group
multiples of 4 (the runtime's grouped shader checks C_in per group and reads
C_out per group in texels). ExecuTorch's own pass sends a grouped 1×1 conv to
``q8ta_conv2d_pw``, whose runtime ignores ``groups``; qlower sends it to
``q8ta_conv2d``.

Clamps fold into the output quantization: ``relu`` is the ops' own fused
activation; ``hardtanh(0, b)`` (ReLU6) is that ``relu`` when quantizing ``b``
already saturates at 127, so the upper clamp is the int8 clamp; an add's ``relu``
(the op has no activation) is exact when the output zero point is −128, so
that every negative sum saturates to the int8 code of 0. Otherwise the layer
stays as it is and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from executorch.backends.transforms.utils import get_param_tensor
from executorch.exir import ExportedProgram

from qlower import pack
from qlower.patterns.guards import conv_shape_problem, is_depthwise
from qlower.patterns.linear import (
    EDGE,
    FUSED_TAG,
    SCHEME_FLOAT,
    SCHEME_STATIC,
    ConstantPacker,
    _fake_run,
    _is_constant,
    rename_output,
    _sums_name,
    is_dq,
    is_q,
    module_fqn,
    op_name,
    trace_to_placeholder,
)

INT8_MIN, INT8_MAX = -128, 127

FMT_CONV_WEIGHT = "q8ta conv2d weight matrix"
FMT_DW_WEIGHT = "q8ta depthwise weight"
FMT_TRANSPOSED_WEIGHT = "q8ta transposed conv weight matrix"

CONV_ANCHOR = EDGE.aten.convolution.default
ADD_ANCHORS = {EDGE.aten.add.Tensor}
RELU = EDGE.aten.relu.default
HARDTANH = EDGE.aten.hardtanh.default


@dataclass
class ConvInfo:
    """What the report says about one convolution node, matched or not."""

    node: str
    module: str
    anchor: str = "conv"
    n: int | None = None  # C_out
    k: int | None = None  # C_in
    kernel: list[int] = field(default_factory=list)
    stride: list[int] = field(default_factory=list)
    groups: int = 1
    group_size: int | None = None  # (linears' column; none for convs)
    scheme: str = SCHEME_FLOAT
    has_bias: bool = False
    fused_op: str | None = None
    reason: str | None = None
    note: str | None = None


def shape_text(info: ConvInfo) -> str:
    """``3x3 s2 g1`` — kernel, stride and groups for tables."""
    return f"{'x'.join(map(str, info.kernel))} s{'x'.join(map(str, sorted(set(info.stride))))} g{info.groups}"


@dataclass
class ConvMatch:
    anchor: torch.fx.Node
    info: ConvInfo
    op: str
    x: torch.fx.Node  # int8 input
    input_scale: Any
    input_zp: Any
    weight: torch.fx.Node
    weight_scales: torch.fx.Node
    bias: torch.fx.Node | None
    output: torch.fx.Node  # the quantize node the fused op replaces
    out_scale: Any
    out_zp: Any
    activation: str
    padding: list[int]
    dilation: list[int]
    output_padding: list[int] = field(default_factory=lambda: [0, 0])
    transposed: bool = False
    orphans: list[torch.fx.Node] = field(default_factory=list)


def conv_op(c_out: int, c_in: int, kernel, stride, padding, dilation, groups: int, transposed: bool = False) -> str:
    """The q8ta op for a conv that passed :func:`conv_shape_problem`."""
    if transposed:
        return "q8ta_conv2d_transposed"
    if is_depthwise(c_out, c_in, groups):
        return "q8ta_conv2d_dw"
    if list(kernel) == [1, 1] and list(stride) == [1, 1] and list(padding) == [0, 0] and list(dilation) == [1, 1] and groups == 1:
        return "q8ta_conv2d_pw"
    return "q8ta_conv2d"


def quantized_code(value: float, scale: float, zero_point: int) -> int:
    """round(value / scale) + zp, unclamped, as the q8ta shaders quantize (1/scale once, float32)."""
    inv = torch.tensor(1.0 / float(scale), dtype=torch.float32)
    return int(torch.round(torch.tensor(float(value), dtype=torch.float32) * inv)) + int(zero_point)


def clamp_problem(lo: float, hi: float, out_scale: float, out_zp: int) -> str | None:
    """Why clamp(lo, hi) before an int8 quantization is not the ops' fused relu, or None."""
    if lo != 0.0:
        return f"clamp lower bound {lo:g} is not 0 (only relu-like clamps fold)"
    if quantized_code(hi, out_scale, out_zp) < INT8_MAX:
        return (f"clamp upper bound {hi:g} is inside the output's int8 range (scale {out_scale:.3g}, "
                f"zero point {out_zp}), so it does not fold into the output quantization")
    return None


# -- conv detector ------------------------------------------------------------------


def _ints(v, default) -> list[int]:
    return [int(x) for x in v] if v is not None else list(default)


def detect_conv(ep: ExportedProgram, node: torch.fx.Node) -> tuple[ConvMatch | None, ConvInfo | None]:
    """(match, info) for a convolution node; (None, None) for any other node."""
    if node.op != "call_function" or node.target != CONV_ANCHOR:
        return None, None
    args = list(node.args) + [None] * (9 - len(node.args))
    x_arg, w_arg, b_arg, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    info = ConvInfo(node=node.name, module=module_fqn(node))
    wval = w_arg.meta["val"] if isinstance(w_arg, torch.fx.Node) else None
    xval = x_arg.meta["val"] if isinstance(x_arg, torch.fx.Node) else None
    if wval is None or xval is None:
        return _reject(info, "operands have no shapes")
    groups = int(groups or 1)
    info.groups = groups
    info.k = int(xval.shape[1])
    info.n = int(wval.shape[1] * groups) if transposed else int(wval.shape[0])
    info.kernel = [int(d) for d in wval.shape[2:]]
    info.stride = _ints(stride, [1] * len(info.kernel))
    padding, dilation = _ints(padding, [0, 0]), _ints(dilation, [1, 1])
    output_padding = _ints(output_padding, [0, 0])
    transposed = bool(transposed)
    info.has_bias = b_arg is not None

    weight, w_chain = trace_to_placeholder(w_arg)
    if weight is None or not _is_constant(ep, weight):
        return _reject(info, "weight is not a constant")
    w_dq = next((n for n in w_chain if is_dq(n)), None)
    if w_dq is None:
        return _reject(info, "weights are not quantized")
    # Output channels: axis 0 of [OC, ICg, KH, KW]; axis 1 of a transposed conv's [IC, OCg, KH, KW].
    out_axis = 1 if transposed else 0
    if op_name(w_dq) != "dequantize_per_channel.default" or int(w_dq.args[3]) != out_axis:
        return _reject(info, "weights are not quantized per output channel")
    w_scales, _ = trace_to_placeholder(w_dq.args[1])
    w_zeros, _ = trace_to_placeholder(w_dq.args[2])
    if w_scales is None:
        return _reject(info, "weight scales are not constants")
    reason = conv_shape_problem(info.n, info.k, groups, dims=len(info.kernel), transposed=transposed, dilation=dilation)
    if reason:
        return _reject(info, reason)
    if not is_dq(x_arg) or not isinstance(x_arg.args[1], float):
        return _reject(info, "input is not a static per-tensor int8 activation")
    info.scheme = SCHEME_STATIC

    bias = None
    if b_arg is not None:
        bias, _ = trace_to_placeholder(b_arg)
        if bias is None or not _is_constant(ep, bias):
            return _reject(info, "bias is not a constant")

    out, activation, reason = _output_quant(node)
    if reason:
        return _reject(info, reason)
    op = conv_op(info.n, info.k, info.kernel, info.stride, padding, dilation, groups, transposed)
    m = ConvMatch(anchor=node, info=info, op=op, x=x_arg.args[0], input_scale=x_arg.args[1], input_zp=x_arg.args[2],
                  weight=weight, weight_scales=w_scales, bias=bias, output=out, out_scale=out.args[1],
                  out_zp=out.args[2], activation=activation, padding=padding, dilation=dilation,
                  output_padding=output_padding, transposed=transposed)
    m.orphans = [n for n in (w_zeros, w_scales, weight) if n is not None]
    if activation == "relu" and _clamp_of(node) is not None:
        info.note = "ReLU6 folded into the output quantization"
    info.fused_op = f"et_vk.{op}"
    return m, info


def _clamp_of(node: torch.fx.Node) -> torch.fx.Node | None:
    user = next(iter(node.users)) if len(node.users) == 1 else None
    return user if user is not None and user.target == HARDTANH else None


def _output_quant(node: torch.fx.Node) -> tuple[torch.fx.Node | None, str, str | None]:
    """(quantize node, activation, None) for node [→ relu | hardtanh] → q, else (None, "", reason)."""
    if len(node.users) != 1:
        return None, "", "output has several users, so it is not requantized once"
    cur = next(iter(node.users))
    activation, clamp = "none", None
    if cur.target == RELU or cur.target == HARDTANH:
        activation, clamp = "relu", cur
        if len(cur.users) != 1:
            return None, "", f"{op_name(cur)} output has several users"
        cur = next(iter(cur.users))
    if not is_q(cur) or not isinstance(cur.args[1], float):
        return None, "", "output feeds a float op, not a static int8 quantization"
    if clamp is not None and clamp.target == HARDTANH:
        lo, hi = (list(clamp.args[1:3]) + [-1.0, 1.0][len(clamp.args) - 1:])[:2]
        reason = clamp_problem(float(lo), float(hi), cur.args[1], int(cur.args[2]))
        if reason:
            return None, "", reason
    return cur, activation, None


def _reject(info: ConvInfo, reason: str) -> tuple[None, ConvInfo]:
    info.reason = reason
    return None, info


# -- conv replacement ---------------------------------------------------------------


def replace_conv(ep: ExportedProgram, m: ConvMatch, packer: ConstantPacker) -> torch.fx.Node:
    """Insert the q8ta conv for ``m``, pack its constants, redirect the quantize node's uses."""
    graph = m.anchor.graph
    w = get_param_tensor(ep, m.weight)  # int8 [OC, ICg, KH, KW] ([IC, OCg, KH, KW] transposed), read before packing
    if m.transposed:
        w = pack.transposed_to_conv_layout(w, m.info.groups)
    sums = pack.conv_channel_sums(w)
    if m.transposed:
        packer.rewrite(m.weight, FMT_TRANSPOSED_WEIGHT, lambda t: pack.pack_conv_transposed_weight(t, m.info.groups))
    elif m.op == "q8ta_conv2d_dw":
        packer.rewrite(m.weight, FMT_DW_WEIGHT, pack.pack_dw_weight)
    else:
        packer.rewrite(m.weight, FMT_CONV_WEIGHT, pack.pack_conv_weight)
    packer.pad(m.weight_scales, pack.pad_channel_scales)
    if m.bias is not None:
        packer.pad(m.bias, pack.pad_bias)
    sums_node = packer.new_constant(graph, _sums_name(ep, m.weight), sums)
    info = m.info
    geometry = [list(info.kernel), list(info.stride), list(m.padding)]
    if m.transposed:  # the transposed op's schema has output_padding before dilation
        geometry.append(list(m.output_padding))
    args = (m.x, m.input_scale, m.input_zp, m.weight, sums_node, m.weight_scales, m.out_scale, m.out_zp, m.bias,
            *geometry, list(m.dilation), info.groups, m.activation)
    return _insert(ep, m.output, getattr(EDGE.et_vk, m.op).default, args, m.op)


def _insert(ep: ExportedProgram, output: torch.fx.Node, target, args, tag: str) -> torch.fx.Node:
    graph = output.graph
    with graph.inserting_before(output):
        fused = graph.create_node("call_function", target, args=args)
    fused.meta = dict(output.meta)
    fused.meta[FUSED_TAG] = tag
    fused.meta["val"] = _fake_run(target, args)
    rename_output(ep, output, fused)
    output.replace_all_uses_with(fused)
    return fused


# -- int8 residual add -------------------------------------------------------------


@dataclass
class AddMatch:
    anchor: torch.fx.Node
    a: torch.fx.Node
    b: torch.fx.Node
    a_qparams: tuple
    b_qparams: tuple
    output: torch.fx.Node
    alpha: float


def detect_add(node: torch.fx.Node) -> tuple[AddMatch | None, str | None]:
    """(match, None) for dq + dq [→ relu] → q with equal shapes; (None, reason) for an add that is not."""
    if node.op != "call_function" or node.target not in ADD_ANCHORS:
        return None, None
    a, b = node.args[:2]
    if not (is_dq(a) and is_dq(b) and isinstance(a.args[1], float) and isinstance(b.args[1], float)):
        return None, "inputs are not both static int8 activations"
    shape = tuple(node.meta["val"].shape)
    if tuple(a.meta["val"].shape) != shape or tuple(b.meta["val"].shape) != shape:
        return None, "broadcasting add"
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if len(node.users) != 1:
        return None, "output has several users"
    cur = next(iter(node.users))
    relu = cur.target == RELU
    if relu:
        if len(cur.users) != 1:
            return None, "relu output has several users"
        cur = next(iter(cur.users))
    if not is_q(cur) or not isinstance(cur.args[1], float):
        return None, "output is not requantized to static int8"
    if relu and int(cur.args[2]) != INT8_MIN:
        return None, f"relu after add does not fold: output zero point {cur.args[2]} is not {INT8_MIN}"
    return AddMatch(node, a.args[0], b.args[0], tuple(a.args[1:3]), tuple(b.args[1:3]), cur, float(alpha)), None


def replace_add(ep: ExportedProgram, m: AddMatch) -> torch.fx.Node:
    args = (m.a, m.b, *m.a_qparams, *m.b_qparams, m.output.args[1], m.output.args[2], m.alpha)
    return _insert(ep, m.output, EDGE.et_vk.q8ta_add.default, args, "q8ta_add")
