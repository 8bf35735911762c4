"""The export pipeline: a flat list of named stages over one ``ExportJob``.

    load → quantize → [kv_cache] → export → fuse → lower → [verify] → serialize

The job holds what the user asked (``job.request``), what the stages made
(``job.made``) and what was measured (``job.measured``). Each stage reads the
request and earlier products and fills its own; ``run_stages()`` runs them in
order, timing each and telling ``on_stage`` when one starts and ends.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ExportOptions
from .errors import ExportError, OutputError, first_line
from .loader import LoadedModel
from .memory import release_memory
from .pte import QUANTIZATION_RECORD_KEY
from .quantize import LayerPlan, quantization_record, quantize_model


@dataclass
class ExportRequest:
    """What the user asked for, and where the job reports back."""

    model_path: Path
    output: Path | None  # None: nothing is written (the summary only)
    options: ExportOptions
    entry: str | None = None
    checkpoint: Path | None = None
    external_weights: bool = False  # --external-weights: the constants go to <output stem>.ptd
    verify_samples: int = 0  # > 0: run the verify stage on that many input batches
    verify_min_sqnr_float: float | None = None  # a float bar the user set: the verify stage fails below it
    dump_after: str | None = None  # a fusion pass after which the graph goes to ``log``
    warn: Callable[[str], None] = lambda message: None
    log: Callable[[str], None] | None = None  # where --dump-after prints graphs
    on_layer: Callable | None = None  # hears of each layer the streaming quantize stage finished (stream.Progress)


@dataclass
class StageProducts:
    """What the stages made, in stage order; a stage lets go of what later ones no longer need."""

    # load
    loaded: LoadedModel | None = None
    hf_folder: Any = None  # llm.hf_folder.HfFolder when the model is a Hugging Face folder
    streamed: bool = False  # the weights were read layer by layer by the quantize stage
    kv_cache: bool = False  # export the KV-cache decode method (llm/)
    # quantize
    plans: list[LayerPlan] = field(default_factory=list)
    quantized: torch.nn.Module | None = None
    store: Any = None  # weight_store.WeightStore: large constants in files beside the output, while the job runs
    # kv_cache
    decoder: Any = None  # llm.kv_cache.KVCacheLM around the quantized model
    export_inputs: tuple | None = None  # what torch.export traces with (the decoder's, else the example inputs)
    dynamic_shapes: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)  # constant methods for ExecuTorch's LLM runner
    decode_info: dict[str, Any] | None = None  # KV cache shape and bytes, for the summary
    decode_source_name: Callable[[str], str] = lambda name: name  # decoder module name → loaded model's
    # export, fuse, lower
    exported: Any = None  # torch.export.ExportedProgram
    edge: Any = None  # EdgeProgramManager
    fusion: Any = None  # FusionReport
    delegation_passes: list[str] = field(default_factory=list)  # fix-up passes that changed the graph
    cpu_notes: list = field(default_factory=list)  # nodes that would stay on the CPU, and why
    pte_bytes: bytes | None = None  # the serialized program, kept in memory only for --verify or no output
    program: Any = None  # ExecutorchProgramManager, written to disk by the serialize stage as it serializes
    # verify, serialize
    verification: dict | None = None
    written: list[Path] = field(default_factory=list)  # files written beside the .pte (tokenizer)
    tokenizer: Any = None  # llm.runner_tokenizer.RunnerTokenizer: the tokenizer written for the runner


@dataclass
class Measurements:
    """What was measured while the stages ran."""

    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    memory: Any = None  # memory.PeakMeter: peak RSS per stage


@dataclass
class ExportJob:
    """One export: what was asked, what the stages made, what was measured."""

    request: ExportRequest
    made: StageProducts = field(default_factory=StageProducts)
    measured: Measurements = field(default_factory=Measurements)

    @classmethod
    def of(cls, model_path: Path, output: Path | None, options: ExportOptions, **request: Any) -> "ExportJob":
        """A job for ``model_path`` → ``output``; ``request`` are further :class:`ExportRequest` fields."""
        return cls(ExportRequest(model_path, output, options, **request))


def stage_load(job: ExportJob) -> None:
    from .llm.load import load_any

    asked, made = job.request, job.made
    torch.manual_seed(asked.options.seed)
    made.loaded, made.hf_folder, made.kv_cache = load_any(asked.model_path, asked.options, entry=asked.entry,
                                                          checkpoint=asked.checkpoint, stream=True, warn=asked.warn)
    made.streamed = made.loaded.weights is not None


def stage_quantize(job: ExportJob) -> None:
    asked, made = job.request, job.made
    made.quantized, made.plans = quantize_model(made.loaded, asked.options, asked.warn, on_layer=asked.on_layer, store=made.store)


def stage_kv_cache(job: ExportJob) -> None:
    """--kv-cache: the quantized model behind a static KV cache, with the runner's metadata."""
    from .llm.decoder import SELF_CHECK_QUANTIZED_MIN_SQNR_DB, check_cache_matches
    from .llm.load import decoder_for

    made = job.made
    if made.streamed and made.hf_folder is None:
        # A model file streamed from its checkpoint was never whole in float: its cache check runs here.
        check_cache_matches(made.quantized, min_sqnr=SELF_CHECK_QUANTIZED_MIN_SQNR_DB)
    made.decoder, made.metadata = decoder_for(made.quantized, made.loaded, made.hf_folder, job.request.options, job.request.warn)
    made.decode_info = made.decoder.describe()
    made.decode_source_name = made.decoder.source_name
    made.export_inputs = made.decoder.example_inputs()
    made.dynamic_shapes = made.decoder.dynamic_shapes()


