"""The export summary: one dict, printed as tables or as the --json document."""

from __future__ import annotations

from typing import Any

from .groups import group_rows
from .pte import read_pte, summarize
from .runtime_caps import DQ8CA_OPS, DQ8CA_PREFILL_SAFE_GROUP_SIZES, load_problems
from .quantize import LayerPlan

EMBEDDING_FUSED_OP = "embedding_q4gsw"


def export_summary(job) -> dict[str, Any]:
    pte = read_pte(job.made.pte_bytes if job.made.pte_bytes is not None else job.request.output, constants=False)
    counts = summarize(pte)
    rows = layer_rows(job.made.plans, job.made.fusion.layers if job.made.fusion else [], counts["fused_ops"])
    linears = [r for r in rows if r["kind"] == "linear"]
    embeddings = [r for r in rows if r["kind"] == "embedding"]
    convs = [r for r in rows if r["kind"] == "conv"]
    matmuls = [r for r in rows if r["kind"] not in ("linear", "embedding", "conv")]
    return {
        "model": str(job.request.model_path),
        "entry": job.made.loaded.entry,
        "output": str(job.request.output) if job.request.output else None,
        "scheme": job.request.options.scheme,
        "group_size": job.request.options.group_size,
        "weight_algorithm": job.request.options.weight_algorithm,
        "layers": {
            "linear": len(linears),
            "quantized": sum(r["quantized"] for r in linears),
            "fused": sum(bool(r["fused_op"]) for r in linears),
            "unfused": sum(not r["fused_op"] for r in linears),
            "embeddings": len(embeddings),
            "embeddings_quantized": sum(r["quantized"] for r in embeddings),
            "conv": len(convs),
            "conv_quantized": sum(r["quantized"] for r in convs),
            "conv_fused": sum(bool(r["fused_op"]) for r in convs),
            "other_matmuls": len(matmuls),
            "other_matmuls_fused": sum(bool(r["fused_op"]) for r in matmuls),
        },
        "layer_report": rows,
        "notes": group_size_notes(rows),
        "layer_groups": layer_groups(rows),
        "fusion_passes": job.made.fusion.passes if job.made.fusion else [],
        "delegation_passes": list(job.made.delegation_passes),
        "cpu_notes": [{"node": n.node, "op": n.op, "reason": n.reason} for n in job.made.cpu_notes],
        "runtime": job.request.options.runtime,
        "runtime_problems": [{"node_id": p.node_id, "op": p.op, "message": p.message}
                             for d in pte.vulkan_delegates
                             for p in load_problems(d.graph, job.request.options.runtime)],
        **counts,
        "decode": decode_summary(job) if job.made.kv_cache and job.made.decode_info else None,
        "written": [str(p) for p in job.made.written],
        "verification": job.made.verification,
        "timings_s": {k: round(v, 3) for k, v in job.measured.timings.items()},
    }


def decode_summary(job) -> dict[str, Any]:
    from .llm.runner_tokenizer import llama_main_command

    decode = dict(job.made.decode_info, metadata=job.made.metadata, tokenizer=None, runner_command=None)
    if job.made.tokenizer is not None and job.request.output is not None:
        decode["tokenizer"] = job.made.tokenizer.summary()
        data = [p for p in job.made.written if p.suffix == ".ptd"]
        decode["runner_command"] = llama_main_command(job.request.output, job.made.tokenizer, data)
    return decode


def layer_rows(plans: list[LayerPlan], fused_layers: list, fused_ops: dict[str, int]) -> list[dict[str, Any]]:
    """One row per layer: the quantization plan joined with the fusion outcome.

    Linear and conv modules are matched to fusion entries by module name;
    linear-like nodes that belong to no nn.Linear (functional matmuls, attention
    products) and functional convolutions get rows of their own, named by the module
    they are called in, with the graph node under ``node``, so every matmul and conv
    in the graph is accounted for. Conv rows add kernel, stride, groups.
    """
    by_module: dict[str, list] = {}
    for info in fused_layers:
        by_module.setdefault(info.module, []).append(info)
    rows = []
    for plan in plans:
        row = {"name": plan.name, "kind": plan.kind, "n": plan.n, "k": plan.k, "group_size": plan.group_size,
               "stored_group_size": None, "scheme": plan.scheme, "algorithm": plan.algorithm, "quantized": plan.quantized,
               "fused_op": None, "reason": plan.reason}
        if plan.kind == "conv":
            row.update(kernel=plan.kernel, stride=plan.stride, groups=plan.groups)
        if plan.kind == "embedding":
            if plan.quantized and fused_ops.get(EMBEDDING_FUSED_OP):
                row["fused_op"] = EMBEDDING_FUSED_OP
                row["stored_group_size"] = plan.group_size
        else:
            infos = by_module.pop(plan.name, [])
            fused = next((i for i in infos if i.fused_op), None)
            if fused is not None:
                row["fused_op"] = short_op(fused.fused_op)
                row["stored_group_size"] = _stored_group_size(fused)
                if fused.note:
                    row["note"] = fused.note
            elif plan.quantized:
                row["reason"] = infos[0].reason if infos else f"no {plan.kind} node found for this module in the exported graph"
        rows.append(row)
    for module, infos in by_module.items():
        for info in infos:
            row = {"name": module or "<top>", "node": info.node, "kind": info.anchor, "n": info.n, "k": info.k,
                   "group_size": info.group_size, "stored_group_size": _stored_group_size(info) if info.fused_op else None,
                   "scheme": info.scheme, "quantized": info.fused_op is not None,
                   "fused_op": short_op(info.fused_op), "reason": info.reason}
            if info.anchor == "conv":
                row.update(kernel=info.kernel, stride=info.stride, groups=info.groups)
            if info.note and info.fused_op:
                row["note"] = info.note
            rows.append(row)
    return rows


def _stored_group_size(info) -> int | None:
    """The group size the file holds for a fused layer: its own, or the one the runtime needed instead."""
    return getattr(info, "stored_group_size", None) or getattr(info, "group_size", None)


def group_size_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line when layers are stored at a smaller group size than asked (empty otherwise)."""
    restated = [r for r in rows if r.get("stored_group_size") and r["stored_group_size"] != r["group_size"]]
    if not restated:
        return []
    sizes = ", ".join(sorted({f"{r['group_size']} as {r['stored_group_size']}" for r in restated}))
    return [f"{len(restated)} layer(s) stored at a smaller group size ({sizes}), each scale repeated: the same "
            f"int4 values and math; ET-VK's {', '.join(DQ8CA_OPS)} is wrong on multi-row inputs at group sizes other than "
            f"{DQ8CA_PREFILL_SAFE_GROUP_SIZES}"]


def layer_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-layer rows with layers that differ only by their index as one group (``count``,
    ``rows``: positions in ``rows``); a graph node's own name does not keep its row apart."""
    return group_rows(rows, ignore=("node",))


def short_op(name: str | None) -> str | None:
    """"et_vk.linear_q4gsw" → "linear_q4gsw", the name the histograms use."""
    return name.removeprefix("et_vk.") if name else None
