"""The output sinks: results to stdout, progress and warnings to stderr.

Also keeps the libraries' own output off the terminal: their import-time
chatter (torchao's optional-kernel notices, ExecuTorch's INFO logs), the log
lines ExecuTorch's C++ kernels print on every call (``[kernel_runtime_context.h:91]
No temp allocator provided``, ``[cpuinfo_utils.cpp:…]``) and transformers'
progress bars, so that stderr carries only qlower's lines and ``--json``
stays one JSON document. ``QLOWER_DEBUG=1`` lets everything through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator

from rich.console import Console

# Wide when piped, so tables are not folded at 80 columns in logs.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def debug() -> bool:
    return os.environ.get("QLOWER_DEBUG") == "1"


def quiet_transformers() -> None:
    """No progress bars or info logs from transformers / huggingface_hub (set before they are imported)."""
    if debug():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def quiet_libraries() -> None:
    quiet_transformers()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*|torchao\..*|executorch\..*")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("torchao", "executorch", "torch._export", "torch.export", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def silenced_fds() -> Iterator[None]:
    """Swallow what C extensions print to fd 1/2 while importing (not our output)."""
    if debug():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Within the block, what C++ code writes to fd 2 is dropped (ExecuTorch's kernels log a line per
    call of its LLM cache ops) while Python's stderr, and so progress, warnings and errors, still show."""
    if os.environ.get("QLOWER_DEBUG") == "1":
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    saved_stream = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    # Python's stderr moves to a copy of fd 2 only where it writes to fd 2 (not when captured, as in tests).
    try:
        on_fd2 = saved_stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        on_fd2 = False
    stream = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding=getattr(saved_stream, "encoding", None) or "utf-8",
                       errors="backslashreplace") if on_fd2 else saved_stream
    try:
        os.dup2(devnull, 2)
        sys.stderr = stream
        yield
    finally:
        stream.flush()
        sys.stderr = saved_stream
        os.dup2(saved_fd, 2)
        if stream is not saved_stream:
            stream.close()
        for fd in (saved_fd, devnull):
            os.close(fd)


def import_heavy_libraries() -> None:
    """Import torch/torchao/executorch once, quietly, then quiet their loggers."""
    from .et_modules import complete

    quiet_transformers()
    with silenced_fds():
        complete()  # packages whose __init__ a .pte read deferred (qlower.et_modules)
        import executorch.backends.vulkan.custom_ops_lib  # noqa: F401  registers et_vk ops
        import executorch.backends.vulkan.partitioner.vulkan_partitioner  # noqa: F401
        import executorch.exir  # noqa: F401
        import torchao.quantization  # noqa: F401
    quiet_libraries()


# What the libraries print that is never the answer to a failure: per-call kernel logs,
# CPU probing, progress bars, import notices.
NOISE = re.compile(r"No temp allocator provided|cpuinfo_utils\.cpp|CPU info and manual query|it/s\]|\d+%\||"
                   r"Failed to load .*torchao|is an Enum subclass|^\s*$")


class NativeOutput:
    """fd 2 redirected to a temporary file for the length of a command: what C++ code (and any
    library writing to stderr) prints is kept out of sight, while ``err`` still writes to the
    terminal. :meth:`last_line` is the last line worth showing with an error."""

    def __init__(self) -> None:
        self.file = None
        self.saved_fd = None
        self.terminal = None

    def start(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved_fd = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        if _is_fd(sys.stderr, 2):  # our console wrote to fd 2: keep it on the terminal
            self.terminal = os.fdopen(os.dup(self.saved_fd), "w", encoding=sys.stderr.encoding or "utf-8",
                                      errors="replace", buffering=1)
            err.file = self.terminal

    def stop(self) -> None:
        sys.stderr.flush()
        if self.terminal is not None:
            self.terminal.flush()
            err.file = None
            self.terminal.close()
            self.terminal = None
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)

    def last_line(self, limit: int = 1 << 16) -> str | None:
        """The last line of captured output that is not known noise, or None."""
        if self.file is None:
            return None
        self.file.flush()
        size = self.file.seek(0, os.SEEK_END)
        self.file.seek(max(0, size - limit))
        text = self.file.read().decode("utf-8", errors="replace").replace("\r", "\n")
        for line in reversed(text.splitlines()):
            if not NOISE.search(line):
                return line.strip()[:300]
        return None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _is_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def native_output_hidden() -> Iterator[NativeOutput | None]:
    """For a command: hide what the libraries print on fd 2 (None under QLOWER_DEBUG=1).

    The capture ends before the caller handles an exception, so ``error:`` lines and
    tracebacks reach the terminal; the caller may still read ``last_line()`` until it closes.
    """
    if debug():
        yield None
        return
    quiet_transformers()
    capture = NativeOutput()
    capture.start()
    try:
        yield capture
    finally:
        capture.stop()


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}")
