"""qlower against the stock ExecuTorch flow: same model, same scheme, same run.

    python benchmarks/export_bench.py                       # examples/llama.py
    python benchmarks/export_bench.py --config large        # built-in 8 layers, width 1024
    python benchmarks/export_bench.py --model examples/hf_llama.py
    python benchmarks/export_bench.py --profile qlower      # where the time goes

Each flow runs in its own subprocess (fresh imports and caches, its own peak
RSS): wall time from the loaded float model to the .pte bytes, peak RSS,
Vulkan partitions, CPU kernel calls, operators/shader variants the ET-VK
runtime lacks ("will abort at load"), .pte size. Ratios are stock / qlower.

stock:  torchao quantize_ (Int8DynamicActivationIntxWeightConfig, int4 per
        group) -> torch.export -> to_edge_transform_and_lower(VulkanPartitioner)
        -> to_executorch
qlower: qlower.pipeline.STAGES after load: quantize (torchao, then one
        qlower::quantized_linear node per layer) -> export (torch.export, edge
        program by qlower.lower_speedups.to_edge_for_partitioner) -> fuse
        (qlower.fuse + qlower.delegation) -> lower (VulkanPartitioner inside
        qlower.lower_speedups.vulkan_patterns_once, to_executorch)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULT_MODEL = os.path.join(ROOT, "examples", "llama.py")
CONFIGS = {
    # dim, layers, heads, ffn, vocab, seq
    "small": dict(dim=512, n_layers=4, n_heads=8, ffn=1536, vocab=8192, seq=64),
    "large": dict(dim=1024, n_layers=8, n_heads=16, ffn=2816, vocab=32000, seq=64),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, ffn=5632, vocab=32000, seq=64),
    "tiny": dict(dim=128, n_layers=2, n_heads=4, ffn=256, vocab=256, seq=16),
}


# --------------------------------------------------------------------------
# the model: a Llama-style decoder (RMSNorm, SDPA is_causal, SwiGLU)


def llama_style(dim, n_layers, n_heads, ffn, vocab, seq):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
            self.w1 = nn.Linear(dim, ffn, bias=False)
            self.w3 = nn.Linear(dim, ffn, bias=False)
            self.w2 = nn.Linear(ffn, dim, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.attn_norm(x)
            q, k, v = (
                w(h).view(b, t, n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
            )
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.wo(a.transpose(1, 2).reshape(b, t, dim))
            h = self.mlp_norm(x)
            return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList(Block() for _ in range(n_layers))
            self.norm = RMSNorm(dim)
            self.out = nn.Linear(dim, vocab, bias=False)

        def forward(self, tokens):
            x = self.tok(tokens)
            for layer in self.layers:
                x = layer(x)
            return self.out(self.norm(x))

    torch.manual_seed(0)
    return Decoder().eval(), (torch.randint(0, vocab, (1, seq)),)


def load_model(args):
    if args.config:
        return llama_style(**CONFIGS[args.config])
    from qlower.loader import load_model as qlower_load

    loaded = qlower_load(args.model or DEFAULT_MODEL)
    return loaded.module.eval(), tuple(loaded.example_inputs)


# --------------------------------------------------------------------------
# one flow, in the child process


def quantize(model, group_size):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantize_(
        model,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
        ),
    )


def stock_flow(held, args, phase):
    import torch
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model, inputs = held.pop()
    if args.scheme == "qta8a_qga4w":
        phase("quantize", lambda: quantize(model, args.group_size))
    ep = phase("export", lambda: torch.export.export(model, inputs))
    lowered = phase(
        "to_edge+lower",
        lambda: to_edge_transform_and_lower(ep, partitioner=[VulkanPartitioner()]),
    )
    et = phase("to_executorch", lowered.to_executorch)
    return phase("serialize", lambda: et.buffer)


def qlower_flow(held, args, phase):
    """qlower's own pipeline stages (qlower.pipeline.STAGES) after loading."""
    from pathlib import Path

    from qlower import pipeline
    from qlower.config import make_options
    from qlower.loader import LoadedModel

    job = pipeline.ExportJob.of(Path("-"), None, make_options(scheme=args.scheme, group_size=args.group_size))
    model, inputs = held.pop()
    job.made.loaded = LoadedModel(model, inputs, None, Path("-"), "model")
    model = inputs = None
    for name, stage in pipeline.STAGES:
        if name not in ("load", "serialize") and pipeline.stage_wanted(job, name):
            phase(name, lambda stage=stage: stage(job))
    return phase("serialize", lambda: job.made.pte_bytes)


