"""Peak resident memory (RSS) of this process, per stage.

Linux keeps the process's high-water mark (``VmHWM`` in ``/proc/self/status``)
and lets the process reset it (``5`` to ``/proc/self/clear_refs``), which
gives exact per-stage peaks. Resetting it also resets what ``getrusage`` and
``/usr/bin/time`` report at exit, so the meter remembers the peak before each
reset: :meth:`PeakMeter.peak_mb` is the process's peak since the meter began.
Elsewhere (no procfs) ``ru_maxrss`` gives the process peak so far.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import mmap
import os
import resource
import sys

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def status_kb(keys) -> dict[str, int]:
    """The ``/proc/self/status`` fields named in ``keys`` (kB), read in one pass; {} without procfs."""
    found = {}
    try:
        with open(STATUS) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    found[key] = int(value.split()[0])
    except OSError:
        return {}
    return found


def _status_kb(key: str) -> int | None:
    return status_kb((key,)).get(key)


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def _hwm_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def _reset_hwm() -> bool:
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """``start()`` before a stage, ``stop()`` after it: the stage's peak RSS in MB."""

    def __init__(self):
        self.before = _hwm_mb()  # the process's peak up to here (imports, model file)
        self.peaks: dict[str, float] = {}

    def start(self) -> None:
        _reset_hwm()

    def stop(self, name: str) -> float:
        peak = _hwm_mb()
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
        return peak

    def peak_mb(self) -> float:
        return max([self.before, *self.peaks.values()])


def no_blas_buffer_cache() -> None:
    """MKL (torch's CPU BLAS and LAPACK) keeps freed work buffers in a cache of its own per thread
    unless ``MKL_DISABLE_FAST_MM`` is set when it starts: on a 16-core host those caches held about
    100 MB of a GPTQ export's peak (1B shape, measured), for no measurable speed. Set here when the
    package is imported (MKL reads it before its first allocation), unless the environment has it."""
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20
_mmap_threshold_set: list[bool] = []


def return_freed_memory() -> None:
    """Make glibc give freed tensor buffers back to the system (idempotent, process-wide).

    By default glibc raises its mmap threshold to the size of the last freed
    mapped block (up to 32 MB), after which layer-sized buffers come from the
    heap; freed between the quantized layers that stay alive, they fragment it
    and the resident set grows by the float layers already dropped (measured:
    4.5x the quantized weights on a 34M-parameter decoder). A fixed 1 MB
    threshold maps every large buffer on its own and unmaps it when freed.
    """
    if _mmap_threshold_set:
        return
    _mmap_threshold_set.append(True)
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def release_memory() -> None:
    """Free what a stage let go now: graphs and programs are reference cycles
    that hold their weights until the next collection, which would otherwise
    come after the next stage's allocations (peak RSS)."""
    gc.collect()


_MADV_DONTNEED = 4  # madvise advice (sys/mman.h)


def release_pages(address: int, nbytes: int) -> None:
    """Take the whole pages of [address, address + nbytes) out of the resident set (Linux madvise
    MADV_DONTNEED): anonymous memory reads as zeros if touched again, a file mapping re-reads its file.
    Elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)
