"""How close a .pte's numbers are, the per-scheme bars, and what a comparison found.

Two kinds of finding come out of comparing a file with the eager models, and
they mean different things:

* a **defect**: the file does not compute what the quantized eager model
  computes (an output or a layer below the ``vs_quantized`` / ``layer`` bar).
  The lowering is wrong; the command fails (exit 1).
* a **quality** finding: what quantization costs against the float model (the
  worst output below the ``vs_float`` bar). The file is faithful; the scheme is
  lossy on this model. Reported as a warning, unless the user set the bar
  (``--min-sqnr-float``): then it fails with exit code 3 (:class:`~qlower.errors.QualityError`).

``verify``, ``generate``, ``export --verify`` and ``eval`` build their reports
with :func:`quality_finding` and end with :func:`check_findings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from .errors import QualityError, VerifyError

# SQNR reported for outputs that are bit-identical (log of zero noise); JSON has no inf.
SQNR_IDENTICAL_DB = 300.0



@dataclass(frozen=True)
class Thresholds:
    """Minimum SQNR (dB) for a .pte to pass."""

    vs_float: float  # each output vs the eager float model (a quality bar)
    vs_quantized: float  # each output vs the eager quantized model (a defect bar)
    layer: float  # each matched layer vs the same layer of the eager quantized model (a defect bar)


# Chosen from measurements on the bundled examples and recipes (4 samples: the
# example inputs + 3 random ones; int4 at group size 128 unless noted):
#
#   scheme        vs float                 vs quantized eager   worst layer
#   qta8a_qga4w   20.4-22.9 (uniform init) 50-133 dB            129 dB
#                 12.6-15.4 (HF, normal)
#   qga4w         20.4-22.9, HF 12.6-15.4  134-139 dB           129 dB
#   q8ta_q8csw    32.3                     identical            identical
#   fp16          63.9-66.7                63.9-66.7 dB         60.6 dB
#   fp32          134-id.                  134 dB-identical     129 dB
#
# vs float: what the scheme's rounding costs, a property of the model and not
# of the lowering. int4 costs most on normally distributed weights (the
# transformers recipes, initialized N(0, 0.02): 12.6 dB on the 2-layer Llama,
# 13.0 on Qwen2, 14.0 at group size 32; tiny random decoders with QK norm ~7 dB)
# and least on uniform ones (nn.Linear's default init: 20-23 dB). The int4 bar
# sits under the usual legitimate values and above what broken quantization
# gives on the same models (weights read a row or a nibble off: -3 dB; zero
# points off by one: -13 to -7 dB; values clamped to int3: 1.8-7.3 dB), so a
# value below it is worth a warning; it fails only when asked. vs quantized: the
# golden run and the eager quantized model compute the same integers, so only
# float summation order (and, for requantized int8, an occasional rounding tie:
# one step in a few elements) separates them. At the outputs such ties compound
# through the layers (49.9 dB seen on a 2-block decoder with int4 embeddings),
# so the int4 output bar is 30 dB; the layer bar stays high because each layer
# is compared in isolation (fed the golden run's own input) and sits far above
# what a few flipped bits in one packed weight give (36 dB in that layer).
THRESHOLDS: dict[str, Thresholds] = {
    "qta8a_qga4w": Thresholds(vs_float=10.0, vs_quantized=30.0, layer=60.0),
    "qga4w": Thresholds(vs_float=10.0, vs_quantized=30.0, layer=60.0),
    "q8ta_q8csw": Thresholds(vs_float=20.0, vs_quantized=40.0, layer=40.0),
    "fp16": Thresholds(vs_float=45.0, vs_quantized=45.0, layer=45.0),
    "fp32": Thresholds(vs_float=80.0, vs_quantized=80.0, layer=80.0),
}


def thresholds_for(scheme: str, vs_float: float | None = None, vs_quantized: float | None = None,
                   layer: float | None = None) -> Thresholds:
    """The scheme's bars, with the ones given replacing the defaults."""
    base = THRESHOLDS[scheme]
    changes = {k: v for k, v in (("vs_float", vs_float), ("vs_quantized", vs_quantized), ("layer", layer)) if v is not None}
    return replace(base, **changes)


