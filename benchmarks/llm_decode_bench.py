"""Decode and prefill speed of KV-cache .pte files on ExecuTorch's Vulkan runtime, side by side, same run.

Steps each file with ``llm_step_runner`` (tools/llm_step_runner: ExecuTorch's Module API, fed as its
LLM runner feeds a model: the prompt in one call, then one token a call) and reports the median
decode time per token, tokens/s and the prefill time, then the ratios against the first file. No
torch needed: it runs where the runtime runs (a phone, a GPU machine).

    python benchmarks/llm_decode_bench.py --runner llm_step_runner export_llama.pte qlower.pte
    python benchmarks/llm_decode_bench.py --runner ./llm_step_runner --prompt-len 512 --steps 64 a.pte b.pte --json

Files are run in turn, ``--rounds`` times each (interleaved, so drift hits both alike); each run
first repeats the whole sequence ``--warmup`` times (shader compilation, caches), then is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_once(runner: str, pte: Path, prompt_len: int, steps: int, warmup: int, vocab_hint: int = 100) -> dict:
    prompt = ",".join(str(1 + (i * 7919) % vocab_hint) for i in range(prompt_len))
    cmd = [runner, "--model", str(pte), "--prompt", prompt, "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{pte}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="KV-cache .pte files; ratios are against the first")
    parser.add_argument("--runner", required=True, help="path to llm_step_runner")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {str(f): [] for f in args.files}
    for _ in range(args.rounds):
        for f in args.files:
            runs[str(f)].append(run_once(args.runner, f, args.prompt_len, args.steps, args.warmup))
    results = []
    for f in args.files:
        decode = [ms for r in runs[str(f)] for ms in r["decode_ms"]]
        prefill = [r["prefill_ms"] for r in runs[str(f)]]
        med = statistics.median(decode)
        results.append({"file": str(f), "decode_ms_median": med, "tokens_per_s": 1000.0 / med,
                        "prefill_ms_median": statistics.median(prefill), "prompt_len": args.prompt_len,
                        "decode_calls": len(decode)})
    base = results[0]
    for r in results:
        r["decode_speedup"] = base["decode_ms_median"] / r["decode_ms_median"]
        r["prefill_speedup"] = base["prefill_ms_median"] / r["prefill_ms_median"]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'file':<40}{'decode ms':>11}{'tok/s':>9}{'prefill ms':>12}{'decode x':>10}{'prefill x':>11}")
        for r in results:
            print(f"{Path(r['file']).name:<40}{r['decode_ms_median']:>11.2f}{r['tokens_per_s']:>9.1f}"
                  f"{r['prefill_ms_median']:>12.1f}{r['decode_speedup']:>10.2f}{r['prefill_speedup']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
