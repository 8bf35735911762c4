"""The Vulkan preprocess pass of ``export --runtime qlower``: stock fused ops → ``qlower.*`` runtime ops.

It runs inside each Vulkan partition's preprocess, right after ExecuTorch's own
pattern fusions (``FusePatternsPass``: RMSNorm, RoPE, KV-cache SDPA) and before
the memory-layout and memory-planning passes, so the ops it writes are laid out
and planned as any other. Rewrites, each one exact (the new op computes what the
nodes it replaces computed; :mod:`qlower.references`):

* ``et_vk.rms_norm`` → ``qlower.rms_norm``; ``llama.sdpa_with_kv_cache`` → ``qlower.sdpa_with_kv_cache``;
* ``choose_qparams_affine`` + ``et_vk.linear_dq8ca_q4gsw`` (or ``et_vk.linear_q4gsw``) → ``qlower.linear_q4gsw``
  (the library quantizes the input itself, and only where it is used: several rows);
* that linear's only use a residual add → the add folded in (``residual``);
* a stacked gate/up linear (``fuse.merge_gate_up``) whose halves feed ``silu(gate) * up`` → ``epilogue="silu_mul"``;
* a merged Q/K/V linear viewed as heads and sliced into parts → ``qlower.linear_q4gsw_split``.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator

import torch

from . import RUNTIME_QLOWER
from ..patterns.linear import rename_output
from .ops import edge_ops, register_vulkan_features

_LINEAR_ARGS = {  # positions of (x, weights, weight_sums, weight_scales, group_size, bias)
    "et_vk.linear_dq8ca_q4gsw.default": (0, 3, 4, 5, 6, 7),
    "et_vk.linear_q4gsw.default": (0, 1, None, 2, 3, 4),
}


def full_name(node: Any) -> str:
    """``ns.op.overload`` of a call_function node ('' otherwise), for edge and torch ops alike."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.name().replace('::', '.')}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _replace(program, node: torch.fx.Node, target, args: tuple, like: torch.fx.Node) -> torch.fx.Node:
    """A new node computing ``like``'s value from ``args``, inserted before ``node``; ``like``'s uses (and its
    place among the program's outputs) move to it."""
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.create_node("call_function", target, args=args)
    new.meta = dict(like.meta)
    like.replace_all_uses_with(new)
    rename_output(program, like, new)
    return new


def _rename(program, names: dict[str, Any]) -> int:
    graph = program.graph_module.graph
    done = 0
    for node in list(graph.nodes):
        target = names.get(full_name(node))
        if target is not None:
            new = _replace(program, node, target, tuple(node.args), node)
            new.kwargs = dict(node.kwargs)
            graph.erase_node(node)
            done += 1
    return done


def _erase_unused(node: torch.fx.Node) -> None:
    """Erase ``node`` and, transitively, the computed nodes that only it read (the replaced chain)."""
    dead = [node]
    while dead:
        n = dead.pop()
        if n.graph is not None and not n.users:
            inputs = list(n.all_input_nodes)
            n.graph.erase_node(n)
            dead.extend(a for a in inputs if a.op == "call_function")


def _is_residual_add(add: torch.fx.Node, y: torch.fx.Node) -> torch.fx.Node | None:
    """The other operand of ``add = y + r`` (alpha 1, same shape and dtype), or None."""
    if full_name(add) != "aten.add.Tensor" or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    a, b = add.args
    other = b if a is y else a if b is y else None
    if not isinstance(other, torch.fx.Node) or other is y:
        return None
    want, got = add.meta.get("val"), other.meta.get("val")
    if want is None or got is None or tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
        return None
    return other


def _silu_mul(y: torch.fx.Node) -> torch.fx.Node | None:
    """The ``mul`` computing ``silu(y[..., :F]) * y[..., F:]`` when ``y``'s uses are exactly that, else None."""
    n = y.meta["val"].shape[-1]
    if not isinstance(n, int) or n % 2:
        return None
    f, last = n // 2, len(y.meta["val"].shape) - 1
    halves = {}
    for user in y.users:
        if full_name(user) != "aten.slice_copy.Tensor" or len(user.args) < 4:
            return None
        dim, start, end = user.args[1], user.args[2], user.args[3]
        step = user.args[4] if len(user.args) > 4 else 1
        if dim not in (-1, last) or step != 1 or (start, min(end, n)) not in ((0, f), (f, n)):
            return None
        halves[start] = user
    if set(halves) != {0, f}:
        return None
    gate, up = halves[0], halves[f]
    act = _only_user(gate) if len(gate.users) == 1 else None
    if full_name(act) == "aten.silu.default":
        silu = act
    else:  # silu decomposed: gate * sigmoid(gate)
        sig = next((u for u in gate.users if full_name(u) == "aten.sigmoid.default"), None)
        if sig is None or len(gate.users) != 2 or len(sig.users) != 1:
            return None
        silu = _only_user(sig)
        if full_name(silu) != "aten.mul.Tensor" or set(silu.args) != {gate, sig}:
            return None
    mul = _only_user(silu)
    if full_name(mul) != "aten.mul.Tensor" or set(mul.args) != {silu, up} or len(up.users) != 1:
        return None
    return mul


