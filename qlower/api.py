"""The Python API: every CLI command is a function here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import make_options
from .pipeline import ExportJob, run_stages
from .summary import export_summary


def export(
    model: str | Path,
    output: str | Path | None = None,
    *,
    config: str | Path | None = None,
    entry: str | None = None,
    checkpoint: str | Path | None = None,
    on_stage: Callable[[str, float | None], None] | None = None,
    warn: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    dump_after: str | None = None,
    verify: int = 0,
    verify_min_sqnr_float: float | None = None,
    on_layer: Callable[[Any], None] | None = None,
    external_weights: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Quantize and lower ``model`` (a Python file) to a Vulkan .pte; return the summary.

    ``options`` are ExportOptions fields (scheme, group_size, quantize_embeddings,
    calibration, calibration_batches, strict, seed, layers); they override ``config``.
    ``verify=N`` runs the golden executor on N input batches before writing,
    and fails (nothing written) when the file does not compute what the quantized
    model computes (qlower.metrics: a defect); what quantization costs against
    float is a warning, unless ``verify_min_sqnr_float`` sets a bar (then below
    it fails, QualityError).
    ``dump_after`` names a fusion pass after which the graph goes to ``log``.
    With ``output=None`` nothing is written. ``on_layer`` hears of each layer the
    streaming load finished (``stream.Progress``: layer name, bytes read, ETA).
    The summary's ``peak_rss_mb`` is the process's peak resident memory, and
    ``stage_peak_rss_mb`` each stage's. ``external_weights`` writes the constants to
    ``<output stem>.ptd`` beside the .pte (ExecuTorch's named-data file, ``--data_path``).
    """
    if external_weights and output is None:
        from .errors import OutputError

        raise OutputError("--external-weights needs an output file", "pass -o model.pte")
    if external_weights and verify:
        from .errors import OutputError

        raise OutputError("--verify cannot read constants kept in a .ptd", "export without --external-weights to verify")
    job = ExportJob.of(
        Path(model),
        Path(output) if output is not None else None,
        make_options(config, **options),
        entry=entry,
        checkpoint=Path(checkpoint) if checkpoint else None,
        warn=warn or (lambda message: None),
        log=log,
        dump_after=dump_after,
        verify_samples=verify,
        verify_min_sqnr_float=verify_min_sqnr_float,
        on_layer=on_layer,
        external_weights=external_weights,
    )
    run_stages(job, on_stage or (lambda name, seconds: None))
    job.measured.memory.start()
    summary = export_summary(job)
    job.measured.memory.stop("summary")
    summary["peak_rss_mb"] = round(job.measured.memory.peak_mb(), 1)
    summary["stage_peak_rss_mb"] = {k: round(v, 1) for k, v in job.measured.memory.peaks.items()}
    return summary


def evaluate(model: str | Path, pte: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Perplexity on text of the float model, the model quantized as export does, and the .pte
    (:func:`qlower.llm.eval.evaluate` says which keyword arguments it takes)."""
    from .llm.eval import evaluate as run_eval

    return run_eval(model, pte, **kwargs)
