"""The quantized-linear family: detector and replacement builders.

Anchors: ``aten.linear``, ``aten.mm``, ``aten.addmm`` and ``aten.bmm`` (batch 1)
of the edge dialect, with the ``view_copy`` that linear decomposition puts
around 3-D inputs, with and without bias. The weight must reach the anchor
through a dequantize of a constant (optionally via ``permute_copy``).

Routes (checked in this order, the same order ExecuTorch 1.5.1 uses, so both
pick the same op for the same graph):

=====================================  ===================================
graph                                  fused op
=====================================  ===================================
q(static) → dq → linear [→ relu] → q   ``et_vk.q8ta_linear`` (M > 1) or
  with per-channel int8 weights        ``et_vk.q8ta_linear_gemv`` (M = 1)
dq(int4 per-group weight) → linear     ``et_vk.linear_q4gsw``
choose_qparams → q → dq → linear       ``et_vk.linear_dq8ca_q4gsw``
  with per-group int4 weights          (``choose_qparams_affine`` stays)
q(static) → dq → linear, float output  ``et_vk.linear_q8ta_q8csw``
``qlower.quantized_linear`` (the       ``et_vk.linear_dq8ca_q4gsw`` (a
  export pipeline's one-node form,     ``choose_qparams_affine`` per input
  :mod:`qlower.quantized_linear`)      is added) or ``et_vk.linear_q4gsw``
=====================================  ===================================

Guards (each rejection says why, in user words): the weight is a quantized
constant; ``bmm`` has batch 1; K is a multiple of 4 (the kernels load
activations in 4-wide texels); per-group weights have a group size dividing
K; 4-bit ops get weights in [-8, 7]; an int4 group size is a multiple of 4
(refused otherwise: no ET-VK int4 kernel reads it). A ``linear_dq8ca_q4gsw`` at
a group size the runtime computes wrong on multi-row inputs is stored at the
largest one it computes right that divides it (``runtime_caps.stored_group_size``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from executorch.backends.transforms.utils import (
    create_constant_placeholder,
    get_param_tensor,
    set_param_tensor,
)
from executorch.exir import ExportedProgram
from executorch.exir.dialects._ops import ops as exir_ops
from torch.export.graph_signature import InputKind, TensorArgument

from qlower import pack, runtime_caps
from qlower.patterns.guards import K_ALIGN, q4_fusion_problem, q4_weight_problem
from qlower.errors import ExportError
from qlower.quantized_linear import per_token_qparams_args

# How far back from an operand we look for its constant placeholder
# (dequantize → permute_copy → placeholder is two hops).
MAX_TRACE_DEPTH = 4

EDGE = exir_ops.edge
# qlower's one-node quantized linear (qlower.quantized_linear), from the quantize stage.
QUANTIZED_LINEAR = EDGE.qlower.quantized_linear.default
ANCHORS = {
    EDGE.aten.linear.default: "linear",
    EDGE.aten.mm.default: "mm",
    EDGE.aten.addmm.default: "addmm",
    EDGE.aten.bmm.default: "bmm",
}

_DQ_NAMES = {
    "dequantize_per_tensor.tensor",
    "dequantize_per_tensor.default",
    "dequantize_per_channel.default",
    "dequantize_per_channel_group.default",
    "dequantize_per_token.default",
    "dequantize_affine.default",
}
_Q_NAMES = {
    "quantize_per_tensor.tensor",
    "quantize_per_tensor.default",
    "quantize_per_channel.default",
    "quantize_per_token.default",
    "quantize_affine.default",
}

# Scheme names (DESIGN §3) reported per layer.
SCHEME_DYNAMIC = "qta8a_qga4w"
SCHEME_WEIGHT_ONLY = "qga4w"
SCHEME_STATIC = "q8ta_q8csw"
SCHEME_FLOAT = "float"

# Node meta key marking the et_vk nodes this module created.
FUSED_TAG = "qlower_fused"

# Packing formats: one constant may be packed once, in one format.
FMT_INT4 = "int4 packed weight"
FMT_GROUP_SCALES = "transposed group scales"


def op_name(node: torch.fx.Node) -> str:
    """``op.overload`` of a call_function node (namespace dropped), '' otherwise."""
    if node.op != "call_function":
        return ""
    name = getattr(node.target, "__name__", str(node.target))
    # Edge ops read "torchao.dequantize_affine.default", torch ops "dequantize_affine.default".
    return ".".join(name.replace("::", ".").split(".")[-2:])


def is_dq(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and op_name(node) in _DQ_NAMES


def is_q(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and op_name(node) in _Q_NAMES


def is_choose_qparams(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and "choose_qparams" in op_name(node)


def is_view_copy(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and "view_copy" in op_name(node)


def is_torchao_dq(node: torch.fx.Node) -> bool:
    return node.target == EDGE.torchao.dequantize_affine.default


def trace_to_placeholder(arg: Any) -> tuple[torch.fx.Node | None, list[torch.fx.Node]]:
    """Follow ``args[0]`` from ``arg`` to a placeholder; ([], None) if none is near."""
    if not isinstance(arg, torch.fx.Node):
        return None, []
    cur, seen = arg, [arg]
    for _ in range(MAX_TRACE_DEPTH):
        if cur.op == "placeholder" or not cur.args or not isinstance(cur.args[0], torch.fx.Node):
            break
        cur = cur.args[0]
        seen.append(cur)
    if cur.op != "placeholder":
        return None, []
    return cur, seen




def _same_last_dim(a: torch.fx.Node, b) -> bool:
    va, vb = a.meta.get("val"), getattr(b, "meta", {}).get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape[-1] == vb.shape[-1]


def module_fqn(node: torch.fx.Node) -> str:
    """The fully qualified name of the module the node was traced from."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    src = node.meta.get("source_fn_stack")
    if src:
        return str(src[-1][0])
    return node.name


