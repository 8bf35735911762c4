"""Delegation fix-ups: make the whole edge program one Vulkan partition that loads.

Run on the edge program (``to_edge(...).exported_program()``) after fusion and
before ``VulkanPartitioner``. Each pass takes the ``ExportedProgram``, edits it
in place and returns whether it changed anything; :data:`PASSES` is the order.
:func:`run_delegation_passes` runs them all; :func:`cpu_notes` says which nodes
would still stay on the CPU, and why.

What the stock flow leaves on the CPU or hands to a runtime that cannot run
it, and the rewrite that fixes it:

- masks built from ``arange``/``full``/comparisons (SDPA ``is_causal``, HF
  mask functions): ``fold_constant_subgraphs`` evaluates every subgraph that
  depends on no user input and no parameter, so a causal mask for the fixed
  sequence length becomes one constant additive float mask;
- SDPA's "fully masked row" guard ``where(~any(~(s == -inf)), 0, softmax(s))``
  (``logical_not`` and ``any``: missing on the runtime, CPU in the partitioner):
  ``rewrite_softmax_guard`` drops it when the constant mask leaves every row a
  finite score, else computes the condition as ``amax(s) == -inf``;
- ``mul.Scalar``/``div.Scalar``/... (CPU kernels): ``scalar_ops_to_tensor``
  uses the Tensor overload with a one-element constant;
- integer ``eq``/``ne`` comparisons (the runtime has no
  ``binary_eq_<storage>_int32`` shader): ``int_compare_to_float`` compares in
  float, exact for integers below 2**24;
- ``_assert_*`` nodes: ``remove_asserts``;
- ``_adaptive_avg_pool2d`` (a CPU kernel) whose output divides its input:
  ``adaptive_pool_to_avg_pool`` makes it the equal plain ``avg_pool2d``;
- ``permute_copy`` pairs that undo each other (a dispatch and a copy each):
  ``fold_inverse_permutes``; the same copy of one tensor taken again and again
  (each a dispatch): ``dedupe_copies``; ``split_with_sizes_copy``, whose ET-VK
  outputs keep their upper-bound shape under a dynamic sequence length:
  ``split_to_slices``;
- ``mean``/``sum`` over two dims without ``keepdim`` (global average pooling
  written ``x.mean((2, 3))``; the partitioner's 2-D reduction needs keepdim,
  so it is a CPU kernel between two partitions): ``reduce_keepdim`` reduces
  with ``keepdim`` and drops the kept dims with a ``view_copy``.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from executorch.exir.dialects._ops import ops as exir_ops
from executorch.exir.passes.constant_prop_pass import (
    _QUANT_PRIMITIVES_EDGE,
    create_constant_nodes_and_return_specs,
)
from torch._export.utils import (
    get_buffer,
    get_lifted_tensor_constant,
    get_param,
    is_buffer,
    is_lifted_tensor_constant,
    is_param,
)
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.exported_program import InputKind, InputSpec, TensorArgument
from torch.utils import _pytree as pytree

from .patterns.linear import rename_output

__all__ = [
    "CpuNote",
    "PASSES",
    "cpu_notes",
    "fold_constant_subgraphs",
    "fold_inverse_permutes",
    "dedupe_copies",
    "split_to_slices",
    "int_compare_to_float",
    "remove_asserts",
    "rewrite_softmax_guard",
    "run_delegation_passes",
    "scalar_ops_to_tensor",
]

aten = exir_ops.edge.aten

# A folded constant larger than this stays computed on the device: folding
# an ``expand`` of a small table must not write a huge tensor into the .pte.
MAX_FOLDED_NUMEL = 1 << 22
# 1-D parameters up to this size seed constant folding (norm weights, biases); matrices stay as
# they are, for the linear patterns that match their transposes.
MAX_SEED_PARAM_NUMEL = 1 << 16


def _is_vector_param(t: torch.Tensor) -> bool:
    return t.dim() <= 1 and t.numel() <= MAX_SEED_PARAM_NUMEL


# --------------------------------------------------------------------------
# helpers


def _val(node: torch.fx.Node):
    return node.meta.get("val")


def _add_constant(
    ep: ExportedProgram, tensor: torch.Tensor, like: Optional[torch.fx.Node] = None
) -> torch.fx.Node:
    """A new lifted constant placeholder holding ``tensor``."""
    prefix = "_qlower_constant"
    i = len(ep.constants)
    while f"{prefix}{i}" in ep.constants:
        i += 1
    fqn = f"{prefix}{i}"
    ep.constants[fqn] = tensor
    first_user_input = next(
        n for n in ep.graph.nodes
        if n.op != "placeholder" or n.name in ep.graph_signature.user_inputs
    )
    with ep.graph.inserting_before(first_user_input):
        node = ep.graph.placeholder(fqn)
    if like is not None:
        node.meta.update(like.meta)
    fake_mode = detect_fake_mode(
        tuple(n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and "val" in n.meta)
    )
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
    specs = ep.graph_signature.input_specs
    user_at = next(
        (i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs)
    )
    specs.insert(
        user_at,
        InputSpec(
            kind=InputKind.CONSTANT_TENSOR,
            arg=TensorArgument(name=node.name),
            target=fqn,
            persistent=True,
        ),
    )
    return node


def _call(graph: torch.fx.Graph, target, args, val, like: torch.fx.Node) -> torch.fx.Node:
    node = graph.call_function(target, args)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["val"] = val
    return node


def _cleanup(ep: ExportedProgram) -> None:
    ep.graph.eliminate_dead_code()
    # Drop constant placeholders that nothing uses any more.
    used = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    sig = ep.graph_signature
    for node in list(ep.graph.nodes):
        if node.op != "placeholder" or node.users or node.name in sig.user_inputs:
            continue
        if node.name in sig.inputs_to_lifted_tensor_constants:
            ep.constants.pop(sig.inputs_to_lifted_tensor_constants[node.name], None)
        elif node.name in sig.inputs_to_buffers and node.name not in sig.buffers_to_mutate:
            name = sig.inputs_to_buffers[node.name]
            ep.constants.pop(name, None)
            ep.state_dict.pop(name, None)
        else:
            continue
        ep.graph.erase_node(node)
        used.discard(node.name)
    live = {n.name for n in ep.graph.nodes if n.op == "placeholder"}
    sig.input_specs = [s for s in sig.input_specs if s.arg.name in live]
    ep.graph_module.recompile()


# --------------------------------------------------------------------------
# passes


def fold_constant_subgraphs(ep: ExportedProgram) -> bool:
    """Evaluate subgraphs that depend on no user input.

    Seeds are constant buffers, lifted tensor constants and 1-D parameters
    (norm weights: Gemma's ``1 + weight`` must be a constant for ET-VK's fused
    ``rms_norm``, which prepacks its weight), never weight matrices, so
    quantized weights keep their dequantize nodes and float ones their
    transposes for the fusion patterns, nor buffers a program mutates (KV caches). Quantization primitives and impure ops are
    never folded.
    """
    sig = ep.graph_signature
    const: "OrderedDict[torch.fx.Node, torch.Tensor]" = OrderedDict()
    for node in ep.graph.find_nodes(op="placeholder"):
        if is_lifted_tensor_constant(ep, node):
            const[node] = get_lifted_tensor_constant(ep, node)
        elif is_buffer(ep, node) and node.name not in sig.buffers_to_mutate:
            const[node] = get_buffer(ep, node)
        elif is_param(ep, node) and _is_vector_param(get_param(ep, node)):
            const[node] = get_param(ep, node).detach()
    seeds = set(const)
    skip = set(_QUANT_PRIMITIVES_EDGE)
    outputs = set(ep.graph.find_nodes(op="output")[0].all_input_nodes)

    def is_const(arg) -> bool:
        leaves = pytree.tree_leaves((arg,))
        return all(not isinstance(x, torch.fx.Node) or x in const for x in leaves)

    for node in ep.graph.nodes:
        if (
            node.op != "call_function"
            or node.target in skip
            or node in outputs
            or node.is_impure()
            or not is_const(node.args)
            or not is_const(node.kwargs)
        ):
            continue
        args, kwargs = pytree.tree_map_only(
            torch.fx.Node, lambda n: const[n], (node.args, node.kwargs)
        )
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if isinstance(value, torch.Tensor):
            if value.numel() > MAX_FOLDED_NUMEL:
                continue
            value = value.contiguous()
        elif node.target is not operator.getitem:
            continue
        const[node] = value

    folded = OrderedDict((n, t) for n, t in const.items() if n not in seeds)
    # Only the frontier (a folded node some live node still reads) becomes a
    # constant; everything behind it is erased.
    frontier = OrderedDict(
        (n, t) for n, t in folded.items()
        if isinstance(t, torch.Tensor) and any(u not in const for u in n.users)
    )
    if not frontier:
        return False
    name_to_spec = {s.arg.name: s for s in sig.input_specs}
    name_to_spec.update(create_constant_nodes_and_return_specs(frontier, ep))
    sig.input_specs = [
        name_to_spec[n.name] for n in ep.graph.find_nodes(op="placeholder")
    ]
    _cleanup(ep)
    return True


def _softmax_guard(where: torch.fx.Node):
    """Match SDPA's guard; return (softmax, scores, guard condition) or None.

    where(logical_not(any(logical_not(eq(s, -inf)), -1, True)), 0, softmax(s))
    """
    if where.target != aten.where.self:
        return None
    cond, zeros, sm = where.args
    if not (isinstance(sm, torch.fx.Node) and sm.target == aten._softmax.default):
        return None
    if not (
        isinstance(zeros, torch.fx.Node)
        and zeros.target in (aten.full_like.default, aten.zeros_like.default)
        and (zeros.target == aten.zeros_like.default or zeros.args[1] == 0)
    ):
        return None
    chain = [aten.logical_not.default, aten.any.dim, aten.logical_not.default, aten.eq.Scalar]
    n = cond
    for target in chain:
        if not isinstance(n, torch.fx.Node) or n.target != target:
            return None
        if target == aten.any.dim and not (n.args[1] in (-1, len(_val(n).shape) - 1)):
            return None
        if target != chain[-1]:
            n = n.args[0]
    eq = n
    if eq.args[1] != -math.inf or eq.args[0] is not sm.args[0]:
        return None
    return sm, sm.args[0], cond


def _every_row_has_finite(ep: ExportedProgram, scores: torch.fx.Node) -> bool:
    """True when ``scores`` is ``x + mask`` with a constant mask that leaves a
    finite entry in every row (along the last dim), so no row is all -inf."""
    if scores.target != aten.add.Tensor:
        return False
    for arg in scores.args[:2]:
        if isinstance(arg, torch.fx.Node) and is_lifted_tensor_constant(ep, arg):
            mask = get_lifted_tensor_constant(ep, arg)
            if mask.is_floating_point() and mask.dim() >= 1:
                return bool(torch.isfinite(mask).any(dim=-1).all())
    return False


def rewrite_softmax_guard(ep: ExportedProgram) -> bool:
    """Drop or re-express SDPA's fully-masked-row guard (see module doc)."""
    changed = False
    graph = ep.graph
    for where in list(graph.nodes):
        m = _softmax_guard(where)
        if m is None:
            continue
        sm, scores, cond = m
        if _every_row_has_finite(ep, scores):
            where.replace_all_uses_with(sm)
        else:
            # all(s == -inf) along the row  <=>  amax(s) == -inf
            with graph.inserting_before(where):
                sval = _val(scores)
                red = sval.amax(dim=-1, keepdim=True)
                amax = _call(graph, aten.amax.default, (scores, [-1], True), red, cond)
                new_cond = _call(
                    graph, aten.eq.Scalar, (amax, -math.inf), red == -math.inf, cond
                )
            where.replace_input_with(cond, new_cond)
        changed = True
    if changed:
        _cleanup(ep)
    return changed


