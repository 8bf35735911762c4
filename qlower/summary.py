"""The export summary: one dict, printed as tables or as the --json document."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .pte import read_pte, summarize
from .quantize import LayerPlan

# The fused op that each scheme's linears become on the Vulkan delegate.
SCHEME_FUSED_OP = {
    "qta8a_qga4w": "linear_dq8ca_q4gsw",
    "qga4w": "linear_q4gsw",
    "q8ta_q8csw": "q8ta_linear",  # or q8ta_linear_gemv / linear_q8ta_q8csw, by context
}
EMBEDDING_FUSED_OP = "embedding_q4gsw"


def export_summary(job) -> dict[str, Any]:
    pte = read_pte(job.pte_bytes)
    counts = summarize(pte)
    linears = [p for p in job.plans if p.kind == "linear"]
    fused_ops = counts["fused_ops"]
    fused_linears = sum(v for k, v in fused_ops.items() if "linear" in k)
    return {
        "model": str(job.model_path),
        "entry": job.loaded.entry,
        "output": str(job.output) if job.output else None,
        "scheme": job.options.scheme,
        "group_size": job.options.group_size,
        "layers": {
            "linear": len(linears),
            "quantized": sum(p.quantized for p in linears),
            "fused": fused_linears,
            "unfused": len(linears) - fused_linears,
            "embeddings": sum(p.kind == "embedding" for p in job.plans),
            "embeddings_quantized": sum(p.kind == "embedding" and p.quantized for p in job.plans),
        },
        "layer_plans": [_plan_row(p) for p in job.plans],
        **counts,
        "timings_s": {k: round(v, 3) for k, v in job.timings.items()},
    }


def _plan_row(plan: LayerPlan) -> dict[str, Any]:
    row = plan.to_dict()
    if plan.quantized:
        row["target_op"] = EMBEDDING_FUSED_OP if plan.kind == "embedding" else SCHEME_FUSED_OP.get(plan.scheme)
    return row


def histogram(items) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))
