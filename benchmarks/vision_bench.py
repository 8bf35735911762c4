"""Static int8 CNNs: qlower against the stock ExecuTorch flow, same models, same run.

    python benchmarks/vision_bench.py                         # the bundled vision models
    python benchmarks/vision_bench.py --model examples/resnet.py --repeat 3 --json

For each model, each flow runs in its own subprocess (fresh imports and
caches), from the loaded float model and its calibration batches to the .pte
bytes; reported: wall time (median of --repeat runs), .pte size, Vulkan
partitions, CPU kernel calls, fused-op histogram, predicted load problems, and
the golden executor's SQNR vs the float model on the example inputs. Ratios
are stock / qlower (size, time: > 1 means qlower is smaller / faster).

stock:  XNNPACKQuantizer (per-channel symmetric, static) -> prepare_pt2e ->
        calibrate -> convert_pt2e -> torch.export -> to_edge_transform_and_lower
        (VulkanPartitioner) -> to_executorch
qlower: qlower.export(model, scheme="q8ta_q8csw") (configs/vision.toml), load
        stage included, as a user runs it.
GPU latency on ExecuTorch's runtime: ``--keep DIR`` writes the files, then
``benchmarks/runtime_latency.py`` times them with an ``executor_runner`` built
with Vulkan, where the GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = [os.path.join(ROOT, "examples", name) for name in ("resnet.py", "mobilenet_v2.py", "segnet.py")]


def stock_flow(path: str) -> tuple[bytes, float]:
    import torch
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from qlower.loader import load_model

    loaded = load_model(path)
    start = time.perf_counter()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    gm = prepare_pt2e(torch.export.export(loaded.module, loaded.example_inputs).module(), quantizer)
    for batch in loaded.calibration_inputs:
        gm(*batch)
    ep = torch.export.export(convert_pt2e(gm), loaded.example_inputs)
    buffer = to_edge_transform_and_lower(ep, partitioner=[VulkanPartitioner()]).to_executorch().buffer
    return bytes(buffer), time.perf_counter() - start


def qlower_flow(path: str) -> tuple[bytes, float]:
    import tempfile

    import qlower

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pte")
        start = time.perf_counter()
        qlower.export(path, out, config=os.path.join(ROOT, "configs", "vision.toml"))
        seconds = time.perf_counter() - start
        with open(out, "rb") as f:
            return f.read(), seconds


def child(flow: str, path: str, keep: str | None = None) -> None:
    sys.path.insert(0, ROOT)
    from qlower.console import import_heavy_libraries

    import_heavy_libraries()
    import torch

    from qlower.golden import GoldenExecutor
    from qlower.loader import load_model
    from qlower.pte import fused_op_histogram, read_pte
    from qlower.runtime_caps import summarize_pte
    from qlower.metrics import sqnr_db

    data, seconds = (stock_flow if flow == "stock" else qlower_flow)(path)
    if keep:
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, f"{os.path.splitext(os.path.basename(path))[0]}_{flow}.pte"), "wb") as f:
            f.write(data)
    summary = summarize_pte(data)
    loaded = load_model(path)
    with torch.no_grad():
        want = loaded.module(*loaded.example_inputs)
    got = GoldenExecutor(read_pte(data)).run(tuple(loaded.example_inputs))[0]
    print(json.dumps({
        "seconds": seconds,
        "size": len(data),
        "partitions": summary.partitions,
        "cpu_kernel_calls": summary.cpu_kernel_calls,
        "load_problems": len(summary.problems),
        "fused_ops": fused_op_histogram(read_pte(data)),
        "sqnr_vs_float_db": round(sqnr_db(want.float(), got.float()), 2),
    }))


def run(flow: str, path: str, keep: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", flow, "--model", path] + (["--keep", keep] if keep else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{flow} flow failed on {path}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="a model file with calibration_inputs (default: both bundled vision models)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per flow; the median time is reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", help="write each flow's .pte here as <model>_<flow>.pte (for benchmarks/runtime_latency.py)")
    ap.add_argument("--child", choices=["stock", "qlower"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model[0], args.keep)
        return 0
    results = {}
    for path in args.model or MODELS:
        row = {}
        for flow in ("stock", "qlower"):
            runs = [run(flow, path, args.keep) for _ in range(args.repeat)]
            row[flow] = dict(runs[-1], seconds=round(statistics.median(r["seconds"] for r in runs), 2))
        row["ratios"] = {
            "size": round(row["stock"]["size"] / row["qlower"]["size"], 3),
            "export_time": round(row["stock"]["seconds"] / row["qlower"]["seconds"], 2),
        }
        results[os.path.relpath(path, ROOT)] = row
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'model':<26} {'flow':<7} {'size':>9} {'time s':>7} {'parts':>5} {'cpu':>4} {'SQNR dB':>8}  fused ops")
    for model, row in results.items():
        for flow in ("stock", "qlower"):
            r = row[flow]
            ops = ", ".join(f"{k} ×{v}" for k, v in sorted(r["fused_ops"].items()))
            print(f"{model:<26} {flow:<7} {r['size']:>9} {r['seconds']:>7.2f} {r['partitions']:>5} {r['cpu_kernel_calls']:>4} "
                  f"{r['sqnr_vs_float_db']:>8.2f}  {ops}")
        print(f"{'':<26} stock/qlower: size ×{row['ratios']['size']}, export time ×{row['ratios']['export_time']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
