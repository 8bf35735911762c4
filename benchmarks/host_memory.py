"""Where a process's host memory goes, sampled while it works (Linux): resident memory by mapping
(``/proc/self/smaps``), glibc's allocator (``mallinfo2``) and the CPU tensors Python holds.

:class:`StageSampler` runs in a thread of the measured process. It reads ``/proc/self/status`` every
``interval`` seconds, keeps the highest RSS and, at each stage's highest RSS (at most once a second), a
breakdown: resident MB by mapping (anonymous memory, the heap, each library, the weight store's files),
malloc's in-use bytes and mapped chunks, and the largest CPU tensors reachable from Python (file-backed
ones included). Used by ``quantize_stage_bench.py --breakdown``.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time

from qlower.memory import status_kb

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status_mb() -> dict[str, int]:
    """VmRSS, VmHWM and the RSS split (anonymous, file, shared memory) in MB."""
    return {key: kb // 1024 for key, kb in status_kb(_STATUS_KEYS).items()}


def _mapping_name(fields: list[str]) -> str:
    name = fields[5] if len(fields) > 5 else "[anon]"
    if name.startswith("/"):
        base = name.rsplit("/", 1)[-1]
        return "[weight store]" if base.endswith(".weights") else base
    return name


def smaps_by_mapping(top: int = 12, min_mb: int = 4) -> list[tuple[str, int]]:
    """Resident MB per mapping name (files by base name), the ``top`` largest of at least ``min_mb``."""
    by: dict[str, int] = {}
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if "-" in fields[0] and not fields[0].endswith(":"):
                name = _mapping_name(fields)
            elif fields[0] == "Rss:":
                by[name] = by.get(name, 0) + int(fields[1])
    rows = [(k, v // 1024) for k, v in by.items() if v // 1024 >= min_mb]
    return sorted(rows, key=lambda kv: -kv[1])[:top]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo_mb() -> dict[str, int] | None:
    """glibc's allocator over all its arenas: ``arena`` (bytes its arenas hold), ``in_use`` (handed out from
    them), ``free`` (kept free in them), ``mapped`` (chunks mapped on their own); None without glibc 2.33+."""
    try:
        call = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    call.restype = _MallInfo2
    m = call()
    return {"arena": m.arena >> 20, "in_use": m.uordblks >> 20, "free": m.fordblks >> 20, "mapped": m.hblkhd >> 20}


def live_cpu_tensors(top: int = 8, min_mb: int = 1) -> dict:
    """The CPU tensors Python holds (each storage once), of at least ``min_mb``: their total and the
    ``top`` largest as (MB, shape, dtype)."""
    import torch

    seen, rows = set(), []
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() < (min_mb << 20):
                continue
            seen.add(storage.data_ptr())
            rows.append((storage.nbytes() >> 20, list(obj.shape), str(obj.dtype).removeprefix("torch.")))
        except Exception:  # a tensor changing under the sampler, a subclass without storage
            continue
    rows.sort(key=lambda r: -r[0])
    return {"total_mb": sum(r[0] for r in rows), "count": len(rows), "top": rows[:top]}


class StageSampler:
    """Samples this process's memory in a thread; :meth:`stage` names what runs now."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.current = "start"
        self.peak: dict = {"VmRSS": 0}
        self.stages: dict[str, dict] = {}
        self._t0 = time.perf_counter()
        self._last_breakdown = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> "StageSampler":
        self._thread.start()
        return self

    def stage(self, name: str) -> None:
        self.current = name

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        return {"peak": self.peak, "at_each_stage_peak": self.stages}

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            now = status_mb()
            t = round(time.perf_counter() - self._t0, 1)
            if now["VmRSS"] > self.peak["VmRSS"]:
                self.peak = dict(now, t_s=t, stage=self.current)
            stage = self.current
            if now["VmRSS"] > self.stages.get(stage, {}).get("rss_mb", 0) and time.perf_counter() - self._last_breakdown > 1.0:
                self._last_breakdown = time.perf_counter()
                self.stages[stage] = {"rss_mb": now["VmRSS"], "anon_mb": now["RssAnon"], "t_s": t,
                                      "by_mapping_mb": smaps_by_mapping(), "malloc_mb": mallinfo_mb(),
                                      "cpu_tensors": live_cpu_tensors()}
