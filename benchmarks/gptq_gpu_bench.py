"""GPTQ's column loop at the Llama-3.2-1B shape on a CUDA GPU, and the CPU's bits checked on the way.

Runs ``qlower.weight_quant.gptq`` (the function export calls, loaded from its file alone, so this needs
only torch) on every linear of the 1B shape: 16 blocks of q/k/v/o (2048 → 2048/512/512/2048), gate/up
(2048 → 8192) and down (8192 → 2048), and the 128256 × 2048 LM head, with Hessians of correlated random
activations (4096 tokens) and random weights, a chunk of rows at a time as export quantizes them. It
reports the time per part, the peak host memory, and whether a layer quantized on the CPU has the same
int4 values and scales as on the GPU.

    python3 benchmarks/gptq_gpu_bench.py                 # all 16 blocks and the head
    python3 benchmarks/gptq_gpu_bench.py --blocks 2      # quicker
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DIM, KV, FFN, VOCAB, LAYERS = 2048, 512, 8192, 128256, 16
CHUNK_BYTES = 64 << 20  # qlower.quantize.CHUNK_BYTES: float rows quantized at once


def load_weight_quant(path: Path):
    spec = importlib.util.spec_from_file_location("weight_quant", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["weight_quant"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def hessian(k: int, tokens: int, gen: torch.Generator, device) -> torch.Tensor:
    mix = torch.randn(k, k, generator=gen, device=device) * (0.3 / k ** 0.5) + torch.eye(k, device=device)
    x = torch.randn(tokens, k, generator=gen, device=device) @ mix
    x[:, :8] *= 6  # a few outlier channels, as in trained LMs
    return (2 * x.T @ x / tokens).cpu()


def quantize(wq, w: torch.Tensor, h: torch.Tensor, group: int, device) -> None:
    prepared = wq.prepare(h, wq.DEFAULT_GPTQ)
    step = max(1, CHUNK_BYTES // (w.shape[1] * 4))
    for start in range(0, w.shape[0], step):
        wq.gptq(w[start:start + step], None, group, wq.DEFAULT_GPTQ, prepared, device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight-quant", type=Path, default=HERE.parent / "qlower" / "weight_quant.py")
    ap.add_argument("--blocks", type=int, default=LAYERS)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    wq = load_weight_quant(args.weight_quant)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "group_size": args.group_size, "tokens": args.tokens}

    # the CPU's bits: one layer (k_proj's shape) and the toy settings, on both
    cpu_gen = torch.Generator().manual_seed(1)
    w = torch.randn(KV, DIM, generator=cpu_gen) * 0.02
    h = hessian(DIM, args.tokens, gen, device)
    same = []
    for settings in (wq.DEFAULT_GPTQ, wq.GptqSettings(act_order=False, scales="absmax")):
        t = time.perf_counter()
        cpu = wq.gptq(w, h, args.group_size, settings, device="cpu")
        cpu_s = time.perf_counter() - t
        gpu = wq.gptq(w, h, args.group_size, settings, device=device)
        same.append({"settings": str(settings), "values_equal": bool(torch.equal(cpu[0], gpu[0])),
                     "scales_equal": bool(torch.equal(cpu[1], gpu[1])),
                     "values_differing": int((cpu[0] != gpu[0]).sum()), "cpu_s": round(cpu_s, 1)})
    result["cpu_vs_gpu"] = same
    print(json.dumps(same), flush=True)

    shapes = [("qkv", DIM, [DIM, KV, KV]), ("o", DIM, [DIM]), ("gate_up", DIM, [FFN, FFN]), ("down", FFN, [DIM])]
    sync()
    start = time.perf_counter()
    per_block = []
    for block in range(args.blocks):
        t = time.perf_counter()
        for _, k, outs in shapes:
            h = hessian(k, args.tokens, gen, device)
            for n in outs:
                quantize(wq, torch.randn(n, k, generator=gen, device=device).cpu() * 0.02, h, args.group_size, device)
        sync()
        per_block.append(round(time.perf_counter() - t, 2))
        print(f"block {block}: {per_block[-1]} s", flush=True)
    t = time.perf_counter()
    h = hessian(DIM, args.tokens, gen, device)
    step = max(1, CHUNK_BYTES // (DIM * 4))
    prepared = wq.prepare(h, wq.DEFAULT_GPTQ)
    for row in range(0, VOCAB, step):  # the head's rows made a chunk at a time, as streaming reads them
        rows = torch.randn(min(step, VOCAB - row), DIM, generator=gen, device=device).cpu() * 0.02
        wq.gptq(rows, None, args.group_size, wq.DEFAULT_GPTQ, prepared, device)
    sync()
    result.update(blocks=args.blocks, block_s=per_block, head_s=round(time.perf_counter() - t, 1),
                  total_s=round(time.perf_counter() - start, 1),
                  peak_host_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  peak_gpu_mb=round(torch.cuda.max_memory_allocated() / 2 ** 20) if device.type == "cuda" else None)
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