def sqnr_db(reference, test) -> float:
    """10·log10(Σ ref² / Σ (ref − test)²) over all elements, in float64; SQNR_IDENTICAL_DB when equal."""
    import torch

    ref = reference.detach().to(torch.float64).flatten()
    noise = (ref - test.detach().to(torch.float64).flatten()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return SQNR_IDENTICAL_DB
    if signal == 0.0:
        return -SQNR_IDENTICAL_DB
    return min(10.0 * math.log10(signal / noise), SQNR_IDENTICAL_DB)


def cosine(reference, test) -> float:
    """Cosine similarity of the two tensors' elements, in float64."""
    import torch

    a = reference.detach().to(torch.float64).flatten()
    b = test.detach().to(torch.float64).flatten()
    denom = a.norm().item() * b.norm().item()
    if denom == 0.0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(torch.dot(a, b).item() / denom)


def compare(reference, test) -> dict[str, float]:
    """SQNR, cosine similarity and max abs error of ``test`` against ``reference``."""
    ref, out = reference.detach().float(), test.detach().float()
    return {
        "sqnr_db": round(sqnr_db(ref, out), 2),
        "cosine": round(cosine(ref, out), 6),
        "max_abs_error": float((ref - out).abs().max().item()) if ref.numel() else 0.0,
    }


# --- findings -----------------------------------------------------------------------------


def quality_finding(worst_sqnr_vs_float: float | None, threshold: float, enforced: bool) -> dict[str, Any]:
    """What quantization costs against float: the worst SQNR vs the float model, the bar, whether
    it is below, and whether the bar was asked for (``enforced``: then below fails)."""
    worst = None if worst_sqnr_vs_float is None else round(float(worst_sqnr_vs_float), 2)
    return {
        "sqnr_vs_float_db": worst,
        "threshold_db": threshold,
        "below": worst is not None and worst < threshold,
        "enforced": enforced,
    }


def quality_message(quality: dict[str, Any], what: str = "output") -> str:
    return (f"quantization costs {quality['sqnr_vs_float_db']:.1f} dB SQNR against the float model at the worst {what} "
            f"(bar {quality['threshold_db']:g} dB)")


def failures(defects: list[str], quality: dict[str, Any] | None, what: str = "output") -> list[str]:
    """Everything that fails the command, first cause first: the defects, then an enforced quality bar missed."""
    result = list(defects)
    if quality and quality["below"] and quality["enforced"]:
        result.append(quality_message(quality, what))
    return result


def conclude(report: dict[str, Any], ok_key: str = "passed", what: str = "output") -> dict[str, Any]:
    """Set ``report[ok_key]`` and ``report["failures"]`` from its ``defects`` and ``quality``."""
    report["failures"] = failures(report.get("defects") or [], report.get("quality"), what)
    report[ok_key] = not report["failures"]
    return report


def check_findings(report: dict[str, Any], *, defect: str, defect_hint: str, consequence: str = "",
                   warn: Callable[[str], None] = lambda message: None, what: str = "output") -> None:
    """End a command on its findings: raise VerifyError (exit 1) on a defect, QualityError
    (exit 3) on an enforced quality bar missed, else warn of a quality finding below the default bar.

    ``defect`` is the message's lead ("verification failed"); the first defect follows it, then
    ``consequence`` ("nothing was written").
    """
    tail = f"; {consequence}" if consequence else ""
    defects = report.get("defects") or []
    quality = report.get("quality")
    if defects:
        raise VerifyError(f"{defect}: {defects[0]}{tail}", defect_hint)
    if quality and quality["below"]:
        message = quality_message(quality, what)
        if quality["enforced"]:
            raise QualityError(f"{message}; the file computes what the quantized model computes{tail}",
                               "a smaller --group-size, an 8-bit or float scheme, or a lower --min-sqnr-float")
        warn(f"{message}; the file computes what the quantized model computes (--min-sqnr-float X fails below X)")
