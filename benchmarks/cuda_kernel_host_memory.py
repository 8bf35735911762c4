"""Host memory each kind of CUDA kernel adds the first time it runs: with lazy module loading (CUDA's default)
the driver loads a kernel's module (for torch, one source file's kernels) into host memory on its first
launch and keeps it. GPTQ's column loop on a GPU pays this once per kind of kernel it uses, so the export's
host peak depends on how many kinds it uses, not on the model's size.

Each operation below runs once, in order, after CUDA's context; a line tells what the RSS (anonymous part
too) and malloc's in-use bytes grew by. A module already loaded by an earlier line costs nothing again, so
the order matters: read the numbers as "what this op added here".

    python3 benchmarks/cuda_kernel_host_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from host_memory import mallinfo_mb, status_mb  # noqa: E402


def operations(torch, dev: str):
    """(name, thunk) pairs: the kinds of kernels GPTQ's GPU path used before it kept to a few, and those it keeps."""
    n, k = 512, 1024
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(k, k, generator=gen).to(dev)
    w = torch.randn(n, k, generator=gen).to(dev)
    order = torch.randperm(k, generator=gen).to(dev)
    mask = (torch.rand(k, generator=gen) < 0.1).to(dev)
    one = torch.tensor(7.5, device=dev)
    return [
        ("copy: strided to host", lambda: h[:, :10].cpu()),
        ("copy: float32 -> float64", lambda: h.to(torch.float64)),
        ("fill with zeros", lambda: torch.zeros(n, k, dtype=torch.int8, device=dev)),
        ("index columns by a tensor", lambda: h[:, order]),
        ("index_put with a bool mask", lambda: h.diagonal().__setitem__(mask, 1.0)),
        ("add", lambda: h.diagonal().add_(one)),
        ("tril", lambda: torch.tril(h)),
        ("flip", lambda: h.flip(0, 1)),
        ("masked_fill", lambda: w.masked_fill(mask, 0.0)),
        ("cat", lambda: torch.cat([w[:, :5], w[:, 5:]], 1)),
        ("abs", lambda: w.abs()),
        ("amax over rows", lambda: w.abs().amax(-1)),
        ("divide", lambda: w / one),
        ("clamp_min", lambda: w.clamp_min(1e-7)),
        ("multiply", lambda: w * 0.9),
        ("round", lambda: w.round()),
        ("clamp", lambda: w.clamp(-8, 7)),
        ("subtract", lambda: w - w),
        ("pow 2", lambda: w ** 2),
        ("sum float64 over rows", lambda: w.to(torch.float64).sum(-1)),
        ("less than", lambda: w[:, 0] < w[:, 1]),
        ("where", lambda: torch.where(w[:, 0] < w[:, 1], w[:, 0], w[:, 1])),
        ("copy: float32 -> int8", lambda: w.round().to(torch.int8)),
        ("matmul float64", lambda: w.to(torch.float64)[:, :128] @ h.to(torch.float64)[:128, :]),
        ("any", lambda: bool(mask.any())),
        ("argsort", lambda: torch.argsort(order)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA GPU; run this on a GPU host", file=sys.stderr)
        return 1
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()

    def now():
        s, m = status_mb(), mallinfo_mb()
        return s["VmRSS"], s["RssAnon"], (m or {}).get("in_use", 0)

    rows, last = [], now()
    for name, run in operations(torch, "cuda"):
        run()
        torch.cuda.synchronize()
        cur = now()
        row = {"op": name, "rss_mb": cur[0] - last[0], "anon_mb": cur[1] - last[1], "malloc_in_use_mb": cur[2] - last[2]}
        rows.append(row)
        print(f"{name:30s} RSS +{row['rss_mb']:4d}  anon +{row['anon_mb']:4d}  malloc in use +{row['malloc_in_use_mb']:4d} MB",
              flush=True)
        last = cur
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "ops": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
