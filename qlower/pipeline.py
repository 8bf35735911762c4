"""The export pipeline: a flat list of named stages over one ``ExportJob``.

    load → quantize → export → fuse → lower → serialize

Each stage reads and fills fields of the job; ``export()`` runs them in order,
timing each and telling ``on_stage`` when one starts and ends.
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
class ExportJob:
    model_path: Path
    output: Path | None
    options: ExportOptions
    entry: str | None = None
    checkpoint: Path | None = None
    warn: Callable[[str], None] = lambda message: None
    log: Callable[[str], None] | None = None  # where --dump-after prints graphs
    dump_after: str | None = None
    # filled by the stages
    loaded: LoadedModel | None = None
    hf_folder: Any = None  # llm.hf_folder.HfFolder when the model is a Hugging Face folder
    kv_cache: bool = False  # export the KV-cache decode method (llm/)
    decoder: Any = None  # llm.kv_cache.KVCacheLM around the quantized model
    export_inputs: tuple | None = None  # what torch.export traces with (the decoder's, else the example inputs)
    dynamic_shapes: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)  # constant methods for ExecuTorch's LLM runner
    decode_info: dict[str, Any] | None = None  # KV cache shape and bytes, for the summary
    decode_source_name: Callable[[str], str] = lambda name: name  # decoder module name → loaded model's
    written: list[Path] = field(default_factory=list)  # files written beside the .pte (tokenizer)
    tokenizer: Any = None  # llm.runner_tokenizer.RunnerTokenizer: the tokenizer written for the runner
    plans: list[LayerPlan] = field(default_factory=list)
    quantized: torch.nn.Module | None = None
    exported: Any = None  # torch.export.ExportedProgram
    edge: Any = None  # EdgeProgramManager
    fusion: Any = None  # FusionReport
    delegation_passes: list[str] = field(default_factory=list)  # fix-up passes that changed the graph
    cpu_notes: list = field(default_factory=list)  # nodes that would stay on the CPU, and why
    pte_bytes: bytes | None = None  # the serialized program, kept in memory only for --verify or no output
    program: Any = None  # ExecutorchProgramManager, written to disk by the serialize stage as it serializes
    external_weights: bool = False  # --external-weights: the constants go to <output stem>.ptd
    verify_samples: int = 0  # > 0: run the verify stage on that many input batches
    verify_min_sqnr_float: float | None = None  # a float bar the user set: the verify stage fails below it
    verification: dict | None = None
    streamed: bool = False  # the weights were read layer by layer by the quantize stage
    on_layer: Callable | None = None  # hears of each layer the streaming quantize stage finished (stream.Progress)
    timings: dict[str, float] = field(default_factory=dict)
    memory: Any = None  # memory.PeakMeter: peak RSS per stage
    store: Any = None  # weight_store.WeightStore: large constants in files beside the output, while the job runs


def stage_load(job: ExportJob) -> None:
    from .llm.load import load_any

    torch.manual_seed(job.options.seed)
    job.loaded, job.hf_folder, job.kv_cache = load_any(job.model_path, job.options, entry=job.entry, checkpoint=job.checkpoint,
                                                       stream=True, warn=job.warn)
    job.streamed = job.loaded.weights is not None


def stage_quantize(job: ExportJob) -> None:
    job.quantized, job.plans = quantize_model(job.loaded, job.options, job.warn, on_layer=job.on_layer, store=job.store)


def stage_kv_cache(job: ExportJob) -> None:
    """--kv-cache: the quantized model behind a static KV cache, with the runner's metadata."""
    from .llm.decoder import SELF_CHECK_QUANTIZED_MIN_SQNR_DB, check_cache_matches
    from .llm.load import decoder_for

    if job.streamed and job.hf_folder is None:
        # A model file streamed from its checkpoint was never whole in float: its cache check runs here.
        check_cache_matches(job.quantized, min_sqnr=SELF_CHECK_QUANTIZED_MIN_SQNR_DB)
    job.decoder, job.metadata = decoder_for(job.quantized, job.loaded, job.hf_folder, job.options, job.warn)
    job.decode_info = job.decoder.describe()
    job.decode_source_name = job.decoder.source_name
    job.export_inputs = job.decoder.example_inputs()
    job.dynamic_shapes = job.decoder.dynamic_shapes()


def stage_export(job: ExportJob) -> None:
    module = job.decoder if job.kv_cache else job.quantized
    inputs = job.export_inputs if job.kv_cache else job.loaded.example_inputs
    try:
        job.exported = torch.export.export(module, inputs, dynamic_shapes=job.dynamic_shapes, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {first_line(exc)}",
                          "the model must be traceable by torch.export; QLOWER_DEBUG=1 shows the traceback") from exc
    from .lower_speedups import to_edge_for_partitioner

    # Edge dialect with the partitioner's ops kept whole (as to_edge_transform_and_lower
    # does), decomposed once when nothing needs keeping.
    job.edge = to_edge_for_partitioner(job.exported, make_partitioner(job.options, job.external_weights), constant_methods=job.metadata)
    if not job.verify_samples:
        # The edge program holds what lowering needs; let the eager weights go.
        job.exported = job.quantized = job.decoder = None
        job.loaded.module = None
        release_memory()


