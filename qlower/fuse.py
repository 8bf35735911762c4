"""qlower's fusion stage: named graph passes on the edge program, before partitioning.

Usage (the export pipeline, between ``to_edge`` and ``VulkanPartitioner``)::

    edge = to_edge(exported)                       # EdgeProgramManager
    report = run_fusion(edge.exported_program())   # rewrites it in place
    edge = edge.to_backend(VulkanPartitioner())
    pte = edge.to_executorch().buffer

:func:`run_fusion` rewrites the ``ExportedProgram`` **in place** (graph, state
dict, signature) and returns a :class:`FusionReport` with one entry per
linear-like node: its module, N, K, group size, scheme, and either the fused
``et_vk`` op or the first guard that failed. Its constants are packed here
(:mod:`qlower.pack`), so ExecuTorch's own pattern pass inside the Vulkan
backend finds nothing left to fuse and nothing is packed twice.

Passes (:data:`FUSION_PASSES`, run in order, each ``fn(ep, ctx) -> changes``):

``share_act_qparams``
    Sibling linears that read the same activation (Q/K/V, gate/up) each get
    their own ``choose_qparams_affine`` from torchao; they compute the same
    per-token scales, so keep one. ExecuTorch 1.5.1 keeps all of them.
``fuse_quantized_linear``
    dequantize → linear (→ quantize) chains, and the export pipeline's
    one-node ``qlower.quantized_linear``, → ``et_vk`` fused linears
    (:mod:`qlower.patterns.linear` lists the routes and guards). Those one-node
    linears get one ``choose_qparams_affine`` per distinct input here.
``merge_sibling_projections``
    Fused int4 linears that read the same input and whose outputs are each
    viewed as [..., heads, head_dim] (Q, K and V) become one linear over the
    stacked constants, one view to all heads and a slice per part: the same
    numbers in fewer dispatches (each costs ~6 us on a GPU before any work).
``merge_gate_up``
    Only for ``export --runtime qlower``: an MLP's gate and up linears, which read the same
    input and meet in ``silu(gate) * up``, become one linear over the stacked constants and a
    slice of its columns each; the Vulkan preprocess pass of :mod:`qlower.vkops.rewrite` then
    folds the slices and the SiLU·mul into qlower's runtime linear.
``fuse_quantized_embedding``
    The quantize stage's ``qlower.embedding_int4`` (its table already in the
    fused linears' int4 layout) → ``et_vk.embedding_q4gsw``.
``fuse_q8ta_conv``
    Static int8 ``q → dq → convolution [→ relu | ReLU6] → q`` → ``et_vk.q8ta_conv2d``,
    ``_dw``, ``_pw`` or ``_transposed`` (:mod:`qlower.patterns.conv`), int8 in and int8 out; every
    convolution gets a report entry (C_out, C_in, kernel, stride, groups).
``fuse_q8ta_add``
    ``dq + dq [→ relu] → q`` → ``et_vk.q8ta_add``, so residual connections stay int8.
``drop_unused_constants``
    Dead dequantize nodes go, and so do the constants only they read
    (weight zero points), so they do not end up in the ``.pte``.

Glossary: qta8a = per-token int8 activation, qga4w = group-wise int4 weight,
q8ta = per-tensor int8 activation, q8csw = per-channel symmetric int8 weight,
dq8ca = dynamically quantized int8 activation.
"""

from __future__ import annotations

import operator
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from executorch.backends.transforms.utils import delete_constant_placeholder
from executorch.exir import ExportedProgram

# Importing registers the et_vk ops (and their CPU reference kernels) with torch.
import executorch.backends.vulkan.custom_ops_lib  # noqa: F401

from qlower.patterns import conv as conv_family
from qlower.patterns import linear as linear_family
from qlower.patterns.linear import LinearInfo, is_choose_qparams

Log = Callable[[str], None]

linear_family.register_partition_pattern()


@dataclass
class FusionReport:
    """Per-layer outcome of the fusion stage; ``to_dict()`` is JSON-ready."""

    layers: list[LinearInfo] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)  # {"name", "changes", "seconds"}

    @property
    def fused(self) -> list[LinearInfo]:
        return [l for l in self.layers if l.fused_op]

    @property
    def unfused(self) -> list[LinearInfo]:
        return [l for l in self.layers if not l.fused_op]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for l in self.fused:
            counts[l.fused_op] = counts.get(l.fused_op, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(l) for l in self.layers],
            "fused": len(self.fused),
            "unfused": len(self.unfused),
            "ops": self.op_counts(),
            "passes": list(self.passes),
        }

    def table(self) -> str:
        """Plain-text table, one row per linear or convolution."""
        rows = [("module", "N", "K", "group", "conv", "scheme", "result")]
        for l in self.layers:
            result = l.fused_op or f"unfused: {l.reason}"
            if l.note:
                result += f" ({l.note})"
            conv = conv_family.shape_text(l) if isinstance(l, conv_family.ConvInfo) else "-"
            rows.append((l.module, _s(l.n), _s(l.k), _s(l.group_size), conv, l.scheme, result))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows
        )


