"""Unpacked weights kept between calls of the golden executor's int4 ops, within a memory budget.

A KV-cache file is run one token a call, and every call of an int4 op unpacked (and dequantized) its
whole weight again: at the Llama-3.2-1B shape that is most of a call's time. The references ask this
cache instead: an entry is keyed by the identity of the packed tensors it was made from (and their
in-place version counters, so a written tensor is never served stale) and dropped as soon as one of
them is freed (the executor's ``reset`` frees its constants). Once the budget is full, new entries are
not kept (a decoder visits its layers in the same order every call: evicting the oldest would make
every call miss); what is kept is served, the rest is made each call as before.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import torch

# Share of the memory available when the cache is made that it may hold.
UNPACK_CACHE_MEMORY_SHARE = 0.25
# Budget when the available memory cannot be read (no /proc/meminfo).
UNPACK_CACHE_FALLBACK_BYTES = 1 << 30


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_budget() -> int:
    available = _available_bytes()
    return int(available * UNPACK_CACHE_MEMORY_SHARE) if available else UNPACK_CACHE_FALLBACK_BYTES


class UnpackCache:
    """``get(kind, sources, extra, make)``: ``make()``'s tensor, made once while ``sources`` live unchanged."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget = default_budget() if budget_bytes is None else budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[tuple, tuple[tuple, tuple, torch.Tensor]] = {}  # key -> (weakrefs, versions, value)

    def get(self, kind: str, sources: tuple[torch.Tensor, ...], extra: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (kind, tuple(id(t) for t in sources), extra)
        versions = tuple(t._version for t in sources)
        entry = self._entries.get(key)
        if entry is not None:
            refs, kept_versions, value = entry
            if all(r() is t for r, t in zip(refs, sources)) and kept_versions == versions:
                self.hits += 1
                return value
            self._drop(key)
        self.misses += 1
        value = make()
        size = value.numel() * value.element_size()
        if self.used + size <= self.budget:
            drop = lambda _ref, key=key: self._drop(key)  # noqa: E731
            self._entries[key] = (tuple(weakref.ref(t, drop) for t in sources), versions, value)
            self.used += size
        return value

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= entry[2].numel() * entry[2].element_size()

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)


# The references' one cache (QLOWER_UNPACK_CACHE_MB sets its budget; 0 turns it off).
CACHE = UnpackCache(int(os.environ["QLOWER_UNPACK_CACHE_MB"]) << 20 if os.environ.get("QLOWER_UNPACK_CACHE_MB") else None)
