"""Latency of .pte files on ExecuTorch's runtime (``executor_runner``), side by side, same run.

Runs each file's ``forward`` with ExecuTorch's stock ``executor_runner`` (built with the Vulkan
backend and logging on) ``--iterations`` times in one process, drops the first ``--warmup``
iterations (pipeline creation, caches) and reports the median of the rest; files are run in
turn for ``--rounds`` rounds so drift hits all alike. Ratios are against the first file. No
torch needed: it runs where the runtime and the GPU are.

    python benchmarks/runtime_latency.py --runner executor_runner resnet_stock.pte resnet_qlower.pte
    python benchmarks/vision_bench.py --keep out/ && python benchmarks/runtime_latency.py --runner R out/*_stock.pte out/*_qlower.pte
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ITERATION = re.compile(r"Iteration (\d+) of \d+: ([0-9.]+) ms")


def iterations(runner: str, pte: Path, n: int) -> list[float]:
    proc = subprocess.run([runner, "--model_path", str(pte), "--num_executions", str(n), "--print_output", "none"],
                          capture_output=True, text=True)
    times = [float(m.group(2)) for m in ITERATION.finditer(proc.stdout + proc.stderr)]
    if proc.returncode != 0 or len(times) != n:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{pte}: runner failed (exit {proc.returncode}): {tail[0]}"
                         + ("" if times else " (no per-iteration times: build executor_runner with logging on)"))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--runner", required=True, help="executor_runner built with the Vulkan backend")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    samples: dict[Path, list[float]] = {f: [] for f in args.files}
    for _ in range(args.rounds):
        for f in args.files:
            samples[f] += iterations(args.runner, f, args.iterations)[args.warmup:]
    rows = [{"file": str(f), "median_ms": statistics.median(t), "min_ms": min(t), "samples": len(t)} for f, t in samples.items()]
    for r in rows:
        r["speedup_vs_first"] = rows[0]["median_ms"] / r["median_ms"]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'file':<40}{'median ms':>11}{'min ms':>9}{'vs first':>10}")
        for r in rows:
            print(f"{Path(r['file']).name:<40}{r['median_ms']:>11.3f}{r['min_ms']:>9.3f}{r['speedup_vs_first']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