def _s(v) -> str:
    return "-" if v is None else str(v)


@dataclass
class FusionContext:
    report: FusionReport
    packer: linear_family.ConstantPacker
    orphans: list[torch.fx.Node] = field(default_factory=list)
    act_qparams: dict = field(default_factory=dict)  # input node -> (scale, zero point) nodes


# -- passes --------------------------------------------------------------------

def share_act_qparams(ep: ExportedProgram, ctx: FusionContext) -> int:
    """Merge choose_qparams nodes with the same input and arguments into the first."""
    graph = ep.graph_module.graph
    first: dict[tuple, torch.fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if not is_choose_qparams(node):
            continue
        key = (node.target, _hashable(node.args), _hashable(node.kwargs))
        keep = first.setdefault(key, node)
        if keep is node:
            continue
        # Point each getitem of the duplicate at the same getitem of the kept node.
        kept_items = {u.args[1]: u for u in keep.users if u.target is operator.getitem}
        for item in list(node.users):
            twin = kept_items.get(item.args[1]) if item.target is operator.getitem else None
            if twin is not None:
                item.replace_all_uses_with(twin)
                graph.erase_node(item)
        node.replace_all_uses_with(keep)
        graph.erase_node(node)
        merged += 1
    if merged:
        graph.eliminate_dead_code()
    return merged


def fuse_quantized_linear(ep: ExportedProgram, ctx: FusionContext) -> int:
    """Replace every matching linear chain by its et_vk op; report every linear."""
    fused = 0
    for node in list(ep.graph_module.graph.nodes):
        if node.graph is None:  # erased earlier in this loop
            continue
        match, info = linear_family.detect(ep, node)
        if info is None:
            continue
        ctx.report.layers.append(info)
        if match is None:
            continue
        if match.op == "linear_dq8ca_q4gsw" and match.input_scale is None:  # qlower::quantized_linear
            match.input_scale, match.input_zp = linear_family.act_qparams(match.anchor, match.x, ctx.act_qparams)
        linear_family.replace(ep, match, ctx.packer)
        ctx.orphans.extend(match.orphans)
        fused += 1
    if fused:
        ep.graph_module.graph.eliminate_dead_code()
    return fused


def merge_sibling_projections(ep: ExportedProgram, ctx: FusionContext) -> int:
    """Q/K/V-like sibling linears → one fused linear, a view and a slice each; their report lines say so."""
    infos = {info.module: info for info in ctx.report.layers if info.fused_op}
    merged = 0
    for group in linear_family.sibling_groups(ep.graph_module.graph):
        modules = [linear_family.module_fqn(s.node) for s in group]
        ctx.orphans.extend(linear_family.merge_siblings(ep, group, ctx.packer))
        for module in modules:
            info = infos.get(module)
            if info is not None:
                others = ", ".join(m.rsplit(".", 1)[-1] for m in modules if m != module)
                info.note = "; ".join(filter(None, [info.note, f"one dispatch with {others}"]))
        merged += 1
    if merged:
        ep.graph_module.graph.eliminate_dead_code()
    return merged


def merge_gate_up(ep: ExportedProgram, ctx: FusionContext) -> int:
    """(``--runtime qlower``) gate/up linears meeting in ``silu(gate) * up`` → one linear over the stacked
    constants and a slice of its columns each; qlower's runtime op then computes the product in its epilogue."""
    infos = {info.module: info for info in ctx.report.layers if info.fused_op}
    merged = 0
    for gate, up in linear_family.gate_up_pairs(ep.graph_module.graph):
        modules = [linear_family.module_fqn(n) for n in (gate, up)]
        ctx.orphans.extend(linear_family.merge_gate_up(ep, gate, up, ctx.packer))
        for module, other in (modules, modules[::-1]):
            info = infos.get(module)
            if info is not None:
                info.note = "; ".join(filter(None, [info.note, f"one dispatch with {other.rsplit('.', 1)[-1]} and SiLU·mul"]))
        merged += 1
    if merged:
        ep.graph_module.graph.eliminate_dead_code()
    return merged


def fuse_quantized_embedding(ep: ExportedProgram, ctx: FusionContext) -> int:
    """``qlower.embedding_int4`` → ``et_vk.embedding_q4gsw`` reading the table as a linear's int4 weight.

    The table is not read or repacked: it was packed in that layout when it was quantized.
    """
    import qlower.quantize  # noqa: F401  (registers qlower::embedding_int4)

    graph = ep.graph_module.graph
    target = linear_family.EDGE.qlower.embedding_int4.default
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != target:
            continue
        packed, scales, group_size, indices = node.args
        linear_family.stored_int4_group_size("embedding_q4gsw", group_size, linear_family.module_fqn(node))
        with graph.inserting_before(node):
            new = graph.create_node("call_function", linear_family.EDGE.et_vk.embedding_q4gsw.default,
                                    args=(packed, scales, group_size, indices, True))
        new.meta = dict(node.meta)
        new.meta[linear_family.FUSED_TAG] = "embedding_q4gsw"
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        fused += 1
    return fused


def fuse_q8ta_conv(ep: ExportedProgram, ctx: FusionContext) -> int:
    """Replace every static int8 conv chain by its q8ta op; report every convolution."""
    fused = 0
    for node in list(ep.graph_module.graph.nodes):
        if node.graph is None:
            continue
        match, info = conv_family.detect_conv(ep, node)
        if info is None:
            continue
        ctx.report.layers.append(info)
        if match is None:
            continue
        conv_family.replace_conv(ep, match, ctx.packer)
        ctx.orphans.extend(match.orphans)
        fused += 1
    if fused:
        ep.graph_module.graph.eliminate_dead_code()
    return fused


def fuse_q8ta_add(ep: ExportedProgram, ctx: FusionContext) -> int:
    """Replace every int8 add (dq + dq [→ relu] → q) by et_vk.q8ta_add."""
    fused = 0
    for node in list(ep.graph_module.graph.nodes):
        if node.graph is None:
            continue
        match, _reason = conv_family.detect_add(node)
        if match is None:
            continue
        conv_family.replace_add(ep, match)
        fused += 1
    if fused:
        ep.graph_module.graph.eliminate_dead_code()
    return fused


def drop_unused_constants(ep: ExportedProgram, ctx: FusionContext) -> int:
    """Delete constant placeholders that fusion left without users."""
    graph = ep.graph_module.graph
    graph.eliminate_dead_code()
    dropped = 0
    seen = set()
    for node in ctx.orphans:
        if node in seen or node.graph is None or node.users:
            continue
        seen.add(node)
        delete_constant_placeholder(ep, node)
        dropped += 1
    ctx.orphans.clear()
    return dropped


FUSION_PASSES: list[tuple[str, Callable[[ExportedProgram, FusionContext], int]]] = [
    ("share_act_qparams", share_act_qparams),
    ("fuse_quantized_linear", fuse_quantized_linear),
    ("merge_sibling_projections", merge_sibling_projections),
    ("merge_gate_up", merge_gate_up),
    ("fuse_quantized_embedding", fuse_quantized_embedding),
    ("fuse_q8ta_conv", fuse_q8ta_conv),
    ("fuse_q8ta_add", fuse_q8ta_add),
    ("drop_unused_constants", drop_unused_constants),
]
PASS_NAMES = [name for name, _ in FUSION_PASSES]
# Passes that only serve files for qlower's runtime ops (export --runtime qlower).
QLOWER_RUNTIME_PASSES = frozenset({"merge_gate_up"})


def run_fusion(
    edge_program: ExportedProgram,
    *,
    dump_after: str | None = None,
    log: Log | None = None,
    skip: Iterable[str] = (),
    store=None,
    runtime: str = "stock",
) -> FusionReport:
    """Run :data:`FUSION_PASSES` on ``edge_program`` in place; return the report.

    ``dump_after``: a pass name; the graph after it goes to ``log`` (default:
    stderr). ``skip``: pass names not to run (e.g. ``share_act_qparams`` to
    reproduce the stock graph exactly). ``store``: a ``weight_store.WeightStore``
    that takes the large constants the passes pack.
    """
    skip = set(skip)
    for name in [dump_after, *skip]:
        if name is not None and name not in PASS_NAMES:
            from qlower.errors import ConfigError

            raise ConfigError(
                f"unknown fusion pass {name!r}", hint=f"passes: {', '.join(PASS_NAMES)}"
            )
    log = log or (lambda s: print(s, file=sys.stderr))
    if runtime != "qlower":
        skip |= QLOWER_RUNTIME_PASSES
    ctx = FusionContext(report=FusionReport(), packer=linear_family.ConstantPacker(edge_program, store))
    gm = edge_program.graph_module
    for name, fn in FUSION_PASSES:
        if name in skip:
            continue
        t0 = time.perf_counter()
        changes = fn(edge_program, ctx)
        if changes:
            gm.recompile()
        ctx.report.passes.append(
            {"name": name, "changes": changes, "seconds": round(time.perf_counter() - t0, 6)}
        )
        if name == dump_after:
            log(f"# graph after {name}\n{gm.graph}")
    return ctx.report





def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v