_SCALAR_TO_TENSOR = {
    aten.mul.Scalar: aten.mul.Tensor,
    aten.div.Scalar: aten.div.Tensor,
    aten.add.Scalar: aten.add.Tensor,
    aten.sub.Scalar: aten.sub.Tensor,
}


def scalar_ops_to_tensor(ep: ExportedProgram) -> bool:
    """``mul.Scalar(x, c)`` → ``mul.Tensor(x, const([c]))`` (likewise div/add/sub).

    The partitioner has no Scalar overloads of these (CPU kernels that split
    the graph); the runtime broadcasts a one-element constant.
    """
    changed = False
    for node in list(ep.graph.nodes):
        target = _SCALAR_TO_TENSOR.get(node.target)
        if target is None:
            continue
        x, scalar = node.args[:2]
        xval = _val(x)
        if not isinstance(xval, torch.Tensor) or not xval.is_floating_point():
            continue
        alpha = node.kwargs.get("alpha", 1)
        if node.target in (aten.add.Scalar, aten.sub.Scalar):
            scalar = scalar * alpha
        const = _add_constant(ep, torch.full([1] * max(xval.dim(), 1), float(scalar), dtype=xval.dtype))
        with ep.graph.inserting_before(node):
            new = _call(ep.graph, target, (x, const), _val(node), node)
        node.replace_all_uses_with(new)
        ep.graph.erase_node(node)
        changed = True
    if changed:
        _cleanup(ep)
    return changed