def _head_slices(y: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node], int] | None:
    """``y``'s only use a view to ``[..., heads, head_dim]`` whose uses are slices along the heads that cover
    them in order: (view, slices in column order, head_dim), else None."""
    view = _only_user(y)
    if full_name(view) != "aten.view_copy.default":
        return None
    shape, viewed = y.meta["val"].shape, view.meta["val"].shape
    if len(viewed) != len(shape) + 1 or not all(isinstance(v, int) for v in (viewed[-1], viewed[-2], shape[-1])):
        return None
    heads, head_dim = viewed[-2], viewed[-1]
    if heads * head_dim != shape[-1]:
        return None
    parts = []
    for user in view.users:
        if full_name(user) != "aten.slice_copy.Tensor" or len(user.args) < 4:
            return None
        step = user.args[4] if len(user.args) > 4 else 1
        if user.args[1] not in (-2, len(viewed) - 2) or step != 1:
            return None
        parts.append((user.args[2], min(user.args[3], heads), user))
    parts.sort(key=lambda p: p[0])
    at = 0
    for start, end, _ in parts:
        if start != at or end <= start:
            return None
        at = end
    if at != heads or len(parts) < 2:
        return None
    return view, [p[2] for p in parts], head_dim


def _fuse_linears(program, linear_op, split_op) -> int:
    graph = program.graph_module.graph
    done = 0
    for node in list(graph.nodes):
        at = _LINEAR_ARGS.get(full_name(node))
        if at is None or node.graph is None:
            continue
        x, w, sums, scales, gs, bias = (node.args[i] if i is not None and i < len(node.args) else None for i in at)
        quantize_input = at[2] is not None
        sliced = _head_slices(node)
        if sliced is not None:
            view, parts, head_dim = sliced
            sizes = [int(p.meta["val"].shape[-2]) * head_dim for p in parts]
            with graph.inserting_before(node):
                new = graph.create_node("call_function", split_op,
                                        args=(x, w, sums, scales, gs, bias, quantize_input, sizes, head_dim))
            new.meta = dict(node.meta)
            new.meta["val"] = [p.meta["val"] for p in parts]
            for i, part in enumerate(parts):
                with graph.inserting_before(part):
                    item = graph.create_node("call_function", operator.getitem, args=(new, i))
                item.meta = dict(part.meta)
                part.replace_all_uses_with(item)
                rename_output(program, part, item)
                graph.erase_node(part)
            graph.erase_node(view)
            _erase_unused(node)
            done += 1
            continue
        residual, epilogue, last = None, "none", node
        mul = _silu_mul(node)
        if mul is not None:
            epilogue, last = "silu_mul", mul
        add = _only_user(last)
        if add is not None:
            residual = _is_residual_add(add, last)
            if residual is not None:
                last = add
        # In place of `last`, which reads everything the new node reads (the residual included).
        _replace(program, last, linear_op, (x, w, sums, scales, gs, bias, residual, quantize_input, epilogue), last)
        _erase_unused(last)
        done += 1
    return done


def _check_order(graph: torch.fx.Graph) -> None:
    """Each fused op sits where the last node it replaces sat, after everything it reads: checked."""
    seen = set()
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            if arg not in seen:
                raise AssertionError(f"{node.name} reads {arg.name} before it is computed")
        seen.add(node)


def to_qlower_ops(program):
    """The preprocess pass: rewrite ``program``'s graph in place (see the module docstring); returns it."""
    linear_op, split_op, rms_op, sdpa_op = edge_ops()
    graph = program.graph_module.graph
    _rename(program, {"et_vk.rms_norm.default": rms_op, "llama.sdpa_with_kv_cache.default": sdpa_op})
    _fuse_linears(program, linear_op, split_op)
    _check_order(graph)
    program.graph_module.recompile()
    return program


@contextlib.contextmanager
def runtime_ops(runtime: str) -> Iterator[None]:
    """Within the block, Vulkan lowering writes qlower's runtime ops when ``runtime`` is ``"qlower"``.

    ExecuTorch's preprocess runs its graph passes in a few lists (``vulkan_preprocess.apply_passes``);
    :func:`to_qlower_ops` joins the list that holds its pattern fusions, at its end.
    """
    if runtime != RUNTIME_QLOWER:
        yield
        return
    from executorch.backends.vulkan import vulkan_preprocess

    register_vulkan_features()
    apply_passes = vulkan_preprocess.apply_passes

    def apply(program, passes):
        passes = list(passes)
        if any(type(p).__name__ == "FusePatternsPass" for p in passes):
            passes.append(to_qlower_ops)
        return apply_passes(program, passes)

    vulkan_preprocess.apply_passes = apply
    try:
        yield
    finally:
        vulkan_preprocess.apply_passes = apply_passes
