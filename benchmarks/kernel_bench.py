"""Kernel-level benchmark of qlower's Vulkan kernels on synthetic LLM shapes.

    python benchmarks/kernel_bench.py [--device NAME] [--json out.json] [--quick]

Reports the compute-shader copy bandwidth, then for each shape and kernel
variant the median single-call time, the back-to-back time, GB/s, GOP/s and
the fraction of the copy bandwidth. Weights rotate through copies larger than
the L2 cache. The target for the int4 GEMV (M = 1) is >= 0.80 of the copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np

from qlower.bench import (
    bench_linear_qta8a_qga4w, bench_q8ta_linear, copy_bandwidth, random_qga4w,
)
from qlower.shaders import load_manifest
from qlower.vk import LinearQta8aQga4w, Q8taLinear, choose_qparams_per_token, open_device

GEMV_TARGET = 0.80


def check_gemv(layer, packed_w, sums, scales, gs, k):
    """Spot check of one GEMV against an exact integer reference on the host."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, k)).astype(np.float32)
    s, z = choose_qparams_per_token(x)
    y = layer(x, s, z)
    q = np.clip(np.round(x * (np.float32(1) / s)[:, None]) + z[:, None], -128, 127).astype(np.int64)
    lo = (packed_w & 15).astype(np.int64) - 8
    hi = (packed_w >> 4).astype(np.int64) - 8
    w = np.empty((packed_w.shape[0], packed_w.shape[1] * 2), np.int64)
    w[:, 0::2], w[:, 1::2] = lo, hi
    w = w[:, :k]
    n, g = w.shape[0], k // gs
    acc = np.einsum("gk,ngk->ng", q[0].reshape(g, gs), w.reshape(n, g, gs)) - z[0] * sums[:, :n].T
    ref = (acc * scales[:, :n].T.astype(np.float64)).sum(1) * s[0]
    err = float(np.abs(y[0] - ref).max() / np.abs(ref).max())
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="small shapes (lavapipe smoke run)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--passes", type=int, default=2,
                    help="time every GEMV variant this many times (spread shows run-to-run noise)")
    args = ap.parse_args(argv)

    dev = open_device(args.device)
    names = load_manifest()["shaders"]
    gemv_variants = sorted(n for n in names if n.startswith("linear_qta8a_qga4w_gemv") and n.endswith("fp32"))
    gemm_variants = sorted(n for n in names if n.startswith("linear_qta8a_qga4w_gemm") and n.endswith("fp32"))
    gs = args.group_size
    if args.quick:
        gemv_shapes, gemm_shapes, q8_shapes, rot, reps = [(256, 256)], [(16, 256, 256)], [(1, 256, 256), (16, 256, 256)], 1 << 20, 3
    else:
        gemv_shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
        gemm_shapes = [(128, 4096, 4096), (512, 4096, 4096), (512, 4096, 14336)]
        q8_shapes = [(1, 4096, 4096), (128, 4096, 4096)]
        rot, reps = 160 << 20, 20
    doc = {"device": dev.name, "group_size": gs, "results": []}
    copy_gbps = copy_bandwidth(dev, nbytes=(16 << 20) if args.quick else (256 << 20))
    doc["copy_gbps"] = copy_gbps
    print(f"device: {dev.name}\ncopy (shader, read+write): {copy_gbps:.1f} GB/s", file=sys.stderr)

    def report(t, tag=""):
        d = asdict(t)
        d.update(tag=tag)
        doc["results"].append(d)
        print(f"{t.op:20s} M={t.m:<4d} K={t.k:<6d} N={t.n:<6d} {t.variant:42s} "
              f"{t.time_us:9.1f} us  stream {t.stream_us:9.1f} us  {t.gbps:8.1f} GB/s  "
              f"{t.gops / 1000:7.2f} TOP/s  {t.fraction:5.2f} of copy  x{t.copies}", file=sys.stderr)

    for k, n in gemv_shapes:
        packed, sums, scales = random_qga4w(n, k, gs)
        layer = LinearQta8aQga4w(dev, packed, sums, scales, gs, k=k)
        doc.setdefault("gemv_check_rel_err", {})[f"{k}x{n}"] = check_gemv(layer, packed, sums, scales, gs, k)
        for _ in range(args.passes):
            for v in gemv_variants:
                report(bench_linear_qta8a_qga4w(dev, layer, 1, copy_gbps=copy_gbps, variant=v,
                                                repeats=reps, rotate_bytes=rot), "gemv")
            report(bench_linear_qta8a_qga4w(dev, layer, 1, copy_gbps=copy_gbps,
                                            variant="linear_qta8a_qga4w_gemv_buffer_fp16",
                                            dtype="fp16", repeats=reps, rotate_bytes=rot), "gemv")
        del layer
    for m, k, n in gemm_shapes:
        packed, sums, scales = random_qga4w(n, k, gs)
        layer = LinearQta8aQga4w(dev, packed, sums, scales, gs, k=k)
        for v in gemm_variants:
            report(bench_linear_qta8a_qga4w(dev, layer, m, copy_gbps=copy_gbps, variant=v,
                                            repeats=max(3, reps // 4), stream=5, rotate_bytes=0), "gemm")
    for m, k, n in q8_shapes:
        rng = np.random.default_rng(0)
        w = rng.integers(-127, 128, (n, k), dtype=np.int8)
        layer = Q8taLinear(dev, w, w.astype(np.int32).sum(1), np.full(n, 0.01, np.float32),
                           0.05, 0, 0.1, 0, None, "relu")
        report(bench_q8ta_linear(dev, layer, m, copy_gbps=copy_gbps, repeats=reps,
                                 rotate_bytes=rot if m == 1 else 0), "q8ta")

    best = {}
    for r in doc["results"]:
        if r["tag"] == "gemv":
            key = f"{r['k']}x{r['n']}"
            if key not in best or r["fraction"] > best[key]["fraction"]:
                best[key] = r
    doc["gemv_best"] = {k: {"variant": v["variant"], "gbps": v["gbps"], "fraction": v["fraction"],
                            "meets_target": v["fraction"] >= GEMV_TARGET} for k, v in best.items()}
    # Per shape and variant: min / max fraction over passes.
    spread = {}
    for r in doc["results"]:
        if r["tag"] == "gemv":
            spread.setdefault(f"{r['k']}x{r['n']} {r['variant']}", []).append(round(r["fraction"], 3))
    doc["gemv_fraction_by_pass"] = spread
    for key, fr in spread.items():
        print(f"{key:70s} fractions over passes: {fr}", file=sys.stderr)
    text = json.dumps(doc, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