def stage_fuse(job: ExportJob) -> None:
    """qlower's graph passes run here, on the edge program, before partitioning."""
    from .fuse import run_fusion

    from .delegation import cpu_notes, run_delegation_passes

    ep = job.edge.exported_program()
    job.fusion = run_fusion(ep, dump_after=job.dump_after, log=job.log, store=job.store)
    if job.kv_cache:  # the decoder wraps the loaded model: report layers by their loaded names
        for info in job.fusion.layers:
            info.module = job.decode_source_name(info.module)
    # Delegation fix-ups: one partition, nothing the runtime lacks (see delegation.py).
    job.delegation_passes = run_delegation_passes(ep)
    job.cpu_notes = cpu_notes(ep)


def stage_lower(job: ExportJob) -> None:
    from executorch.exir import ExecutorchBackendConfig

    from .lower_speedups import vulkan_patterns_once
    from .weight_store import vulkan_constants_from_store

    try:
        with vulkan_patterns_once(job.edge.exported_program()), vulkan_constants_from_store(job.store):
            lowered = job.edge.to_backend({"forward": make_partitioner(job.options, job.external_weights)})
        # The delegate blob holds the packed weights now; let the edge program's copy go
        # before serializing makes another one (peak RSS).
        job.edge = None
        release_memory()
        record = quantization_record(job.plans, job.options)
        if record is not None:
            lowered._named_data_store.add_named_data(QUANTIZATION_RECORD_KEY, record)
        program = lowered.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True))
        del lowered
        release_memory()
        if job.verify_samples or job.output is None:
            job.pte_bytes = bytes(program.buffer)
        else:  # written piece by piece by the serialize stage: no whole-file copy in memory
            job.program = program
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ExportError(f"ExecuTorch's Vulkan lowering failed: {type(cause).__name__}: {first_line(cause)}",
                          "QLOWER_DEBUG=1 shows the traceback; a per-layer 'skip' override can keep the failing layer float") from exc


def stage_verify(job: ExportJob) -> None:
    """--verify: the golden executor runs the bytes before they are written."""
    from .metrics import check_findings
    from .verify import verify_after_export

    job.verification = verify_after_export(job, samples=job.verify_samples, min_sqnr_float=job.verify_min_sqnr_float)
    # A defect (or a float bar the user set) refuses the file; what int4 costs against float is a warning.
    check_findings(job.verification, defect="verification failed", consequence="nothing was written", warn=job.warn,
                   what="step" if job.kv_cache else "output",
                   defect_hint="run `qlower verify MODEL OUT.pte --layers` on an export without --verify to see where it diverges")


def stage_serialize(job: ExportJob) -> None:
    if job.output is None:
        return
    program, job.program = job.program, None
    if program is None:
        write_atomic(job.output, job.pte_bytes)
    else:
        write_atomic(job.output, program.write_to_file)
    if job.external_weights:
        data = program._tensor_data if program is not None else None  # filename tag -> Cord (ExecuTorch's own writer)
        for i, cord in enumerate((data or {}).values()):
            target = job.output.with_suffix(".ptd" if i == 0 else f".{i}.ptd")
            write_atomic(target, cord.write_to_file)
            job.written.append(target)
    del program
    release_memory()
    if job.kv_cache and job.hf_folder is not None:
        write_runner_tokenizer(job)


def write_runner_tokenizer(job: ExportJob) -> None:
    """The runner's --tokenizer_path, beside the .pte under its stem (llm/runner_tokenizer.py says how)."""
    from .llm.runner_tokenizer import runner_tokenizer

    try:
        job.tokenizer = runner_tokenizer(job.hf_folder.tokenizer_files, job.metadata, job.output)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        job.warn(f"the tokenizer was not written: cannot read it from {job.hf_folder.path}: {type(exc).__name__}: {exc}")
        return
    if job.tokenizer is None:
        return
    for target, data in job.tokenizer.files.items():
        target.parent.mkdir(exist_ok=True)
        write_atomic(target, data)
        job.written.append(target)
    for problem in job.tokenizer.problems:
        job.warn(f"ExecuTorch's LLM runner cannot use {job.tokenizer.path.name} as written: {problem}")


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
    return not ((name == "verify" and not job.verify_samples) or (name == "kv_cache" and not job.kv_cache))


def run_stages(job: ExportJob, on_stage: Callable[[str, float | None], None] = lambda name, seconds: None) -> ExportJob:
    from .memory import PeakMeter, return_freed_memory

    from .weight_store import WeightStore

    return_freed_memory()
    if job.output is not None:
        check_writable(job.output)
        # Large constants live in files beside the output until it is written (weight_store.py).
        job.store = WeightStore(job.output.parent if str(job.output.parent) else Path("."), job.output.name)
    job.memory = job.memory or PeakMeter()
    try:
        for name, stage in STAGES:
            if not stage_wanted(job, name):
                continue
            on_stage(name, None)
            start = time.perf_counter()
            job.memory.start()
            stage(job)
            job.memory.stop(name)
            job.timings[name] = time.perf_counter() - start
            on_stage(name, job.timings[name])
    finally:
        if job.store is not None:
            job.store.close()
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

