"""How a .pte was made, as far as the file tells: its scheme, group size and int4 weight algorithm.

verify, generate and eval rebuild the quantized reference with export's own quantize function
(:func:`qlower.quantize.quantize_model`); the options they give it come from here: what the user
passed first, then a config, then what the file holds (its fused ops and qlower's
``qlower.quantization`` record).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pte import Pte, fused_op_histogram, int4_linear, read_quantization_record


def infer_scheme(pte: Pte) -> tuple[str, int | None, bool]:
    """(scheme, group size, embeddings quantized) from the fused ops a .pte holds.

    The group size is the one the weights were quantized at: qlower's record says it when the file
    stores a smaller one (a group size the runtime computes wrong is stored as a safe divisor with
    each scale repeated); otherwise it is read off the first int4 op."""
    ops = fused_op_histogram(pte)
    record = read_quantization_record(pte.named_bytes, pte.named_sizes) or {}
    group_size = record.get("group_size")
    for d in pte.vulkan_delegates:  # qlower's runtime linears count as the stock op they compute
        for op in d.ops:
            linear = int4_linear(d, op)
            if linear is not None:
                ops[linear[0]] += 1
                group_size = linear[1] if group_size is None else group_size
    embeddings = "embedding_q4gsw" in ops
    if "linear_dq8ca_q4gsw" in ops:
        return "qta8a_qga4w", group_size, embeddings
    if "linear_q4gsw" in ops:
        return "qga4w", group_size, embeddings
    if any(name.startswith("q8ta_") or name == "linear_q8ta_q8csw" for name in ops):
        return "q8ta_q8csw", None, embeddings
    for d in pte.vulkan_delegates:
        for value in d.graph.values:
            if type(value.value).__name__ == "VkTensor" and value.value.datatype.name == "FLOAT16":
                return "fp16", None, embeddings
    return "fp32", None, embeddings


def algorithm_options(pte: Pte, model_path: str | Path, weight_algorithm: str | None = None,
                      calibration_text: str | Path | None = None, calibration_tokens: int | None = None) -> dict[str, Any]:
    """ExportOptions fields for the int4 weight algorithm: the given ones, else the file's record
    (``qlower.quantization``). A recorded calibration text is looked for beside the model (its folder)."""
    from .errors import CalibrationError
    record = read_quantization_record(pte.named_bytes, pte.named_sizes) or {}
    algorithm = weight_algorithm or record.get("weight_algorithm")
    calibration = record.get("calibration") or {}
    if calibration_text is None and algorithm == record.get("weight_algorithm") and calibration.get("text"):
        folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        candidate = folder / calibration["text"]
        if not candidate.is_file():
            raise CalibrationError(f"the file was quantized with {algorithm} calibrated on {calibration['text']}, "
                                   f"which is not in {folder}", "pass --calibration-text FILE (the text export was given)")
        calibration_text = str(candidate)
    tokens = calibration_tokens or (calibration.get("tokens") if calibration_text else None)
    return {"weight_algorithm": algorithm, "calibration_text": str(calibration_text) if calibration_text else None,
            "calibration_tokens": tokens}


def options_for(pte: Pte, *, scheme: str | None = None, group_size: int | None = None, config: str | Path | None = None,
                calibration: str | None = None, quantize_embeddings: bool | None = None, seed: int = 0,
                algorithm: dict[str, Any] | None = None, kv_cache: bool = False, **overrides: Any):
    """The export options the file was made with: given ones first, then the config, then read from the file.

    ``algorithm``: :func:`algorithm_options`; ``overrides`` are further ExportOptions fields (None: the
    config's or the default), passed as export takes them.
    """
    from .config import make_options

    inferred_scheme, inferred_group, inferred_embeddings = infer_scheme(pte)
    return make_options(
        config,
        scheme=scheme or (None if config else inferred_scheme),
        group_size=group_size or (None if config else inferred_group),
        quantize_embeddings=quantize_embeddings if quantize_embeddings is not None else (inferred_embeddings or None),
        calibration=calibration,
        seed=seed,
        kv_cache=kv_cache,
        **(algorithm or {}),
        **overrides,
    )