@dataclass
class LinearInfo:
    """What the report says about one linear-like node, matched or not."""

    node: str
    module: str
    anchor: str
    n: int | None = None
    k: int | None = None
    group_size: int | None = None
    scheme: str = SCHEME_FLOAT
    has_bias: bool = False
    fused_op: str | None = None
    reason: str | None = None
    note: str | None = None
    # The group size the file stores when the runtime is wrong at ``group_size``
    # (runtime_caps.stored_group_size); None when it stores ``group_size``.
    stored_group_size: int | None = None


@dataclass
class LinearMatch:
    anchor: torch.fx.Node
    info: LinearInfo
    op: str  # fused op name without namespace, e.g. "linear_q4gsw"
    weight: torch.fx.Node
    weight_scales: torch.fx.Node
    x: torch.fx.Node  # pattern input: float x, or int8 x for static
    input_scale: Any = None
    input_zp: Any = None
    bias: torch.fx.Node | None = None
    output: torch.fx.Node | None = None  # node whose uses the fused op takes over
    out_scale: Any = None
    out_zp: Any = None
    relu: bool = False
    orphans: list[torch.fx.Node] = field(default_factory=list)
    weight_sums: torch.fx.Node | None = None  # group sums the quantize stage computed (fused op layout)


def _reject(info: LinearInfo, reason: str) -> tuple[None, LinearInfo]:
    info.reason = reason
    return None, info