def stage_export(job: ExportJob) -> None:
    asked, made = job.request, job.made
    module = made.decoder if made.kv_cache else made.quantized
    inputs = made.export_inputs if made.kv_cache else made.loaded.example_inputs
    try:
        made.exported = torch.export.export(module, inputs, dynamic_shapes=made.dynamic_shapes, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {first_line(exc)}",
                          "the model must be traceable by torch.export; QLOWER_DEBUG=1 shows the traceback") from exc
    from .lower_speedups import to_edge_for_partitioner

    # Edge dialect with the partitioner's ops kept whole (as to_edge_transform_and_lower
    # does), decomposed once when nothing needs keeping.
    made.edge = to_edge_for_partitioner(made.exported, make_partitioner(asked.options, asked.external_weights),
                                        constant_methods=made.metadata)
    if not asked.verify_samples:
        # The edge program holds what lowering needs; let the eager weights go.
        made.exported = made.quantized = made.decoder = None
        made.loaded.module = None
        release_memory()


def stage_fuse(job: ExportJob) -> None:
    """qlower's graph passes run here, on the edge program, before partitioning."""
    from .fuse import run_fusion

    from .delegation import cpu_notes, run_delegation_passes

    made = job.made
    ep = made.edge.exported_program()
    made.fusion = run_fusion(ep, dump_after=job.request.dump_after, log=job.request.log, store=made.store,
                             runtime=job.request.options.runtime)
    if made.kv_cache:  # the decoder wraps the loaded model: report layers by their loaded names
        for info in made.fusion.layers:
            info.module = made.decode_source_name(info.module)
    # Delegation fix-ups: one partition, nothing the runtime lacks (see delegation.py).
    made.delegation_passes = run_delegation_passes(ep)
    made.cpu_notes = cpu_notes(ep)


def stage_lower(job: ExportJob) -> None:
    from executorch.exir import ExecutorchBackendConfig

    from .lower_speedups import vulkan_patterns_once
    from .vkops.rewrite import runtime_ops
    from .weight_store import vulkan_constants_from_store

    asked, made = job.request, job.made
    try:
        with vulkan_patterns_once(made.edge.exported_program()), vulkan_constants_from_store(made.store), \
                runtime_ops(asked.options.runtime):
            lowered = made.edge.to_backend({"forward": make_partitioner(asked.options, asked.external_weights)})
        # The delegate blob holds the packed weights now; let the edge program's copy go
        # before serializing makes another one (peak RSS).
        made.edge = None
        release_memory()
        record = quantization_record(made.plans, asked.options)
        if record is not None:
            lowered._named_data_store.add_named_data(QUANTIZATION_RECORD_KEY, record)
        program = lowered.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True))
        del lowered
        release_memory()
        if asked.verify_samples or asked.output is None:
            made.pte_bytes = bytes(program.buffer)
        else:  # written piece by piece by the serialize stage: no whole-file copy in memory
            made.program = program
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ExportError(f"ExecuTorch's Vulkan lowering failed: {type(cause).__name__}: {first_line(cause)}",
                          "QLOWER_DEBUG=1 shows the traceback; a per-layer 'skip' override can keep the failing layer float") from exc


def stage_verify(job: ExportJob) -> None:
    """--verify: the golden executor runs the bytes before they are written."""
    from .metrics import check_findings
    from .verify import verify_after_export

    asked = job.request
    job.made.verification = verify_after_export(job, samples=asked.verify_samples, min_sqnr_float=asked.verify_min_sqnr_float)
    # A defect (or a float bar the user set) refuses the file; what int4 costs against float is a warning.
    check_findings(job.made.verification, defect="verification failed", consequence="nothing was written", warn=asked.warn,
                   what="step" if job.made.kv_cache else "output",
                   defect_hint="run `qlower verify MODEL OUT.pte --layers` on an export without --verify to see where it diverges")


