"""The output sinks: results to stdout, progress and warnings to stderr.

Also quiets the libraries' import-time chatter (torchao's optional-kernel
notices, ExecuTorch's INFO logs) so that stdout carries only our output and
``--json`` stays one JSON document.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

from rich.console import Console

# Wide when piped, so tables are not folded at 80 columns in logs.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*|torchao\..*|executorch\..*")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("torchao", "executorch", "torch._export", "torch.export", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def silenced_fds() -> Iterator[None]:
    """Swallow what C extensions print to fd 1/2 while importing (not our output)."""
    if os.environ.get("QLOWER_DEBUG") == "1":
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
    with silenced_fds():
        import executorch.backends.vulkan.custom_ops_lib  # noqa: F401  registers et_vk ops
        import executorch.backends.vulkan.partitioner.vulkan_partitioner  # noqa: F401
        import executorch.exir  # noqa: F401
        import torchao.quantization  # noqa: F401
    quiet_libraries()


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}")