def adaptive_pool_to_avg_pool(ep: ExportedProgram) -> bool:
    """``_adaptive_avg_pool2d(x, out)`` → ``avg_pool2d(x, k, k)`` when out divides the input.

    The runtime has no adaptive pooling (a CPU kernel that splits the graph);
    with H and W multiples of the output size every window is the same
    ``k = in / out``, which is exactly a plain average pool.
    """
    changed = False
    for node in list(ep.graph.nodes):
        if node.target != aten._adaptive_avg_pool2d.default:
            continue
        x, out_size = node.args[:2]
        xval = _val(x)
        if not isinstance(xval, torch.Tensor) or xval.dim() < 3:
            continue
        h, w = int(xval.shape[-2]), int(xval.shape[-1])
        oh, ow = (list(out_size) * 2)[:2] if len(out_size) == 1 else list(out_size)
        if not oh or not ow or h % oh or w % ow:
            continue
        kernel = [h // oh, w // ow]
        with ep.graph.inserting_before(node):
            new = _call(ep.graph, aten.avg_pool2d.default, (x, kernel, kernel), _val(node), node)
        node.replace_all_uses_with(new)
        ep.graph.erase_node(node)
        changed = True
    return changed


_KEEPDIM_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}


def reduce_keepdim(ep: ExportedProgram) -> bool:
    """``mean(x, dims)`` the partitioner refuses → ``view_copy(mean(x, dims, keepdim=True))``.

    Only where ExecuTorch's own support check refuses the node and accepts it
    with ``keepdim``; the values are the same, the kept dims of size 1 are
    dropped by the view.
    """
    from executorch.backends.vulkan.op_registry import is_reduce_node_supported

    changed = False
    graph = ep.graph
    for node in list(graph.nodes):
        if node.target not in _KEEPDIM_REDUCTIONS or node.kwargs.get("dtype") is not None:
            continue
        x, dims = node.args[0], node.args[1]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if keepdim or not isinstance(_val(x), torch.Tensor) or dims is None or is_reduce_node_supported(node):
            continue
        kept_shape = [1 if i in {d % _val(x).dim() for d in dims} else s for i, s in enumerate(_val(x).shape)]
        with graph.inserting_before(node):
            kept_val = _val(node).reshape(kept_shape)
            reduced = _call(graph, node.target, (x, list(dims), True), kept_val, node)
            if not is_reduce_node_supported(reduced):
                graph.erase_node(reduced)
                continue
            view = _call(graph, aten.view_copy.default, (reduced, list(_val(node).shape)), _val(node), node)
        node.replace_all_uses_with(view)
        graph.erase_node(node)
        changed = True
    if changed:
        ep.graph_module.recompile()
    return changed


