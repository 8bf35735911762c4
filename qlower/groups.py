"""Repeated layers as one row: rows that differ only by the numbers in their names.

A decoder's per-layer report repeats the same seven projections in every block;
``group_rows`` folds ``model.layers.0.mlp.up_proj`` … ``model.layers.31.mlp.up_proj``
into ``model.layers.{0..31}.mlp.up_proj`` (32 rows) when every other field of the
rows is equal. A row whose fields differ (a layer that stayed float, another group
size, another op) stays apart, so differences remain visible. Fields are compared
generically: a field added to the rows later takes part without changes here.
"""

from __future__ import annotations

import json
from itertools import groupby
from typing import Any, Iterable, Sequence

# Ranges of at least this many consecutive numbers are written a..b.
RANGE_MIN_RUN = 3


def group_rows(rows: Sequence[dict[str, Any]], name_key: str | None = "name", ignore: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Groups of ``rows``, in the order of their first member.

    Rows fall in one group when their names are equal once the dot-separated numeric
    components are left out (``layers.3`` ~ ``layers.17``) and all their fields but
    ``name_key`` and ``ignore`` are equal. Each group is the shared fields plus
    ``name`` (the pattern, e.g. ``model.layers.{0..3,5..31}.mlp.up_proj``; absent
    without ``name_key``), ``count`` and ``rows`` (the members' positions in ``rows``).
    A name with several varying numbers is one group only when its members are every
    combination of those numbers; otherwise it splits so that each group varies in
    one number, and its pattern names exactly its members.
    """
    skipped = {name_key, *ignore} - {None}
    buckets: dict[tuple, list[tuple[int, tuple[int, ...]]]] = {}
    for i, row in enumerate(rows):
        template, numbers = _split_name(str(row.get(name_key) or "") if name_key else "")
        fields = json.dumps({k: v for k, v in row.items() if k not in skipped}, sort_keys=True, default=str)
        buckets.setdefault((template, fields), []).append((i, numbers))
    groups = []
    for (template, _), members in buckets.items():
        for part in _product_parts(members):
            first = rows[part[0][0]]
            group = {k: v for k, v in first.items() if k not in skipped}
            if name_key:
                group["name"] = _pattern(template, [n for _, n in part]) if len(part) > 1 else str(first.get(name_key) or "")
            group["count"] = len(part)
            group["rows"] = [i for i, _ in part]
            groups.append(group)
    groups.sort(key=lambda g: g["rows"][0])
    return groups


def compact_numbers(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5, 6, 7]`` → ``"0..3,5..7"``; runs shorter than RANGE_MIN_RUN are listed."""
    values = sorted(set(numbers))
    parts = []
    for _, run in groupby(enumerate(values), key=lambda iv: iv[1] - iv[0]):
        run = [v for _, v in run]
        if len(run) >= RANGE_MIN_RUN:
            parts.append(f"{run[0]}..{run[-1]}")
        else:
            parts.extend(map(str, run))
    return ",".join(parts)


def _split_name(name: str) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """``"layers.3.mlp"`` → ``(("layers", None, "mlp"), (3,))``: canonical integers only ("03" stays text)."""
    parts = name.split(".")
    numeric = [p.isdigit() and str(int(p)) == p for p in parts]
    template = tuple(None if is_num else p for p, is_num in zip(parts, numeric))
    return template, tuple(int(p) for p, is_num in zip(parts, numeric) if is_num)


def _product_parts(members: list[tuple[int, tuple[int, ...]]]) -> list[list[tuple[int, tuple[int, ...]]]]:
    """``members`` as one part when their number tuples are a full product, else split on all but the first varying number."""
    width = len(members[0][1])
    varying = [j for j in range(width) if len({n[j] for _, n in members}) > 1]
    if len(varying) <= 1:
        return [members]
    distinct = {n for _, n in members}
    product = 1
    for j in varying:
        product *= len({n[j] for n in distinct})
    if product == len(distinct) == len(members):
        return [members]
    rest = varying[1:]
    parts: dict[tuple[int, ...], list] = {}
    for member in members:
        parts.setdefault(tuple(member[1][j] for j in rest), []).append(member)
    return list(parts.values())


def _pattern(template: tuple[str | None, ...], numbers: list[tuple[int, ...]]) -> str:
    out, j = [], 0
    for part in template:
        if part is not None:
            out.append(part)
            continue
        values = {n[j] for n in numbers}
        out.append(str(next(iter(values))) if len(values) == 1 else "{" + compact_numbers(values) + "}")
        j += 1
    return ".".join(out)
