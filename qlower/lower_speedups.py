"""Make ``VulkanPartitioner`` lowering do its expensive set-up once.

Measured with executorch 1.5.1: most of the lowering time of a small decoder
goes into building the RoPE pattern graphs (``patterns/rope.py``,
``patterns/rope_hf.py``), each by a ``torch.export`` + ``to_edge`` of a small
module. Their ``lru_cache`` sits above ``register_pattern_graph``, so the
registry holds the uncached function: the graphs are rebuilt by the
partitioner and again by ``FusePatternsPass`` in every partition's
``preprocess`` (~7 s a family a time on this machine).

:func:`vulkan_patterns_once` builds each family at most once per process, and
not at all when the program lacks an operator that every graph of the family
contains (``SubgraphMatcher`` needs each pattern node's target in the graph,
so such a family cannot match).

It also drops, from each partition's ``preprocess``, the passes whose only
work is on operators the partition does not contain (batch-norm folding,
conv+clamp fusion, PT2E q/dq folding): each of them re-traces the whole graph
to validate it even when it changed nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

from torch.export import ExportedProgram

__all__ = [
    "EDGE_PASS_TRIGGERS",
    "PATTERN_FAMILY_OPS",
    "PREPROCESS_PASS_TRIGGERS",
    "program_ops",
    "to_edge_for_partitioner",
    "vulkan_patterns_once",
]

# Operators every graph of a pattern family contains (checked against the
# built graphs in tests/test_delegation.py).
PATTERN_FAMILY_OPS: dict[str, frozenset[str]] = {
    "export_llama_rope": frozenset(
        {"aten.mul.Tensor", "aten.sub.Tensor", "aten.add.Tensor",
         "aten.cat.default", "aten.view_copy.default"}
    ),
    "hf_rope": frozenset(
        {"aten.mul.Tensor", "aten.add.Tensor", "aten.neg.default",
         "aten.cat.default", "aten.slice_copy.Tensor"}
    ),
}


# Preprocess pass (class name) -> does the program give it anything to do?
# Read from each pass's ``call``: it only rewrites nodes of these operators.
PREPROCESS_PASS_TRIGGERS: dict[str, Callable[[frozenset[str]], bool]] = {
    "FuseBatchNormPass": lambda ops: bool(
        ops & {"aten.native_batch_norm.default",
               "aten._native_batch_norm_legit_no_training.default"}
    ),
    "FuseClampPass": lambda ops: "aten.convolution.default" in ops,
    "FoldQDQPass": lambda ops: any(o.startswith("quantized_decomposed.quantize") for o in ops),
    "FuseQuantizedOpsTransform": lambda ops: any(
        o.startswith("quantized_decomposed.dequantize") for o in ops
    ),
}


def program_ops(ep: ExportedProgram) -> frozenset[str]:
    """Qualified names (``aten.add.Tensor``) of the operators ``ep`` calls."""
    return frozenset(
        getattr(n.target, "__name__", str(n.target))
        for n in ep.graph.nodes
        if n.op == "call_function"
    )


def _pruned_apply_passes(apply_passes):
    def apply(program, passes):
        ops = program_ops(program)
        keep = [
            p for p in passes
            if PREPROCESS_PASS_TRIGGERS.get(type(p).__name__, lambda _: True)(ops)
        ]
        return apply_passes(program, keep)

    return apply


@functools.cache
def _built(name: str, fn) -> tuple:
    return tuple(fn())


@contextlib.contextmanager
def vulkan_patterns_once(ep: ExportedProgram) -> Iterator[None]:
    """Within the block, Vulkan pattern graphs and preprocess passes are pruned for ``ep``.

    Wrap ``to_backend(VulkanPartitioner())`` (partitioning and preprocess both
    ask for the graphs). Partitions are subgraphs of ``ep``, so an operator
    absent from ``ep`` is absent from each of them too.
    """
    from executorch.backends.vulkan import vulkan_preprocess
    from executorch.backends.vulkan.patterns import fusable_patterns

    present = program_ops(ep)
    saved = {}
    for name, entry in fusable_patterns.items():
        fn = entry.get_graphs_fn
        if fn is None:
            continue
        saved[name] = fn
        needs = PATTERN_FAMILY_OPS.get(name, frozenset())
        if needs <= present:
            entry.get_graphs_fn = lambda name=name, fn=fn: list(_built(name, fn))
        else:
            entry.get_graphs_fn = lambda: []
    apply_passes = vulkan_preprocess.apply_passes
    vulkan_preprocess.apply_passes = _pruned_apply_passes(apply_passes)
    try:
        yield
    finally:
        vulkan_preprocess.apply_passes = apply_passes
        for name, fn in saved.items():
            fusable_patterns[name].get_graphs_fn = fn


def to_edge_for_partitioner(ep: ExportedProgram, partitioner, check_ir_validity: bool = False):
    """``EdgeProgramManager`` for ``ep`` as ``to_edge_transform_and_lower`` makes it.

    ExecuTorch's path (``_gen_edge_manager_for_partitioners``) decomposes the
    program two or three times so that the ops the partitioner asks to keep
    whole (Vulkan: hardswish, upsample_nearest2d, pixel_shuffle) survive. When
    the program calls none of them, one ``to_edge`` gives the same graph at a
    third of the cost. The IR validity check re-runs every node through the
    edge verifier; torch.export already checked the program, so it is off
    unless asked for.
    """
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.exir.program._program import _gen_edge_manager_for_partitioners

    config = EdgeCompileConfig(_check_ir_validity=check_ir_validity)
    keep, _ = partitioner.ops_to_not_decompose(ep)
    keep = set(keep)
    with edge_passes_pruned():
        if any(n.op == "call_function" and n.target in keep for n in ep.graph.nodes):
            return _gen_edge_manager_for_partitioners(
                {"forward": [partitioner]}, {"forward": ep}, config, {}, False
            )
        return to_edge(ep, compile_config=config)


def _has_symbolic_values(graph) -> bool:
    from torch import SymBool, SymFloat, SymInt

    return any(isinstance(n.meta.get("val"), (SymInt, SymFloat, SymBool)) for n in graph.nodes)


def _has_view_ops(graph) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "is_view", False) for n in graph.nodes)


# aten→edge pass (class name) -> does the (decomposed) program give it anything to do?
# Read from each pass's call_operator: it only rewrites these nodes, yet re-traces
# the whole graph through fake tensors (~0.5 s each on the bundled llama).
EDGE_PASS_TRIGGERS: dict[str, Callable] = {
    "NormalizeTransposePass": lambda graph: any(n.target is _aten_t() for n in graph.nodes),
    "ReplaceBrokenOpsWithFunctionalOpsPass": _has_view_ops,
    "SymToTensorPass": _has_symbolic_values,
}


def _aten_t():
    import torch

    return torch.ops.aten.t.default


@contextlib.contextmanager
def edge_passes_pruned() -> Iterator[None]:
    """Within the block, to_edge skips the aten→edge passes that have nothing to rewrite."""
    from executorch.exir.program import _program

    generate, get_passes = _program._generate_edge_program, _program._get_aten_to_edge_passes

    def generate_pruned(config, program, *args, **kwargs):
        def passes(cfg):
            pre, post = get_passes(cfg)
            pre = [p for p in pre if EDGE_PASS_TRIGGERS.get(type(p).__name__, lambda g: True)(program.graph)]
            return pre, post

        _program._get_aten_to_edge_passes = passes
        try:
            return generate(config, program, *args, **kwargs)
        finally:
            _program._get_aten_to_edge_passes = get_passes

    _program._generate_edge_program = generate_pruned
    try:
        yield
    finally:
        _program._generate_edge_program = generate