def detect(ep: ExportedProgram, node: torch.fx.Node) -> tuple[LinearMatch | None, LinearInfo | None]:  # noqa: C901
    """Match one anchor. Returns (match, info), (None, info with reason), or (None, None)."""
    if node.op == "call_function" and node.target == QUANTIZED_LINEAR:
        return _detect_quantized_linear(ep, node)
    kind = ANCHORS.get(node.target) if node.op == "call_function" else None
    if kind is None:
        return None, None
    info = LinearInfo(node=node.name, module=module_fqn(node), anchor=kind)
    is_addmm = kind == "addmm"
    x_arg = node.args[1 if is_addmm else 0]
    w_arg = node.args[2 if is_addmm else 1]

    out_val = node.meta.get("val")
    if kind in ("mm", "addmm", "bmm") and isinstance(w_arg, torch.fx.Node):
        info.n = int(w_arg.meta["val"].shape[-1])  # mm: [K, N] after permute
    if isinstance(out_val, torch.Tensor):
        info.n = int(out_val.shape[-1])
    if isinstance(x_arg, torch.fx.Node) and isinstance(x_arg.meta.get("val"), torch.Tensor):
        info.k = int(x_arg.meta["val"].shape[-1])

    weight, w_chain = trace_to_placeholder(w_arg)
    if weight is None or not _is_constant(ep, weight):
        return _reject(info, "weight is not a constant (activation × activation product)")
    w_dq = next((n for n in w_chain if is_dq(n)), None)
    if w_dq is None:
        return _reject(info, "weights are not quantized")
    s_idx = 2 if is_torchao_dq(w_dq) else 1
    w_scales, s_chain = trace_to_placeholder(w_dq.args[s_idx])
    w_zeros, z_chain = trace_to_placeholder(w_dq.args[s_idx + 1])
    if w_scales is None:
        return _reject(info, "weight scales are not constants")
    info.has_bias = False

    if kind == "bmm" and out_val.shape[0] != 1:
        return _reject(info, f"bmm batch {out_val.shape[0]} > 1")

    # Skip the view_copy that decomposition puts in front of 3-D inputs.
    x = x_arg
    # Only a view that keeps the last dim (3-D → 2-D rows) is that one; a flatten
    # (e.g. [B, C, H, W] → [B, C*H*W]) changes K and is the real input.
    front_view = x if is_view_copy(x) and _same_last_dim(x, x.args[0]) else None
    if front_view is not None:
        x = x.args[0]
    x_dq = x if is_dq(x) else None
    x_q = None
    input_scale = input_zp = None
    if x_dq is not None:
        i = 2 if is_torchao_dq(x_dq) else 1
        input_scale, input_zp = x_dq.args[i], x_dq.args[i + 1]
        x = x_dq.args[0]
        if is_q(x) and _is_dynamic_scale(input_scale):
            x_q = x
            x = x.args[0]
    pattern_input = x
    k = int(pattern_input.meta["val"].shape[-1])
    info.k = k

    bias = None
    if is_addmm:
        bias, _ = trace_to_placeholder(node.args[0])
    elif kind == "linear" and len(node.args) > 2 and node.args[2] is not None:
        bias, _ = trace_to_placeholder(node.args[2])
    info.has_bias = bias is not None

    w_t = get_param_tensor(ep, weight)
    wshape, sshape = tuple(weight.meta["val"].shape), tuple(w_scales.meta["val"].shape)
    info.n = int(wshape[-2])
    per_group = len(sshape) == 2 and sshape[-2] == wshape[-2]
    per_channel = len(sshape) == 1 and sshape[0] == wshape[-2]
    if per_group:
        info.group_size = _group_size(w_dq, wshape[-1], sshape[-1])

    static_in = x_dq is not None and isinstance(input_scale, float)
    dynamic_in = x_dq is not None and _is_per_token(input_scale, pattern_input)
    info.scheme = (
        SCHEME_STATIC if static_in
        else SCHEME_DYNAMIC if x_q is not None
        else SCHEME_WEIGHT_ONLY if x_dq is None
        else "int8 activations (unsupported granularity)"
    )

    if k % K_ALIGN != 0:
        return _reject(info, f"K={k} is not a multiple of {K_ALIGN}")

    m = LinearMatch(
        anchor=node, info=info, op="", weight=weight, weight_scales=w_scales,
        x=pattern_input, input_scale=input_scale, input_zp=input_zp, bias=bias, output=node,
    )
    m.orphans = [n for n in (w_zeros, w_scales, weight) if n is not None]

    if static_in:
        _find_output_quant(m, node)
    if static_in and per_channel:
        if m.out_scale is not None:
            m.op = "q8ta_linear_gemv" if _rows(pattern_input) == 1 else "q8ta_linear"
            return _accept(m)

    if x_dq is None:
        if not per_group:
            return _reject(info, "weight-only quantization needs per-group int4 weights")
        reason = q4_weight_problem(info.n, k, info.group_size, w_t)
        if reason:
            return _reject(info, reason)
        m.op = "linear_q4gsw"
        return _accept(m)

    if x_q is not None:
        if not dynamic_in:
            return _reject(info, "dynamic activation quantization is not per token")
        if not per_group:
            return _reject(info, "dynamic int8 activations need per-group int4 weights")
        reason = q4_weight_problem(info.n, k, info.group_size, w_t)
        if reason:
            return _reject(info, reason)
        m.op = "linear_dq8ca_q4gsw"
        return _accept(m)

    if not static_in:
        return _reject(info, "activation quantization is neither static per tensor nor dynamic per token")
    if not per_channel:
        return _reject(info, "static int8 activations need per-channel int8 weights")
    m.op = "linear_q8ta_q8csw"
    info.note = "output feeds a float op, so no requantization"
    return _accept(m)