_INT_COMPARE = {aten.eq.Tensor, aten.ne.Tensor, aten.eq.Scalar, aten.ne.Scalar}
_EXACT_INT_IN_FLOAT = 1 << 24


def int_compare_to_float(ep: ExportedProgram) -> bool:
    """Compare integer tensors as float32 (exact below 2**24).

    The runtime builds ``binary_eq_<storage>_int32`` for an int ``eq.Tensor``
    and has no such shader; its float variants exist.
    """
    changed = False
    graph = ep.graph
    for node in list(graph.nodes):
        if node.target not in _INT_COMPARE:
            continue
        args = list(node.args)
        ints = [
            a for a in args[:2]
            if isinstance(a, torch.fx.Node)
            and isinstance(_val(a), torch.Tensor)
            and not _val(a).is_floating_point()
            and _val(a).dtype != torch.bool
        ]
        if not ints:
            continue
        if any(isinstance(a, int) and abs(a) >= _EXACT_INT_IN_FLOAT for a in args[:2]):
            continue
        with graph.inserting_before(node):
            for i, a in enumerate(args[:2]):
                if a in ints:
                    fval = _val(a).to(torch.float32)
                    args[i] = _call(
                        graph, aten._to_copy.default, (a,), fval, node
                    )
                    args[i].kwargs = {"dtype": torch.float32}
                elif isinstance(a, int):
                    args[i] = float(a)
        node.args = tuple(args)
        changed = True
    if changed:
        ep.graph_module.recompile()
    return changed


