"""Human-readable rendering of the summaries (the --json path bypasses this)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.markup import escape
from rich.table import Table

from .console import out
from .groups import compact_numbers
from .vkops import NEEDS_LIBRARY, RUNTIME_QLOWER


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_export(summary: dict[str, Any], all_layers: bool = False) -> None:
    """The export summary; repeated layers as one row each (``layer_groups``) unless ``all_layers``."""
    layers = summary["layers"]
    out.print(f"[bold]{summary['model']}[/] → {summary['output'] or '(not written)'}  scheme {summary['scheme']}, group size {summary['group_size']}"
              + (f", int4 weights by {summary['weight_algorithm']}" if summary.get("weight_algorithm", "rtn") != "rtn" else ""))
    out.print(
        f"linear layers: {layers['linear']} found, {layers['quantized']} quantized, "
        f"{layers['fused']} fused, {layers['unfused']} left unfused"
        + (f"; embeddings: {layers['embeddings_quantized']}/{layers['embeddings']} quantized" if layers["embeddings"] else "")
        + (f"; other matmuls: {layers['other_matmuls']} ({layers['other_matmuls_fused']} fused)" if layers["other_matmuls"] else "")
        + (f"; convolutions: {layers['conv']} found, {layers['conv_quantized']} quantized, {layers['conv_fused']} fused" if layers.get("conv") else "")
    )
    render_layer_table(summary["layer_report"] if all_layers else summary["layer_groups"])
    if not all_layers and any(g["count"] > 1 for g in summary["layer_groups"]):
        out.print("layers that differ only by their index share a row; --all-layers lists each")
    out.print(f"fused ops: {_counts(summary['fused_ops'])}")
    out.print(f"Vulkan partitions: {summary['vulkan_partitions']}   operators left on the CPU: {_counts(summary['cpu_ops'])}")
    for note in summary.get("notes", []):
        out.print(f"note: {note}")
    for note in summary["cpu_notes"]:
        out.print(f"[yellow]stays on the CPU[/]: {note['node']} ({note['op']}): {note['reason']}")
    if summary.get("runtime") == RUNTIME_QLOWER:
        out.print(f"runtime: needs {NEEDS_LIBRARY}; a stock runtime refuses it at load")
    for problem in summary["runtime_problems"]:
        out.print(f"[red]will abort at load[/]: {problem['message']} (Vulkan node {problem['node_id']})")
    if summary.get("verification"):
        v = summary["verification"]
        worst = min((o["vs_float"]["sqnr_db"] for o in v["outputs"]), default=None) if v.get("outputs") else None
        out.print("verify: [green]passed[/]" + (f" (worst output SQNR vs float {worst:.1f} dB)" if worst is not None else ""))
    decode = summary.get("decode")
    if decode:
        out.print(f"decode: forward(tokens[1, 1..{decode['max_seq_len']}], input_pos[1]) → logits; KV cache {decode['layers']} layers × K/V, "
                  f"{human_bytes(decode['kv_cache_bytes'])} of GPU memory at max_seq_len {decode['max_seq_len']}")
        out.print("runner metadata: " + ", ".join(f"{k}={v}" for k, v in decode["metadata"].items()))
        if decode.get("runner_command"):
            linked = " (built with qlower's op library)" if summary.get("runtime") == RUNTIME_QLOWER else ""
            out.print(f"run with ExecuTorch's LLM runner{linked}: " + " ".join(decode["runner_command"]) + " --prompt TEXT",
                      markup=False)
    for path in summary.get("written", []):
        out.print(f"wrote {path}")
    _render_size(".pte size", summary["size"])
    if summary.get("peak_rss_mb") is not None:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in summary.get("stage_peak_rss_mb", {}).items())
        out.print(f"peak memory (RSS): {summary['peak_rss_mb']:.0f} MB (per stage, MB: {stages})")


SIZE_LABELS = {"packed_weights": "packed weights", "scales": "scales", "float_weights": "float weights", "kv_cache": "KV cache",
               "other_constants": "other constants", "shared": "shared", "program_and_headers": "program and headers"}
# Parts always shown, even when empty; the others only when the file has them.
SIZE_PARTS_SHOWN = ("packed_weights", "scales", "float_weights", "program_and_headers")
# Shared constants listed by name; the rest are summed up.
SHARED_SHOWN = 3


def _render_size(label: str, size: dict[str, Any]) -> None:
    """The size split (its parts add up to the total), then the constants stored once for several users."""
    parts = [f"{SIZE_LABELS.get(k, k.replace('_', ' '))} {human_bytes(size[k])}" for k in SIZE_LABELS
             if k in size and (size[k] or k in SIZE_PARTS_SHOWN)]
    out.print(f"{label}: {human_bytes(size['total'])} = " + " + ".join(parts)
              + (f"; outside the file (.ptd): {human_bytes(size['external'])}" if size.get("external") else ""))
    shared = size.get("shared_constants") or []
    items = [f"{SIZE_LABELS.get(c['role'], c['role'])} {_tensor_text(c)} {human_bytes(c['bytes'])} ×{c['users']} users" for c in shared[:SHARED_SHOWN]]
    if len(shared) > SHARED_SHOWN:
        rest = shared[SHARED_SHOWN:]
        items.append(f"{len(rest)} more {human_bytes(sum(c['bytes'] for c in rest))}")
    if items:
        out.print("  shared (stored once): " + ", ".join(items))


def _tensor_text(c: dict[str, Any]) -> str:
    from .inspect import SHORT_DTYPE

    if c.get("shape") is None:
        return "-"
    return escape(f"{SHORT_DTYPE.get(c['dtype'], c['dtype'])}[{', '.join(map(str, c['shape']))}]")


def render_layer_table(rows: list[dict[str, Any]]) -> None:
    """Rows of the per-layer report, or its groups (a group's ``count`` follows its name)."""
    if not rows:
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    convs = any(row["kind"] == "conv" for row in rows)  # convs: N = C_out, K = C_in
    columns = ("layer", "kind", "N", "K", "group") + (("kernel", "stride", "groups") if convs else ()) + ("result",)
    for col in columns:
        table.add_column(col, justify="right" if col in ("N", "K", "group", "groups") else "left", no_wrap=col != "result")
    for row in rows:
        if row["fused_op"]:
            result = f"[green]{row['fused_op']}[/]"
        elif row["quantized"]:
            result = f"[yellow]quantized, unfused[/]: {row['reason']}"
        else:
            result = f"[yellow]float[/]: {row['reason']}"
        if row.get("note"):
            result += f" ({row['note']})"
        conv = (_dims(row.get("kernel")), _dims(row.get("stride")), _cell(row.get("groups"))) if convs else ()
        table.add_row(_grouped_name(row), row["kind"], _cell(row["n"]), _cell(row["k"]), _cell(row["group_size"]), *conv, result)
    out.print(table)


def _grouped_name(row: dict[str, Any]) -> str:
    """A layer's name (with its graph node when it is no module of its own), or a group's pattern and count."""
    count = row.get("count", 1)
    node = f" ({row['node']})" if row.get("node") else ""
    return escape(row["name"] + node) + (f" ×{count}" if count > 1 else "")


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _dims(value) -> str:
    return "-" if not value else "x".join(map(str, value))


# --- inspect -----------------------------------------------------------------


def _counts(histogram: dict[str, int]) -> str:
    return ", ".join(f"{op} ×{n}" for op, n in histogram.items()) or "none"


def _io(values: list[dict[str, Any]]) -> str:
    return ", ".join(_io_one(v) for v in values)


def _io_one(v: dict[str, Any]) -> str:
    if v["kind"] == "tensor":
        dims = [f"1..{d}" if v.get("dynamic") and d > 1 else str(d) for d in v["shape"]]
        return f"{v['dtype']}[{', '.join(dims)}]"
    return repr(v["value"]) if "value" in v else v["kind"]


def _plan_line(plan: list[dict[str, Any]], limit: int = 12) -> str:
    names = [f"{s['backend']}#{s['delegate']} ({human_bytes(s['blob_bytes'] or 0)})" if s["kind"] == "delegate" else f"[yellow]{s['operator']}[/]" for s in plan]
    if len(names) > limit:
        names = names[: limit - 1] + [f"… {len(names) - limit + 1} more"]
    return " → ".join(names) or "(empty)"


def render_inspect(report: dict[str, Any], ops: bool = False, tensors: bool = False, constants: bool = False,
                   all_layers: bool = False) -> None:
    s = report["summary"]
    program = report["program"]
    out.print(f"[bold]{report['file'] or '.pte'}[/]  {human_bytes(report['size'])}, program v{program['version']}, {len(report['methods'])} method(s)")
    for m in report["methods"]:
        out.print(f"{m['name']}({_io(m['inputs'])}) → {_io(m['outputs'])}")
        if m["plan"] or m["inputs"]:  # a constant method (LLM metadata) has no plan to show
            out.print(f"  plan: {_plan_line(m['plan'])}")
    others = ", ".join(f"{d['backend']}#{d['index']} ({human_bytes(d['blob_bytes'])})" for d in report["delegates"] if d["backend"] != "VulkanBackend")
    out.print(f"Vulkan partitions: {s['vulkan_partitions']}   other delegates: {others or 'none'}")
    out.print(f"CPU operators: {escape(_counts(s['cpu_ops']))}")
    out.print(f"fused ops: {_counts(s['fused_ops'])}")
    non_fused = Counter()
    for v in report["vulkan"]:
        non_fused.update(v["non_fused_ops"])
    out.print(f"other Vulkan ops: {_counts(dict(sorted(non_fused.items())))}")
    _render_size("size", s["size"])
    out.print(f"file layout: program {human_bytes(program['program_bytes'])}, segments {human_bytes(program['segment_bytes'])}, "
              f"named data {human_bytes(program['named_data']['bytes'])} in {program['named_data']['count']} entries")
    record = report.get("quantization")
    if record:
        by_algorithm = Counter((record.get("layers") or {}).values())
        calibration = record.get("calibration") or {}
        calibrated = f" (calibrated on {', '.join(f'{k} {v}' for k, v in calibration.items())})" if calibration else ""
        out.print(f"int4 weights: {record.get('weight_algorithm')}{escape(calibrated)}; layers: {_counts(dict(sorted(by_algorithm.items())))}")
    decode = report.get("decode")
    if decode:
        caches = decode["kv_cache"]
        if caches:
            c = caches[0]
            out.print(f"KV cache: {decode['kv_cache_layers']} layers × K/V × {c['dtype']}[{', '.join(map(str, c['shape']))}] = "
                      f"{human_bytes(decode['kv_cache_bytes'])} (inside the GPU-memory estimate)")
        else:
            out.print("[yellow]KV cache: none fused into sdpa_with_kv_cache[/]")
    if report["vulkan"]:
        consts = sum(v["memory"]["constants_bytes"] for v in report["vulkan"])
        shared = sum(v["memory"]["shared_bytes"] for v in report["vulkan"])
        objects = sum(len(v["memory"]["shared_objects"]) for v in report["vulkan"])
        out.print(f"GPU memory (estimate): {human_bytes(s['gpu_memory_bytes'])} = constants {human_bytes(consts)} + {objects} shared objects {human_bytes(shared)}")
    problems = report["runtime_problems"]
    if report.get("runtime") == RUNTIME_QLOWER:
        out.print(f"runtime: needs {NEEDS_LIBRARY}")
    if problems is None:
        out.print("runtime check: unavailable (qlower.runtime_caps is not installed)")
    elif problems:
        out.print(f"[red]runtime: {len(problems)} problem(s) will abort the load on the ET-VK runtime[/]")
        for p in problems[:10]:
            out.print(f"  delegate #{p['delegate']} node {p['node_id']}: {p['message']}", markup=False)
    else:
        out.print("runtime check: no load problems predicted")
    for v in report["vulkan"]:
        _render_fused(v, all_layers)
        if ops:
            _render_ops(v)
        if tensors:
            _render_tensors(v)
        if constants:
            _render_constants(v)


def _render_fused(v: dict[str, Any], all_layers: bool = False) -> None:
    """The fused nodes; nodes with equal parameters share a row (their count and node ids) unless ``all_layers``."""
    if not v["fused"]:
        return
    if all_layers:
        rows = [{"op": op, **p, "node_ids": [p["node_id"]]} for op, nodes in v["fused"].items() for p in nodes]
    else:
        rows = v["fused_groups"]
    table = Table(title=f"fused nodes, Vulkan delegate #{v['delegate']}", title_justify="left", show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("op", "count", "nodes", "N", "K", "group", "weights", "scales", "bias", "activation"):
        if col == "count" and all_layers:
            continue
        table.add_column(col, justify="right" if col in ("count", "N", "K", "group", "weights") else "left")
    for p in rows:
        cells = [p["op"]] + ([] if all_layers else [f"×{len(p['node_ids'])}"]) + [
            _node_ids(p["node_ids"]), _cell(p.get("n")), _cell(p.get("k")), _cell(p.get("group_size")),
            human_bytes(p["packed_weight_bytes"]) if "packed_weight_bytes" in p else "-",
            p.get("scale_dtype", "-"), "yes" if p.get("bias") else "no", str(p.get("activation") or "-"),
        ]
        table.add_row(*cells)
    out.print(table)


# Node-id lists longer than this are shortened to their first and last ids.
NODE_IDS_SHOWN = 3


def _node_ids(ids: list[int]) -> str:
    text = compact_numbers(ids)
    if text.count(",") < NODE_IDS_SHOWN:
        return text
    ordered = sorted(ids)
    return ",".join(map(str, ordered[:NODE_IDS_SHOWN - 1])) + f",…,{ordered[-1]}"


def _render_ops(v: dict[str, Any]) -> None:
    from .inspect import short_value

    out.print(f"[bold]op chain, Vulkan delegate #{v['delegate']}[/] ({len(v['ops'])} nodes, {v['values']} values)")
    for op in v["ops"]:
        args = ", ".join(f"{a['name']}={short_value(a)}" for a in op["args"])
        results = ", ".join(short_value(o) for o in op["outputs"])
        name = f"[green]{op['short_name']}[/]" if op["fused"] else op["short_name"]
        out.print(f"  {op['node_id']:>4} {name}({escape(args)}) → {escape(results)}")


def _render_tensors(v: dict[str, Any]) -> None:
    from .inspect import short_value

    table = Table(title=f"tensors, Vulkan delegate #{v['delegate']}", title_justify="left", show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("id", "tensor", "memory", "users"):
        table.add_column(col, justify="right" if col == "id" else "left", overflow="fold")
    for t in v["tensors"]:
        memory = f"const#{t['constant']}" if "constant" in t else (f"mem_obj {t['mem_obj']}" if t["mem_obj"] >= 0 else "own")
        table.add_row(str(t["id"]), escape(short_value(t)), memory, ", ".join(t["users"]) or "-")
    out.print(table)
    o = v["overrides"]
    out.print(f"graph storage override: {o['storage_type']}, layout override: {o['memory_layout']}; non-constant tensors: {_counts(o['tensor_placement'])}")


def _render_constants(v: dict[str, Any]) -> None:
    table = Table(title=f"constants, Vulkan delegate #{v['delegate']}", title_justify="left", show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("id", "bytes", "tensor", "where", "key", "users"):
        table.add_column(col, justify="right" if col in ("id", "bytes") else "left", overflow="fold")
    for c in v["constants"]:
        shape = f"{c['dtype']}[{', '.join(map(str, c['shape']))}]" if c["shape"] is not None else "-"
        table.add_row(str(c["id"]), human_bytes(c["bytes"]), escape(shape), c["location"], (c["key"] or "-")[:12], ", ".join(c["users"]) or "-")
    out.print(table)
    m = v["memory"]
    out.print(f"constants {human_bytes(m['constants_bytes'])}, shared objects {human_bytes(m['shared_bytes'])} ({len(m['shared_objects'])}), own tensors {human_bytes(m['own_tensor_bytes'])}")


def render_expectations(results: list[dict[str, Any]]) -> None:
    """One line per violated expectation, on stderr; nothing when all hold."""
    from .console import err

    for r in results:
        if not r["ok"]:
            err.print(f"[red]expectation failed:[/] {escape(r['message'])}")


# --- device runs ----------------------------------------------------------------


def render_device_checks(rows: list[dict[str, Any]]) -> None:
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold", title="fused layers on the Vulkan device vs the golden executor")
    for col in ("call", "op", "shape", "max |diff|", "tolerance", "result"):
        table.add_column(col)
    for r in rows:
        ok = "[green]ok[/]" if r["passed"] else "[red]differs[/]"
        table.add_row(f"{r['delegate_call']}.{r['op_index']}", r["op"], str(r["shape"]), f"{r['max_abs_diff']:.3g}", f"{r['tolerance']:.3g}", ok)
    out.print(table)


def render_bench(report: dict[str, Any]) -> None:
    out.print(f"device: {report['device']}   copy shader: {report['copy_gbps']:.1f} GB/s   tokens per call: {report['tokens']}")
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("layer", "op", "N", "K", "variant", "µs (median)", "µs (stream)", "GB/s", "GOP/s", "of copy"):
        table.add_column(col, justify="left" if col in ("layer", "op", "variant") else "right")
    for l in report["layers"]:
        table.add_row(l["name"], l["op"], str(l["n"]), str(l["k"]), l["variant"], f"{l['time_us']:.1f}", f"{l['stream_us']:.1f}",
                      f"{l['gbps']:.1f}", f"{l['gops']:.1f}", f"{l['fraction']:.0%}")
    out.print(table)


def render_generate(report: dict[str, Any]) -> None:
    out.print(f"[bold]{report['pte']}[/] vs {report['model']}  scheme {report['scheme']}, prompt {len(report['prompt_ids'])} tokens")
    for label, key in (("golden (.pte)", "tokens"), ("quantized eager", "eager_tokens"), ("float", "float_tokens")):
        text = report.get(key.replace("tokens", "text"))
        out.print(f"{label:>16}: {report[key]}" + (f"  {escape(repr(text))}" if text is not None else ""))
    n = len(report["tokens"])
    out.print(f"agree with quantized eager: {report['agree']}/{n} leading tokens; with float: {report['agree_float']}/{n}")
    table = Table("step", "pos", "SQNR vs quantized", "SQNR vs float")
    th = report["thresholds"]
    for i, step in enumerate(report["steps"]):
        table.add_row(str(i), str(step["pos"]), _db_cell(step["sqnr_vs_quantized"], th["vs_quantized"]),
                      _db_cell(step["sqnr_vs_float"], th["vs_float"]))
    out.print(table)
    quality = report.get("quality")
    note = (f" (a quality finding, not a defect: worst step {quality['sqnr_vs_float_db']:.1f} dB vs float, below {quality['threshold_db']:g} dB)"
            if quality and quality["below"] else "")
    out.print(f"generate: [green]passed[/]{note}" if report["ok"] else f"generate: [red]failed[/] ({escape(report['failures'][0])})")


def _db_cell(value: float, threshold: float) -> str:
    text = "inf" if value == float("inf") else f"{value:.1f} dB"
    return text if value >= threshold else f"[red]{text}[/]"


EVAL_LABELS = {"float": "float", "quantized": "quantized (eager)", "file": "file"}


def render_eval(report: dict[str, Any]) -> None:
    group = f", group size {report['group_size']}" if report.get("group_size") else ""
    out.print(f"[bold]{report['pte']}[/] vs {report['model']}  scheme {report['scheme']}{group}")
    out.print(f"{report['windows']} window(s) of {report['tokens']} tokens from {report['text_tokens']} "
              f"({'spread through the text' if report['spread_windows'] else 'from its start'}); "
              f"{report['scored']} tokens scored")
    table = Table("", "perplexity", "vs float", "window spread", "tokens", "time", "ms/token")
    for part, label in EVAL_LABELS.items():
        result = report["parts"].get(part)
        if part == "file" and report.get("file_executor"):
            label = f"file ({'runtime' if report['file_executor'] == 'runtime' else 'golden executor'})"
        if result is None:
            table.add_row(label, "skipped", "", "", "", "", "")
            continue
        delta = report["delta_pct"].get(part)
        spread = result["spread"]
        table.add_row(label, f"{result['perplexity']:.4f}", "" if delta is None else f"{delta:+.2f} %",
                      f"{spread['min']:.3f}–{spread['max']:.3f}", str(result["scored"]),
                      f"{result['seconds']:.1f} s", f"{result['ms_per_token']:.1f}")
    out.print(table)