def _detect_quantized_linear(ep: ExportedProgram, node: torch.fx.Node) -> tuple[LinearMatch, LinearInfo]:
    """``qlower::quantized_linear``: the quantize stage emitted it only for layers that fuse."""
    x, weight, scales, zeros, block_size, bits, dynamic, bias, _dtype, *rest = node.args
    w_val = weight.meta["val"]  # shape and dtype only: the values are not needed (nor read)
    packed = w_val.dtype == torch.uint8  # int4 packed by the quantize stage, K read from the input
    n, k = int(w_val.shape[0]), int(x.meta["val"].shape[-1]) if packed else int(w_val.shape[1])
    info = LinearInfo(node=node.name, module=module_fqn(node), anchor="linear", n=n, k=k,
                      group_size=int(block_size[-1]), has_bias=bias is not None,
                      scheme=SCHEME_DYNAMIC if dynamic else SCHEME_WEIGHT_ONLY)
    # A packed weight passed the same guards when the quantize stage packed it (q4_fusable).
    reason = f"{bits}-bit weights" if bits != 4 else (None if packed else q4_fusion_problem(get_param_tensor(ep, weight), info.group_size))
    if reason:
        raise ExportError(f"layer {info.module} was quantized for fusion but cannot fuse: {reason}",
                          "report this with the model; a per-layer 'skip' override keeps the layer float")
    m = LinearMatch(anchor=node, info=info, op="linear_dq8ca_q4gsw" if dynamic else "linear_q4gsw",
                    weight=weight, weight_scales=scales, x=x, bias=bias, output=node,
                    weight_sums=rest[0] if rest else None)
    m.orphans = [zeros]
    return _accept(m)


def act_qparams(anchor: torch.fx.Node, x: torch.fx.Node, cache: dict) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Per-token int8 scale and zero point of ``x``, as torchao chooses them; one node per input."""
    if x in cache:
        return cache[x]
    target = EDGE.torchao.choose_qparams_affine.default
    args = per_token_qparams_args(x, x.meta["val"])
    graph = anchor.graph
    with graph.inserting_before(anchor):
        choose = graph.create_node("call_function", target, args=args)
        choose.meta = {k: v for k, v in anchor.meta.items() if k != "val"}
        choose.meta["val"] = _fake_run(target, args)
        items = []
        for i in range(2):
            item = graph.create_node("call_function", operator.getitem, args=(choose, i))
            item.meta = dict(choose.meta, val=choose.meta["val"][i])
            items.append(item)
    cache[x] = tuple(items)
    return cache[x]


def _is_constant(ep: ExportedProgram, node: torch.fx.Node) -> bool:
    sig = ep.graph_signature
    return (
        node.name in sig.inputs_to_parameters
        or node.name in sig.inputs_to_buffers
        or node.name in sig.inputs_to_lifted_tensor_constants
    )


def _accept(m: LinearMatch) -> tuple[LinearMatch, LinearInfo]:
    m.info.fused_op = f"et_vk.{m.op}"
    return m, m.info


def _is_dynamic_scale(arg: Any) -> bool:
    return (
        isinstance(arg, torch.fx.Node)
        and arg.target == operator.getitem
        and is_choose_qparams(arg.args[0])
    )


def _is_per_token(scale: Any, x: torch.fx.Node) -> bool:
    """Scales from choose_qparams with one entry per row of x."""
    if not _is_dynamic_scale(scale):
        return False
    return scale.meta["val"].shape[-1] == x.meta["val"].shape[-2]


def _group_size(w_dq: torch.fx.Node, k: int, num_groups: int) -> int:
    block = w_dq.args[1] if is_torchao_dq(w_dq) else None
    if isinstance(block, (list, tuple)) and block and isinstance(block[-1], int):
        return int(block[-1])
    return k // num_groups if num_groups else k


def _rows(x: torch.fx.Node) -> int:
    shape = x.meta["val"].shape
    return int(shape[-2]) if len(shape) >= 2 else 1


def _find_output_quant(m: LinearMatch, anchor: torch.fx.Node) -> None:
    """Find linear [→ view_copy] [→ relu] → q; fill the output fields if found."""
    if len(anchor.users) != 1:
        return
    cur = next(iter(anchor.users))
    if is_view_copy(cur) and len(cur.users) == 1:
        # The fused op then takes over the view's uses, whatever follows.
        m.output = cur
        cur = next(iter(cur.users))
    relu = False
    if cur.target == EDGE.aten.relu.default:
        relu = True
        cur = next(iter(cur.users)) if len(cur.users) == 1 else None
    if cur is None or not is_q(cur):
        return
    m.output, m.out_scale, m.out_zp, m.relu = cur, cur.args[1], cur.args[2], relu


# -- replacement ---------------------------------------------------------------

class ConstantPacker:
    """Rewrites constants of an ExportedProgram, each at most once per format.

    Two placeholders may share one state-dict entry (tied weights), so the
    key is the state-dict name, not the node. Packing the same constant in
    two different formats is a bug and raises.
    """

    def __init__(self, ep: ExportedProgram, store=None):
        self.ep = ep
        self.formats: dict[str, str] = {}
        self.store = store  # weight_store.WeightStore: new large constants go to files

    def _kept(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        return self.store.put(tensor) if self.store is not None else tensor

    def _key(self, node: torch.fx.Node) -> str:
        sig = self.ep.graph_signature
        for table in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
            if node.name in table:
                return table[node.name]
        return node.name

    def rewrite(self, node: torch.fx.Node, fmt: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        key = self._key(node)
        seen = self.formats.get(key)
        if seen == fmt:
            return
        if seen is not None:
            raise RuntimeError(f"constant {key} packed as {seen!r} and {fmt!r}")
        self.formats[key] = fmt
        self.set(node, fn(get_param_tensor(self.ep, node)))

    def pad(self, node: torch.fx.Node, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Idempotent rewrites (zero padding) need no bookkeeping."""
        old = get_param_tensor(self.ep, node)
        new = fn(old)
        if new is not old:
            self.set(node, new)

    def set(self, node: torch.fx.Node, tensor: torch.Tensor) -> None:
        set_param_tensor(self.ep, node, self._kept(tensor))
        node.meta["val"] = node.meta["val"].fake_mode.from_tensor(tensor, static_shapes=True)

    def new_constant(self, graph: torch.fx.Graph, name: str, data: torch.Tensor) -> torch.fx.Node:
        first = next(iter(graph.nodes))
        with graph.inserting_before(first):
            return create_constant_placeholder(
                exp_program=self.ep, graph=graph, kind=InputKind.PARAMETER, name=name, data=self._kept(data)
            )