_ASSERTS = {
    torch.ops.aten._assert_async.msg,
    torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
}


def remove_asserts(ep: ExportedProgram) -> bool:
    """Drop runtime asserts (and the ``any``/``all`` that only feed them).

    They check conditions that export already proved for the traced shapes;
    on the device they are CPU kernels between partitions.
    """
    changed = False
    for node in list(ep.graph.nodes):
        target = getattr(node.target, "_op", node.target)
        if node.op == "call_function" and (node.target in _ASSERTS or target in _ASSERTS):
            ep.graph.erase_node(node)
            changed = True
    if changed:
        _cleanup(ep)
    return changed


def fold_inverse_permutes(ep: ExportedProgram) -> bool:
    """``permute_copy(permute_copy(x, p), q)`` whose composition is the identity → ``x``.

    Each permute is a dispatch and a copy on the device. Such pairs come from
    layout changes that undo each other across module boundaries (a
    ``transpose(1, 2)`` into attention and back out of it, per layer).
    """
    changed = False
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target != aten.permute_copy.default:
            continue
        inner = node.args[0]
        if not isinstance(inner, torch.fx.Node) or inner.target != aten.permute_copy.default:
            continue
        p, q = list(inner.args[1]), list(node.args[1])
        rank = len(p)
        if len(q) != rank:
            continue
        p = [d % rank for d in p]
        q = [d % rank for d in q]
        if [p[i] for i in q] != list(range(rank)):
            continue
        node.replace_all_uses_with(inner.args[0])
        rename_output(ep, node, inner.args[0])
        ep.graph.erase_node(node)
        changed = True
    if changed:
        _cleanup(ep)
    return changed


# Pure copies and views: two nodes with one target and equal arguments compute the same tensor.
_CSE_TARGETS = frozenset({
    aten.select_copy.int, aten.slice_copy.Tensor, aten.view_copy.default, aten.unsqueeze_copy.default,
    aten.squeeze_copy.dims, aten.permute_copy.default, aten.expand_copy.default, aten._to_copy.default,
})


def dedupe_copies(ep: ExportedProgram) -> bool:
    """Merge repeated pure copies of one tensor (``cos[0]`` taken again by every layer's RoPE, say)."""
    seen: dict[tuple, torch.fx.Node] = {}
    changed = False
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target not in _CSE_TARGETS:
            continue
        try:
            key = (node.target, _hashable_args(node.args), _hashable_args(tuple(sorted(node.kwargs.items()))))
        except TypeError:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            rename_output(ep, node, first)
            ep.graph.erase_node(node)
            changed = True
    if changed:
        _cleanup(ep)
    return changed