def child(args) -> None:
    import logging

    logging.disable(logging.INFO)  # the partitioner logs every op at INFO
    sys.path.insert(0, ROOT)
    from qlower.runtime_caps import summarize_pte

    held = [load_model(args)]  # the flow takes it, so the caller holds no reference
    phases: dict[str, float] = {}
    peak_after: dict[str, float] = {}  # peak RSS so far at the end of each phase: where the peak is

    def phase(name, fn):
        t = time.perf_counter()
        out = fn()
        phases[name] = round(time.perf_counter() - t, 3)
        peak_after[name] = _peak_rss_mb()
        return out

    flow = {"stock": stock_flow, "qlower": qlower_flow}[args.child]
    profiler = None
    if args.profile == args.child:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    peak_after["load"] = _peak_rss_mb()
    t0 = time.perf_counter()
    buf = flow(held, args, phase)
    wall = time.perf_counter() - t0
    peak = _peak_rss_mb()  # before the .pte is summarized below, which is not part of either flow
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    s = summarize_pte(buf)
    print(json.dumps({
        "flow": args.child,
        "wall_s": round(wall, 3),
        "phases_s": phases,
        # Peak RSS of this process (the parent's RUSAGE_CHILDREN would mix flows).
        "peak_rss_mb": peak,
        "peak_rss_after_mb": peak_after,
        "partitions": s.partitions,
        "cpu_kernel_calls": s.cpu_kernel_calls,
        "cpu_kernels": s.cpu_kernels,
        "unsupported": sorted({p.message for p in s.problems}),
        "pte_bytes": len(buf),
    }))


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------
# the parent


def run_flow(flow: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", flow, *argv]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"flow": flow, "error": proc.stderr.strip().splitlines()[-1:]}
    if "--profile" in argv:
        sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model file (module-level model + example_inputs)")
    ap.add_argument("--config", choices=sorted(CONFIGS),
                    help="a built-in Llama-style decoder instead of a model file")
    ap.add_argument("--scheme", choices=["qta8a_qga4w", "fp32"], default="qta8a_qga4w")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--flows", default="stock,qlower")
    ap.add_argument("--profile", choices=["stock", "qlower"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    argv = [a for a in sys.argv[1:] if a != "--json"]
    results = {f: run_flow(f, argv) for f in args.flows.split(",")}
    ratios = {}
    if all("wall_s" in r for r in results.values()) and {"stock", "qlower"} <= set(results):
        s, q = results["stock"], results["qlower"]
        ratios = {
            "wall_time": round(s["wall_s"] / q["wall_s"], 2),
            "peak_rss": round(s["peak_rss_mb"] / q["peak_rss_mb"], 2),
            "pte_size": round(s["pte_bytes"] / q["pte_bytes"], 3),
        }
    model = f"llama_style[{args.config}]" if args.config else (args.model or "examples/llama.py")
    if args.json:
        print(json.dumps({"model": model, "scheme": args.scheme, "flows": results, "ratios": ratios}))
        return 0
    print(f"model {model}  scheme {args.scheme}  group size {args.group_size}")
    head = f"{'flow':8} {'wall s':>8} {'RSS MB':>8} {'parts':>6} {'CPU ops':>8} {'unsupp':>7} {'pte KB':>9}"
    print(head)
    for name, r in results.items():
        if "error" in r:
            print(f"{name:8} failed: {r['error']}")
            continue
        print(
            f"{name:8} {r['wall_s']:8.2f} {r['peak_rss_mb']:8.0f} {r['partitions']:6d} "
            f"{r['cpu_kernel_calls']:8d} {len(r['unsupported']):7d} {r['pte_bytes'] / 1024:9.0f}"
        )
    for name, r in results.items():
        if "error" not in r:
            print(f"  {name} phases: {r['phases_s']}")
            print(f"  {name} peak RSS MB after each phase: {r['peak_rss_after_mb']}")
            for u in r["unsupported"]:
                print(f"  {name} will abort at load: {u}")
            if r["cpu_kernels"]:
                print(f"  {name} CPU kernels: {r['cpu_kernels']}")
    if ratios:
        print(
            f"stock/qlower: wall time {ratios['wall_time']}x, peak RSS {ratios['peak_rss']}x, "
            f".pte size {ratios['pte_size']}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
