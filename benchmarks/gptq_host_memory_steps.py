"""Host memory of GPTQ's pieces, one step at a time, on the device GPTQ runs on (a CUDA GPU by default).

Each step prints the RSS (anonymous and file-backed) and glibc's in-use bytes after it: importing torch and
qlower's quantize stage, CUDA's context, a first matrix product, a Hessian summed on the device (calibration
inputs as export's hooks give them), its factor, then GPTQ of a weight three times (a first call loads the
device's kernels; a wider one follows). What a step adds that later steps keep is host memory the export
holds for good once it runs that step. On the CPU it measures the same steps without a GPU:

    python3 benchmarks/gptq_host_memory_steps.py                 # CUDA, K = 8192 (a 1B MLP's down projection)
    python3 benchmarks/gptq_host_memory_steps.py --device cpu --k 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from host_memory import mallinfo_mb, status_mb  # noqa: E402

ROWS = 2048  # a 1B layer's output rows (down projection)
WINDOW = 512  # tokens per calibration window, as export takes them


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--k", type=int, default=8192, help="input width of the weight (the Hessian is K x K)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.k % args.group_size:
        ap.error("--k must be a multiple of --group-size")
    steps: list[dict] = []
    t0 = time.perf_counter()

    def step(name: str) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now, malloc = status_mb(), mallinfo_mb()
        steps.append({"step": name, "s": round(time.perf_counter() - t0, 2), **now, "malloc_mb": malloc})
        in_use = f"{malloc['in_use']:5d}" if malloc else "    -"
        print(f"{name:44s} RSS {now['VmRSS']:5d}  anon {now['RssAnon']:5d}  file {now['RssFile']:5d}  malloc in use {in_use} MB",
              flush=True)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA GPU; run with --device cpu", file=sys.stderr)
        return 1
    step("import torch")
    import torchao  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from qlower import weight_quant as wq
    from qlower.memory import return_freed_memory

    return_freed_memory()  # as export does before its stages
    step("the quantize stage's imports")
    if args.device == "cuda":
        torch.zeros(1, device="cuda")
        step("CUDA context")
    a = torch.ones(64, 64, device=args.device, dtype=torch.float64)
    float((a @ a).sum())
    step("a first float64 matrix product")
    gen = torch.Generator().manual_seed(0)
    h = wq.hessian_sum(args.k, args.device)
    for _ in range(4):
        wq.add_gram(h, torch.randn(WINDOW, args.k, generator=gen))
    wq.true_divide(h, 4.0 * WINDOW)
    step(f"Hessian summed ({args.k} x {args.k})")
    hessians = wq.Hessians(h, owned=True)
    del h
    prepared = hessians.prepared(device=args.device)
    step("its factor")
    for i, rows in enumerate((ROWS, ROWS, 4 * ROWS)):
        w = torch.randn(rows, args.k, generator=gen)
        q, scales = wq.gptq(w, None, args.group_size, wq.DEFAULT_GPTQ, prepared, args.device)
        del w, q, scales
        step(f"gptq #{i + 1} ({rows} x {args.k})")
    del prepared, hessians
    if args.device == "cuda":
        torch.cuda.empty_cache()
    step("all freed")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "k": args.k, "torch": torch.__version__,
                                         "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                                         "threads": torch.get_num_threads(), "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