def split_to_slices(ep: ExportedProgram) -> bool:
    """``split_with_sizes_copy`` → one ``slice_copy`` per piece.

    ET-VK's split copies fixed texture ranges and never resizes its outputs, so
    with a dynamic sequence length (a KV-cache prefill of T tokens) the pieces
    keep their upper-bound shape; a slice is resized with its input.
    """
    changed = False
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target != aten.split_with_sizes_copy.default:
            continue
        src, sizes = node.args[0], list(node.args[1])
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not all(u.target is operator.getitem for u in node.users):
            continue
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for user in list(node.users):
            i = user.args[1]
            with ep.graph.inserting_before(user):
                piece = ep.graph.call_function(aten.slice_copy.Tensor, (src, dim, starts[i], starts[i] + sizes[i], 1))
            piece.meta = dict(user.meta)
            user.replace_all_uses_with(piece)
            rename_output(ep, user, piece)
            ep.graph.erase_node(user)
        ep.graph.erase_node(node)
        changed = True
    if changed:
        _cleanup(ep)
    return changed


def _hashable_args(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable_args(v) for v in value)
    if isinstance(value, (torch.fx.Node, int, float, bool, str, type(None), torch.dtype, torch.memory_format,
                          torch.layout, torch.device)):
        return value
    raise TypeError(f"unhashable argument {type(value).__name__}")


PASSES: list[Callable[[ExportedProgram], bool]] = [
    remove_asserts,
    fold_inverse_permutes,
    dedupe_copies,
    split_to_slices,
    fold_constant_subgraphs,
    rewrite_softmax_guard,
    scalar_ops_to_tensor,
    int_compare_to_float,
    adaptive_pool_to_avg_pool,
    reduce_keepdim,
]


def run_delegation_passes(ep: ExportedProgram) -> list[str]:
    """Run :data:`PASSES` in order on ``ep`` (in place); names of those that changed it."""
    return [p.__name__ for p in PASSES if p(ep)]


# --------------------------------------------------------------------------
# what stays on the CPU


@dataclass(frozen=True)
class CpuNote:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}) stays on CPU: {self.reason}"


def cpu_notes(ep: ExportedProgram, compile_options: Optional[dict] = None) -> list[CpuNote]:
    """Nodes the Vulkan partitioner would not take, each with its reason.

    Asks the partitioner's own support check, so the reasons are its words.
    """
    import logging

    from executorch.backends.vulkan import patterns as vk_patterns
    from executorch.backends.vulkan import utils as vk_utils
    from executorch.backends.vulkan.partitioner import vulkan_partitioner as vp

    from qlower.lower_speedups import vulkan_patterns_once

    options = compile_options or {}
    # Nodes of a fusable pattern (fused linears included) are taken whole, as
    # VulkanPartitioner.partition does.
    with vulkan_patterns_once(ep):
        fusable = vk_patterns.get_all_fusable_subgraphs(ep.graph_module)
    support = vp.VulkanSupportedOperators(
        options.get("texture_limits", vk_utils.DEFAULT_TEXTURE_LIMITS),
        options.get("buffer_limit", vk_utils.DEFAULT_BUFFER_LIMIT),
        skip_bool_tensors=options.get("skip_bool_tensors", False),
        fusable_subgraphs=fusable,
    )
    reasons: dict[torch.fx.Node, str] = {}
    support.log_skip = lambda node, reason: reasons.setdefault(node, reason)
    notes = []
    level = vp.logger.level
    vp.logger.setLevel(logging.WARNING)
    try:
        for node in ep.graph.nodes:
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            if not support.is_node_supported({}, node):
                op = getattr(node.target, "__name__", str(node.target))
                notes.append(CpuNote(node.name, op, reasons.get(node, "not supported")))
    finally:
        vp.logger.setLevel(level)
    return notes