def _constant_name(ep: ExportedProgram, weight: torch.fx.Node, suffix: str) -> str:
    """A name for a constant derived from ``weight``: its state-dict name with ``suffix``, dots as underscores."""
    sig = ep.graph_signature
    fqn = sig.inputs_to_parameters.get(weight.name) or sig.inputs_to_buffers.get(weight.name) or weight.name
    return (fqn + suffix).replace(".", "_")


def _sums_name(ep: ExportedProgram, weight: torch.fx.Node) -> str:
    return _constant_name(ep, weight, "_sums")


def replace(ep: ExportedProgram, m: LinearMatch, packer: ConstantPacker) -> torch.fx.Node:
    """Insert the fused node for ``m``, pack its constants, redirect uses."""
    graph = m.anchor.graph
    # Packed by the quantize stage (QuantizedLinear): its values are not read here.
    prepacked = m.weight.meta["val"].dtype == torch.uint8
    if m.bias is not None:
        packer.pad(m.bias, pack.pad_bias)

    if m.op in ("linear_q4gsw", "linear_dq8ca_q4gsw"):
        gs = m.info.k // int(m.weight_scales.meta["val"].shape[-1])
        stored = stored_int4_group_size(m.op, gs, m.info.module)
        sums_node = m.weight_sums
        if stored != gs:
            m.info.stored_group_size = stored
            m.info.note = restated_note(gs, stored)
            if sums_node is not None:  # computed at the user's group size
                m.orphans.append(sums_node)
                sums_node = None
        if m.op == "linear_dq8ca_q4gsw" and sums_node is None:
            w = get_param_tensor(ep, m.weight)
            w = pack.unpack_int4(w, m.info.k) if prepacked else w
            sums_node = packer.new_constant(graph, _sums_name(ep, m.weight), pack.group_sums(w, stored))
            del w
        if not prepacked:
            packer.rewrite(m.weight, FMT_INT4, pack.pack_int4)
        if stored == gs:
            packer.rewrite(m.weight_scales, FMT_GROUP_SCALES, pack.pack_group_scales)
        else:
            packer.rewrite(m.weight_scales, f"{FMT_GROUP_SCALES}, each repeated {gs // stored} times",
                           lambda s: pack.pack_group_scales(pack.split_groups(s, gs // stored)))
        gs = stored
        if sums_node is None:
            args = (m.x, m.weight, m.weight_scales, gs, m.bias)
        else:
            args = (m.x, m.input_scale, m.input_zp, m.weight, sums_node, m.weight_scales, gs, m.bias)
    else:
        packer.pad(m.weight_scales, pack.pad_channel_scales)
        sums_node = packer.new_constant(graph, _sums_name(ep, m.weight), pack.channel_sums(get_param_tensor(ep, m.weight)))
        args = (m.x, m.input_scale, m.input_zp, m.weight, sums_node, m.weight_scales)
        if m.op == "linear_q8ta_q8csw":
            args = args + (m.bias,)
        else:
            args = args + (m.out_scale, m.out_zp, m.bias, "relu" if m.relu else "none")

    target = getattr(EDGE.et_vk, m.op).default
    with graph.inserting_before(m.output):
        fused = graph.create_node("call_function", target, args=args)
    fused.meta = dict(m.output.meta)
    fused.meta[FUSED_TAG] = m.op
    # The replaced node may be a 2-D mm inside view_copys; record the shape the op
    # really returns (a following view_copy then becomes a no-op).
    fused.meta["val"] = _linear_out_val(m.x, m.output)
    rename_output(ep, m.output, fused)
    m.output.replace_all_uses_with(fused)
    # The view_copy that restored the 3-D shape after a 2-D mm is now a no-op
    # (ExecuTorch's backend folds it the same way, via addmm → linear).
    for user in list(fused.users):
        if is_view_copy(user) and tuple(user.meta["val"].shape) == tuple(fused.meta["val"].shape):
            rename_output(ep, user, fused)
            user.replace_all_uses_with(fused)
    return fused


def stored_int4_group_size(op: str, group_size: int, module: str) -> int:
    """The group size an int4 op's constants are stored at (runtime_caps.stored_group_size); refuses what none fixes."""
    stored = runtime_caps.stored_group_size(op, group_size)
    if stored is None:
        problem = runtime_caps.int4_group_problem(group_size) or (
            f"the ET-VK runtime computes {op} wrong at group size {group_size} "
            "(quantize_and_pack_4h4w_with_group_sums counts a worker's running sum twice)")
        raise ExportError(f"layer {module or '<top>'}: {problem}",
                          f"use a multiple of {runtime_caps.INT4_GROUP_ALIGN} such as 32, 64 or 128")
    return stored


def restated_note(group_size: int, stored: int) -> str:
    """The report's line for a layer stored at a smaller group size than asked."""
    return (f"stored as group size {stored}, each scale repeated {group_size // stored}x; "
            f"ET-VK is wrong at {group_size} on multi-row inputs")


def rename_output(ep: ExportedProgram, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Keep the graph signature's output names in step when ``new`` replaces ``old``."""
    for spec in ep.graph_signature.output_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == old.name:
            spec.arg = TensorArgument(name=new.name)


def _fake_run(target, args) -> torch.Tensor:
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor))
    with mode:
        return target._op(*vals)


def _linear_out_val(x: torch.fx.Node, replaced: torch.fx.Node) -> torch.Tensor:
    """A fused linear returns ``x.shape[:-1] + [N]`` in the replaced node's dtype (symbolic sizes kept)."""
    x_val, out_val = x.meta["val"], replaced.meta["val"]
    with x_val.fake_mode:
        return x_val.new_empty((*x_val.shape[:-1], out_val.shape[-1]), dtype=out_val.dtype)


# -- delegation fix-up -----------------------------------------------------------
#
# VulkanPartitioner checks every tensor input of et_vk.linear_dq8ca_q4gsw (and
# the q8ta family) against one float dtype set, so a node fused before
# partitioning is rejected for its int8 zero point / int8 input and would stay
# on the CPU, where ExecuTorch has no kernel for it. The stock flow escapes
# that check because the partitioner accepts every node of a pattern its
# detectors report. Report our fused nodes the same way, through ExecuTorch's
# public pattern registry, with no replacement: the backend's own fusion pass
# only runs entries that have one.

PARTITION_PATTERN = "qlower_prefused_linear"


def _detect_prefused(node: torch.fx.Node):
    if node.op != "call_function" or FUSED_TAG not in node.meta:
        return None
    from executorch.backends.vulkan.patterns import PatternMatch

    inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
    return PatternMatch(inputs, [node], [node], node)


def register_partition_pattern() -> None:
    from executorch.backends.vulkan.patterns import fusable_patterns, register_pattern_detector

    if PARTITION_PATTERN not in fusable_patterns:
        register_pattern_detector(PARTITION_PATTERN)(_detect_prefused)


# -- sibling projections: one dispatch ------------------------------------------
#
# Q, K and V read the same input and each output is at once viewed as
# [..., heads, head_dim]. On a GPU where every dispatch costs ~6 us before it does
# any work (docs/benchmarks.md), three GEMVs and three views cost more than one
# GEMV over the stacked weights, one view to [..., heads_q + heads_k + heads_v,
# head_dim] and a slice per part. The packed layouts stack by output column
# exactly (rows of the int4 weight, columns of the transposed scales and group
# sums, the bias) when every part's N is a multiple of their padding (4), so the
# merged op computes each part's columns with the same numbers.

MERGEABLE_OPS = ("linear_dq8ca_q4gsw", "linear_q4gsw")
# positions of (weight, group sums, scales, group size, bias) in each op's arguments
_MERGE_ARGS = {"linear_dq8ca_q4gsw": (3, 4, 5, 6, 7), "linear_q4gsw": (1, None, 2, 3, 4)}


@dataclass
class Sibling:
    node: torch.fx.Node  # the fused linear
    view: torch.fx.Node  # its only user: the view to [..., heads, head_dim]
    heads: int
    head_dim: int


def head_view(node: torch.fx.Node) -> Sibling | None:
    """``node``'s only use, when it is a view that splits the last dimension into [heads, head_dim]."""
    users = list(node.users)
    if len(users) != 1 or not is_view_copy(users[0]):
        return None
    out, viewed = node.meta["val"].shape, users[0].meta["val"].shape
    if len(viewed) != len(out) + 1 or tuple(viewed[:-2]) != tuple(out[:-1]):
        return None
    heads, head_dim = viewed[-2], viewed[-1]
    if not all(isinstance(v, int) for v in (heads, head_dim, out[-1])) or heads * head_dim != out[-1]:
        return None
    return Sibling(node, users[0], heads, head_dim)


def sibling_groups(graph: torch.fx.Graph) -> list[list[Sibling]]:
    """Fused int4 linears that read the same input (and activation qparams) at the same group size, with or
    without bias alike, each viewed as heads of one head size: groups of two or more, in graph order."""
    groups: dict[tuple, list[Sibling]] = {}
    for node in graph.nodes:
        op = node.meta.get(FUSED_TAG) if node.op == "call_function" else None
        if op not in MERGEABLE_OPS:
            continue
        sib = head_view(node)
        if sib is None or sib.heads * sib.head_dim % pack.GROUP_SCALES_N_ALIGN:
            continue
        w_at, _, _, gs_at, b_at = _MERGE_ARGS[op]
        reads = tuple(node.args[:w_at])  # the input (and its scale and zero point)
        key = (op, reads, node.args[gs_at], node.args[b_at] is None, sib.head_dim)
        groups.setdefault(key, []).append(sib)
    return [g for g in groups.values() if len(g) > 1]


def _stacked_args(ep: ExportedProgram, nodes: list[torch.fx.Node], widths: list[int], packer: ConstantPacker,
                  suffix: str) -> tuple[list, list[torch.fx.Node]]:
    """The first node's arguments with each constant replaced by the nodes' constants stacked by output column
    (each cut to its node's width), and the constants the nodes no longer need."""
    first = nodes[0]
    graph = first.graph
    w_at, sums_at, scales_at, _, b_at = _MERGE_ARGS[first.meta[FUSED_TAG]]

    def stacked(at: int, dim: int, what: str) -> torch.fx.Node:
        parts = [get_param_tensor(ep, n.args[at]) for n in nodes]
        parts = [p[..., :width] if dim == -1 else p for p, width in zip(parts, widths)]
        name = _constant_name(ep, first.args[w_at], f"_{suffix}{what}")
        return packer.new_constant(graph, name, torch.cat(parts, dim=dim))

    args = list(first.args)
    args[w_at] = stacked(w_at, 0, "")
    args[scales_at] = stacked(scales_at, -1, "_scales")
    if sums_at is not None:
        args[sums_at] = stacked(sums_at, -1, "_sums")
    if first.args[b_at] is not None:
        args[b_at] = stacked(b_at, -1, "_bias")
    orphans = [n.args[at] for n in nodes for at in (w_at, sums_at, scales_at, b_at)
               if at is not None and isinstance(n.args[at], torch.fx.Node)]
    return args, orphans


def merge_siblings(ep: ExportedProgram, siblings: list[Sibling], packer: ConstantPacker) -> list[torch.fx.Node]:
    """One fused linear over the stacked constants, a view to all heads, a slice per sibling in place of its view.

    Returns the constants the siblings no longer need."""
    first = siblings[0].node
    graph = first.graph
    args, orphans = _stacked_args(ep, [s.node for s in siblings], [s.heads * s.head_dim for s in siblings], packer,
                                  "merged")

    heads = sum(s.heads for s in siblings)
    head_dim = siblings[0].head_dim
    out_val = first.meta["val"]
    view_val = siblings[0].view.meta["val"]
    dim = len(view_val.shape) - 2
    # Before the first sibling: its inputs are defined there, and every user of a sibling's view comes later.
    with graph.inserting_before(first):
        merged = graph.create_node("call_function", first.target, args=tuple(args))
    merged.meta = dict(first.meta)
    with out_val.fake_mode:
        merged.meta["val"] = out_val.new_empty((*out_val.shape[:-1], heads * head_dim))
        all_heads_val = view_val.new_empty((*view_val.shape[:-2], heads, head_dim))
    with graph.inserting_after(merged):
        all_heads = graph.create_node("call_function", EDGE.aten.view_copy.default,
                                      args=(merged, [*siblings[0].view.args[1][:-2], heads, head_dim]))
    all_heads.meta = dict(siblings[0].view.meta)
    all_heads.meta["val"] = all_heads_val
    start, anchor = 0, all_heads
    for s in siblings:
        with graph.inserting_after(anchor):
            part = graph.create_node("call_function", EDGE.aten.slice_copy.Tensor,
                                     args=(all_heads, dim, start, start + s.heads))
        with out_val.fake_mode:
            part.meta = dict(s.view.meta)
            part.meta["val"] = s.view.meta["val"].new_empty(tuple(s.view.meta["val"].shape))
        rename_output(ep, s.view, part)
        s.view.replace_all_uses_with(part)
        start, anchor = start + s.heads, part
    for s in siblings:
        graph.erase_node(s.view)
        graph.erase_node(s.node)
    return orphans


# -- gate and up: one dispatch with the SiLU·mul after it (export --runtime qlower) ----
#
# An MLP's gate and up projections read the same input and meet in silu(gate) * up.
# Stacked (gate rows over up rows) they are one linear whose two column halves feed
# that product; qlower's runtime op computes the product in the linear's epilogue
# (qlower/vkops/rewrite.py), so the stock slices, sigmoid and muls never run.


def _silu_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node computing ``silu(node)`` when that is all ``node`` is used for (silu, or node * sigmoid(node))."""
    users = list(node.users)
    if len(users) == 1 and op_name(users[0]) == "silu.default":
        return users[0]
    sig = next((u for u in users if op_name(u) == "sigmoid.default"), None)
    if len(users) != 2 or sig is None or len(sig.users) != 1:
        return None
    mul = next(iter(sig.users))
    if op_name(mul) != "mul.Tensor" or set(mul.args) != {node, sig} or mul not in users:
        return None
    return mul


def gate_up_pairs(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(gate, up) fused int4 linears: same input, op, group size and bias-ness, equal widths (a multiple of the
    scales' padding), meeting only in ``silu(gate) * up``."""
    pairs = []
    for node in graph.nodes:
        op = node.meta.get(FUSED_TAG) if node.op == "call_function" else None
        if op not in MERGEABLE_OPS:
            continue
        silu = _silu_of(node)
        if silu is None or len(silu.users) != 1:
            continue
        mul = next(iter(silu.users))
        if op_name(mul) != "mul.Tensor" or len(mul.args) != 2 or silu not in mul.args:
            continue
        up = mul.args[1] if mul.args[0] is silu else mul.args[0]
        if not isinstance(up, torch.fx.Node) or up.meta.get(FUSED_TAG) != op or len(up.users) != 1:
            continue
        w_at, _, _, gs_at, b_at = _MERGE_ARGS[op]
        n = node.meta["val"].shape[-1]
        if (tuple(up.args[:w_at]) != tuple(node.args[:w_at]) or up.args[gs_at] != node.args[gs_at]
                or (up.args[b_at] is None) != (node.args[b_at] is None) or up.meta["val"].shape[-1] != n
                or not isinstance(n, int) or n % pack.GROUP_SCALES_N_ALIGN):
            continue
        pairs.append((node, up))
    return pairs


def merge_gate_up(ep: ExportedProgram, gate: torch.fx.Node, up: torch.fx.Node, packer: ConstantPacker) -> list[torch.fx.Node]:
    """One fused linear over gate's rows stacked on up's, a slice of its columns for each; returns the orphans."""
    graph = gate.graph
    n = gate.meta["val"].shape[-1]
    args, orphans = _stacked_args(ep, [gate, up], [n, n], packer, "gate_up")
    first, second = (gate, up) if list(graph.nodes).index(gate) < list(graph.nodes).index(up) else (up, gate)
    with graph.inserting_before(first):
        merged = graph.create_node("call_function", gate.target, args=tuple(args))
    merged.meta = dict(gate.meta)
    out_val = gate.meta["val"]
    with out_val.fake_mode:
        merged.meta["val"] = out_val.new_empty((*out_val.shape[:-1], 2 * n))
    last = len(out_val.shape) - 1
    anchor = merged
    for part, start in ((gate, 0), (up, n)):
        with graph.inserting_after(anchor):
            piece = graph.create_node("call_function", EDGE.aten.slice_copy.Tensor, args=(merged, last, start, start + n))
        piece.meta = {k: v for k, v in part.meta.items() if k != FUSED_TAG}
        part.replace_all_uses_with(piece)
        anchor = piece
    graph.erase_node(gate)
    graph.erase_node(up)
    return orphans
