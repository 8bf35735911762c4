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
conv+clamp fusion, PT2E q/dq folding, relu/gelu input squeezing): each of them re-traces the whole graph
to validate it even when it changed nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

from torch.export import ExportedProgram

__all__ = [
    "COMMUTING_EDGE_PASSES",
    "MERGEABLE_EDGE_PASSES",
    "PATTERN_FAMILY_OPS",
    "PREPROCESS_PASS_TRIGGERS",
    "edge_passes_merged",
    "generate_edge_program",
    "merge_edge_passes",
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
    "SqueezeUnsqueezeInputs": lambda ops: bool(ops & {"aten.relu.default", "aten.gelu.default"}),
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


def to_edge_for_partitioner(ep: ExportedProgram, partitioner, check_ir_validity: bool = False,
                            constant_methods: dict | None = None):
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
    with edge_passes_merged():
        if any(n.op == "call_function" and n.target in keep for n in ep.graph.nodes):
            return _gen_edge_manager_for_partitioners(
                {"forward": [partitioner]}, {"forward": ep}, config, constant_methods or {}, False
            )
        return to_edge(ep, constant_methods=constant_methods or None, compile_config=config)


# ExecuTorch passes that are pure ``call_operator`` rewrites on ExportPass: each
# re-traces the whole graph through fake tensors (~0.5 s a pass on the bundled
# llama) to change a few nodes. Chained through one class (cooperative
# ``super().call_operator``), a run of them costs one re-trace; each node still
# goes through the passes in their order. Read from each class: none overrides
# anything but ``__init__``, ``call_operator`` and (ScalarToTensorPass) a
# ``call`` that wraps ``super().call``. Ops a pass inserts with
# ``self.call_operator`` go through the whole chain; the earlier passes leave
# them as they are (tests/test_lower_speedups.py checks graphs equal ExecuTorch's).
MERGEABLE_EDGE_PASSES = frozenset({
    "ReplaceViewOpsWithViewCopyOpsPass",  # torch's; stood in for by _view_ops_to_view_copy()
    "NormalizeTransposePass",
    "ReplaceBrokenOpsWithFunctionalOpsPass",
    "ScalarToTensorPass",
    "SymToTensorPass",
    "RemoveMixedTypeOperators",
    "OpReplacePass",
    "MemoryFormatOpsPass",
})


# Graph passes that only rename targets the mergeable passes never touch
# (sym_size packet -> sym_size.int): they commute with them, so a run of
# mergeable passes is not cut in two by one of these; it runs before the run.
COMMUTING_EDGE_PASSES = frozenset({"ReplaceSymSizeOpPass"})


def merge_edge_passes(passes: list) -> list:
    """``passes`` with each run of mergeable passes replaced by one chained pass.

    ExecuTorch's pass lists hold some passes wrapped in functions
    (``pass_result_wrapper``); the pass itself is their ``__wrapped__``.
    """
    out, run = [], []

    def flush():
        if len(run) == 1:
            out.append(run[0])
        elif run:
            classes = tuple(_chainable(type(p)) for p in run)
            chained = type("Chained_" + "_".join(c.__name__ for c in classes), classes, {})
            out.append(chained())
        run.clear()

    for p in passes:
        p = getattr(p, "__wrapped__", p)
        name = type(p).__name__
        if name in MERGEABLE_EDGE_PASSES:
            run.append(p)
        elif name in COMMUTING_EDGE_PASSES:
            out.append(p)
        else:
            flush()
            out.append(p)
    flush()
    return out


def _chainable(cls: type) -> type:
    if cls.__name__ == "ReplaceViewOpsWithViewCopyOpsPass":
        return _view_ops_to_view_copy()
    return cls


@functools.cache
def _view_ops_to_view_copy() -> type:
    """torch's ReplaceViewOpsWithViewCopyOpsPass on ExecuTorch's ExportPass base, so it chains."""
    from executorch.exir.pass_base import ExportPass
    from torch._export.passes.replace_view_ops_with_view_copy_ops_pass import (
        _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS,
        get_view_copy_of_view_op,
    )
    from torch._ops import HigherOrderOperator

    class ViewOpsToViewCopy(ExportPass):
        def call_operator(self, op, args, kwargs, meta):
            if op in _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS:
                op = _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS[op]
            elif not isinstance(op, HigherOrderOperator):
                op = get_view_copy_of_view_op(op._schema) or op
            return super().call_operator(op, args, kwargs, meta)

    return ViewOpsToViewCopy


def generate_edge_program(config, program, core_aten_ops_exception_list=None, preserve_ops=None):
    """ExecuTorch 1.5.1's ``_generate_edge_program`` with its re-tracing passes merged.

    Same steps in the same order (``executorch/exir/program/_program.py``);
    only the pass list goes through :func:`merge_edge_passes`: eight
    whole-graph re-traces become two.
    """
    from executorch.exir.program import _program as p

    program = p.remove_unused_parameters_pass(program)
    pre, post = p._get_aten_to_edge_passes(config)
    passes = [p.RemoveNonCoreAtenOpGraphAssertsPass(), p.ReplaceViewOpsWithViewCopyOpsPass(), *pre, p.OpReplacePass()]
    if not config._skip_dim_order:
        passes.append(p.MemoryFormatOpsPass())
    gm = program.graph_module
    for ps in merge_edge_passes(passes):
        gm = ps(gm).graph_module
    edge_program = ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=p._get_updated_graph_signature(program.graph_signature, gm),
        state_dict=program.state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants=program.constants,
        verifiers=[p.EXIREdgeDialectVerifier(
            edge_compile_config=config, class_only=True,
            core_aten_ops_exception_list=core_aten_ops_exception_list, preserve_ops=preserve_ops,
        )],
    )
    edge_program = p.lift_constant_tensor_pass(edge_program)
    edge_program = p.convert_constant_dim_order_pass.convert_constant_dim_order_pass(edge_program)
    return p._transform(edge_program, *post)


@contextlib.contextmanager
def edge_passes_merged() -> Iterator[None]:
    """Within the block, ExecuTorch's to_edge builds edge programs with :func:`generate_edge_program`."""
    from executorch.exir.program import _program

    saved = _program._generate_edge_program
    _program._generate_edge_program = generate_edge_program
    try:
        yield
    finally:
        _program._generate_edge_program = saved