def stage_serialize(job: ExportJob) -> None:
    asked, made = job.request, job.made
    if asked.output is None:
        return
    program, made.program = made.program, None
    if program is None:
        write_atomic(asked.output, made.pte_bytes)
    else:
        write_atomic(asked.output, program.write_to_file)
    if asked.external_weights:
        data = program._tensor_data if program is not None else None  # filename tag -> Cord (ExecuTorch's own writer)
        for i, cord in enumerate((data or {}).values()):
            target = asked.output.with_suffix(".ptd" if i == 0 else f".{i}.ptd")
            write_atomic(target, cord.write_to_file)
            made.written.append(target)
    del program
    release_memory()
    if made.kv_cache and made.hf_folder is not None:
        write_runner_tokenizer(job)


def write_runner_tokenizer(job: ExportJob) -> None:
    """The runner's --tokenizer_path, beside the .pte under its stem (llm/runner_tokenizer.py says how)."""
    from .llm.runner_tokenizer import runner_tokenizer

    asked, made = job.request, job.made
    try:
        made.tokenizer = runner_tokenizer(made.hf_folder.tokenizer_files, made.metadata, asked.output)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        asked.warn(f"the tokenizer was not written: cannot read it from {made.hf_folder.path}: {type(exc).__name__}: {exc}")
        return
    if made.tokenizer is None:
        return
    for target, data in made.tokenizer.files.items():
        target.parent.mkdir(exist_ok=True)
        write_atomic(target, data)
        made.written.append(target)
    for problem in made.tokenizer.problems:
        asked.warn(f"ExecuTorch's LLM runner cannot use {made.tokenizer.path.name} as written: {problem}")


STAGES: list[tuple[str, Callable[[ExportJob], None]]] = [
    ("load", stage_load),
    ("quantize", stage_quantize),
    ("kv_cache", stage_kv_cache),  # only with --kv-cache
    ("export", stage_export),
    ("fuse", stage_fuse),
    ("lower", stage_lower),
    ("verify", stage_verify),  # only with --verify
    ("serialize", stage_serialize),
]


# --external-weights: every constant in one .ptd (ExecuTorch shards named data above this cap).
EXTERNAL_SHARD_BYTES = 1 << 62


def make_partitioner(options: ExportOptions, external_weights: bool = False):
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

    # Only fp16 needs a compile spec; an explicit "force_fp16": false is stored in the
    # .pte (40 bytes of program, a 128-byte aligned step) and means the default.
    compile_options: dict[str, Any] = {"force_fp16": True} if options.scheme == "fp16" else {}
    if external_weights:
        compile_options["external_constants_max_data_bytes"] = EXTERNAL_SHARD_BYTES
    return VulkanPartitioner(compile_options)


def stage_wanted(job: ExportJob, name: str) -> bool:
    """Whether the named stage runs for this job (verify only with --verify, kv_cache only with --kv-cache)."""
    return not ((name == "verify" and not job.request.verify_samples) or (name == "kv_cache" and not job.made.kv_cache))


def run_stages(job: ExportJob, on_stage: Callable[[str, float | None], None] = lambda name, seconds: None) -> ExportJob:
    from .memory import PeakMeter, return_freed_memory

    from .weight_store import WeightStore

    return_freed_memory()
    output = job.request.output
    if output is not None:
        check_writable(output)
        # Large constants live in files beside the output until it is written (weight_store.py).
        job.made.store = WeightStore(output.parent if str(output.parent) else Path("."), output.name)
    job.measured.memory = job.measured.memory or PeakMeter()
    try:
        for name, stage in STAGES:
            if not stage_wanted(job, name):
                continue
            on_stage(name, None)
            start = time.perf_counter()
            job.measured.memory.start()
            stage(job)
            job.measured.memory.stop(name)
            job.measured.timings[name] = time.perf_counter() - start
            on_stage(name, job.measured.timings[name])
    finally:
        if job.made.store is not None:
            job.made.store.close()
    return job


def check_writable(path: Path) -> None:
    """Fail before the long work if the output cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory", "pass a file name such as out.pte")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist", f"create it first: mkdir -p {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied", "choose a writable output path with -o")


def write_atomic(path: Path, data: bytes | Callable[[Any], None]) -> None:
    """Write via a temporary file in the same directory and rename: never a partial file.

    ``data`` is the bytes, or a function that writes them to the open file (a program
    written piece by piece, never whole in memory).
    """
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror}", "check free disk space and permissions") from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

