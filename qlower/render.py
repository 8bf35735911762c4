"""Human-readable rendering of the summaries (the --json path bypasses this)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .console import out


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_export(summary: dict[str, Any]) -> None:
    layers = summary["layers"]
    out.print(f"[bold]{summary['model']}[/] → {summary['output'] or '(not written)'}  scheme {summary['scheme']}, group size {summary['group_size']}")
    out.print(
        f"linear layers: {layers['linear']} found, {layers['quantized']} quantized, "
        f"{layers['fused']} fused, {layers['unfused']} left unfused"
        + (f"; embeddings: {layers['embeddings_quantized']}/{layers['embeddings']} quantized" if layers["embeddings"] else "")
    )
    render_layer_table(summary["layer_plans"])
    fused = ", ".join(f"{op} ×{n}" for op, n in summary["fused_ops"].items()) or "none"
    out.print(f"fused ops: {fused}")
    cpu = ", ".join(f"{op} ×{n}" for op, n in summary["cpu_ops"].items()) or "none"
    out.print(f"Vulkan partitions: {summary['vulkan_partitions']}   operators left on the CPU: {cpu}")
    size = summary["size"]
    out.print(
        f".pte size: {human_bytes(size['total'])} (packed weights {human_bytes(size['packed_weights'])}, "
        f"scales {human_bytes(size['scales'])}, float weights {human_bytes(size['float_weights'])}, other {human_bytes(size['other'])})"
    )


def render_layer_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("layer", "kind", "N", "K", "group", "result"):
        table.add_column(col, justify="right" if col in ("N", "K", "group") else "left")
    for row in rows:
        result = f"[green]{row.get('target_op')}[/]" if row["quantized"] else f"[yellow]float[/]: {row['reason']}"
        table.add_row(row["name"], row["kind"], str(row["n"]), str(row["k"]), str(row["group_size"] or "-"), result)
    out.print(table)
