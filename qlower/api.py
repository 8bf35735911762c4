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
    **options: Any,
) -> dict[str, Any]:
    """Quantize and lower ``model`` (a Python file) to a Vulkan .pte; return the summary.

    ``options`` are ExportOptions fields (scheme, group_size, quantize_embeddings,
    calibration, calibration_batches, strict, seed, layers); they override ``config``.
    With ``output=None`` nothing is written (the bytes are in the summary's job).
    """
    job = ExportJob(
        model_path=Path(model),
        output=Path(output) if output is not None else None,
        options=make_options(config, **options),
        entry=entry,
        checkpoint=Path(checkpoint) if checkpoint else None,
        warn=warn or (lambda message: None),
    )
    run_stages(job, on_stage or (lambda name, seconds: None))
    return export_summary(job)
