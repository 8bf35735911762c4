"""Decode and prefill speed of KV-cache .pte files on ExecuTorch's Vulkan runtime, side by side, same run.

Steps each file with ``llm_step_runner`` (tools/llm_step_runner: ExecuTorch's Module API, fed as its
LLM runner feeds a model: the prompt in one call, then one token a call) and reports the median
decode time per token, tokens/s and the prefill time, then the ratios against the first file. No
torch needed: it runs where the runtime runs (a phone, a GPU machine).

    python benchmarks/llm_decode_bench.py --runner llm_step_runner export_llama.pte qlower.pte
    python benchmarks/llm_decode_bench.py --runner ./llm_step_runner --prompt-len 512 --steps 64 a.pte b.pte --json

Files are run in turn, ``--rounds`` times each (interleaved, so drift hits both alike); each run
first repeats the whole sequence ``--warmup`` times (shader compilation, caches), then is timed.

``--vkprof DIR`` also breaks a decode step down, for each file, with ``benchmarks/vkprof`` (a measuring
stand-in for the Vulkan loader, built into DIR as ``libvulkan.so.1``; ``--real-loader`` names the real one):
one run without GPU timestamps gives the CPU side (host time between steps, command-buffer encoding,
submission, waiting on the GPU), how many steps of 100 re-encode, and dispatches and barriers per token;
a second run with a timestamp after every dispatch gives the GPU's time per dispatch, summed per kernel.

    python benchmarks/llm_decode_bench.py --runner ./llm_step_runner --vkprof /tmp/vkprof \
        --real-loader /usr/lib/x86_64-linux-gnu/libvulkan.so.1 export_llama.pte qlower.pte --json

``--llama-bench PATH --gguf MODEL.gguf`` also runs llama.cpp's ``llama-bench`` on the same GPU in the same
run (``-p PROMPT_LEN -n STEPS -d PROMPT_LEN``: decode after a context as long as the prompt, as the files
are stepped; ``-dev Vulkan0`` so it fails rather than fall back to the CPU) and reports its tokens/s and
prefill time beside the files, with its ratios against the first file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(runner: str, pte: Path, prompt_len: int, steps: int, warmup: int, vocab_hint: int = 100,
             env: dict | None = None) -> dict:
    prompt = ",".join(str(1 + (i * 7919) % vocab_hint) for i in range(prompt_len))
    cmd = [runner, "--model", str(pte), "--prompt", prompt, "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{pte}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}")
    return json.loads(proc.stdout)


# What a kernel is, read from the names its shader gives its tensors (benchmarks/vkprof records them).
KERNEL_KINDS = (
    # qlower's op library (qlower/shaders/runtime/)
    ("t_x t_w t_scales", "linear int4"),
    ("t_y t_res", "linear epilogue"),
    ("t_out t_in t_weight", "rms norm"),
    ("t_in t_out t_weight", "rms norm"),
    ("t_kcache", "attention decode (split-K)"),
    ("t_part t_out", "attention decode combine"),
    ("t_out t_part", "attention decode combine"),
    ("t_dst t_src", "prepack"),
    # ExecuTorch's
    ("t_packed_int4_weight", "linear int4"),
    ("t_packed_int8_weight", "linear int8"),
    ("t_qmat2", "linear"),
    ("t_weight_scales", "linear"),
    ("t_xqout", "rotary embedding"),
    ("t_projected", "kv-cache write"),
    ("t_attn_weights_softmax", "attention softmax"),
    ("t_q t_k", "attention q·k"),
    ("t_attn_weights t_v", "attention ·v"),
    ("t_fp_input", "linear int4"),
    ("t_scales t_zps", "choose qparams"),
    ("t_indices", "embedding"),
    ("t_in t_weight t_out", "rms norm"),
    ("t_other", "binary elementwise"),
    ("t_in t_out", "unary / copy / view"),
    ("t_out t_in", "unary / copy / view"),
    ("t_outp t_inp", "unary / copy / view"),
)


def kernel_kind(tensors: str) -> str:
    tensors = " ".join(t.removesuffix("Buffer") for t in tensors.split())   # buffer variants name t_inBuffer
    for key, kind in KERNEL_KINDS:
        if key in tensors:
            return kind
    return "other"


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def profile_once(runner: str, pte: Path, prompt_len: int, steps: int, vkprof: Path, real_loader: str,
                 timestamps: bool) -> dict:
    """One run of ``pte`` under the vkprof loader; the decode steps of the timed run, summarised."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vkprof.json"
        env = dict(os.environ, VKPROF_REAL_LOADER=real_loader, VKPROF_TIMESTAMPS="1" if timestamps else "0",
                   VKPROF_SAMPLE_HZ="0" if timestamps else "4000",
                   VKPROF_OUT=str(out), LD_LIBRARY_PATH=f"{vkprof}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        timing = run_once(runner, pte, prompt_len, steps, 1, env=env)
        prof = json.loads(out.read_text())
    decode = prof["steps"][-steps:]       # the timed run's decode calls (its prefill comes just before them)
    pipelines = prof["pipelines"]
    n = len(decode)
    result = {
        "decode_ms_median": _median(timing["decode_ms"]),
        "dispatches_per_token": _median([s["dispatches"] for s in decode]),
        "barriers_per_token": _median([s["barriers"] for s in decode]),
        "submits_per_token": _median([s["submits"] for s in decode]),
        "reencodes_per_100_tokens": 100.0 * sum(s["reencoded"] for s in decode) / n,
        "host_us_median": _median([s["host_gap_us"] for s in decode]),
        "encode_us_mean": sum(s["encode_us"] for s in decode) / n,
        "encode_us_when_reencoding": _median([s["encode_us"] for s in decode if s["reencoded"]]),
        "submit_us_median": _median([s["submit_us"] for s in decode]),
        "wait_us_median": _median([s["wait_us"] for s in decode]),
        "per_step": {"decode_ms": timing["decode_ms"],
                     **{k: [round(s[k], 1) for s in decode]
                        for k in ("host_gap_us", "encode_us", "submit_us", "wait_us", "reencoded", "gpu_span_us")}},
    }
    if prof.get("samples"):
        # CPU samples of the whole run (load included), by what the program was doing and where
        by: dict[str, dict[str, int]] = {}
        for phase, lib, sym, block, count in prof["samples"]:
            where = f"{lib}:{sym}" if sym else (f"{lib}+{block * 64}K" if lib.startswith("libc") else lib)
            by.setdefault(phase, {})
            by[phase][where] = by[phase].get(where, 0) + count
        result["cpu_samples"] = {ph: dict(sorted(v.items(), key=lambda kv: -kv[1])[:12]) for ph, v in by.items()}
    if timestamps:
        result["gpu_span_us_median"] = _median([s["gpu_span_us"] for s in decode])
        per_kernel: dict[str, dict] = {}
        per_kind: dict[str, dict] = {}
        gaps = []
        for s in decode:
            for pipeline, gx, gy, gz, us in s["dispatch"]:
                p = pipelines[pipeline] if 0 <= pipeline < len(pipelines) else {"tensors": "?", "hash": "?"}
                key = f"{kernel_kind(p['tensors'])} [{p['hash'][:8]}]"   # grids vary with the position
                k = per_kernel.setdefault(key, {"kind": kernel_kind(p["tensors"]), "tensors": p["tensors"],
                                                "calls_per_token": 0, "us_per_token": 0.0, "samples": [],
                                                "grids": set()})
                k["grids"].add(f"{gx}x{gy}x{gz}")
                k["calls_per_token"] += 1 / n
                k["us_per_token"] += us / n
                k["samples"].append(us)
                kind = per_kind.setdefault(kernel_kind(p["tensors"]), {"calls_per_token": 0, "us_per_token": 0.0})
                kind["calls_per_token"] += 1 / n
                kind["us_per_token"] += us / n
                gaps.append(us)
        for k in per_kernel.values():
            k["us_median"] = _median(k.pop("samples"))
            k["grids"] = sorted(k["grids"])[:8]
        result["gpu_us_per_dispatch_median"] = _median(gaps)
        result["gpu_by_kind"] = dict(sorted(per_kind.items(), key=lambda kv: -kv[1]["us_per_token"]))
        result["gpu_us_per_token"] = sum(k["us_per_token"] for k in per_kernel.values())
        result["gpu_by_kernel"] = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]["us_per_token"]))
    return result


def llama_bench(path: str, gguf: Path, prompt_len: int, steps: int, rounds: int, device: str = "Vulkan0") -> dict:
    """llama.cpp's ``llama-bench``: prefill of ``prompt_len`` tokens and ``steps`` decode steps after a context of
    ``prompt_len`` (its ``-d``), ``rounds`` repetitions, as {decode_ms_median, tokens_per_s, prefill_ms_median}."""
    cmd = [path, "-m", str(gguf), "-ngl", "99", "-dev", device, "-p", str(prompt_len), "-n", str(steps),
           "-d", str(prompt_len), "-r", str(rounds), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}")
    rows = json.loads(proc.stdout)
    gen = next(r for r in rows if r.get("n_gen", 0) > 0)
    pre = next(r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
    return {"file": f"llama.cpp {gguf.name}", "decode_ms_median": 1000.0 / gen["avg_ts"], "tokens_per_s": gen["avg_ts"],
            "prefill_ms_median": 1000.0 * pre["n_prompt"] / pre["avg_ts"], "prompt_len": pre["n_prompt"],
            "decode_calls": gen["n_gen"] * rounds, "device": gen.get("gpu_info") or gen.get("backends"),
            "command": " ".join(cmd)}


def bytes_per_token(pte: Path, position: int) -> dict | None:
    """Bytes a decode step reads, from the file (needs qlower): every constant an op other than the token
    embedding reads (once per reading op: each prepacks its own copy), one embedding row, and the K and V
    caches up to ``position`` (the runtime's SDPA reads positions up to the next multiple of 4)."""
    try:
        from qlower.errors import PteError
        from qlower.inspect import inspect_pte
    except ImportError:
        return None
    try:
        report = inspect_pte(pte)
    except PteError:
        return None
    weights = cache = embedding_row = 0
    for v in report["vulkan"]:
        for c in v["constants"]:
            for user in c.get("users", []):  # "<short op name>#<node>.<argument>"; qlower's ops keep "qlower."
                op_name, _, arg = user.rpartition(".")
                short = op_name.split("#")[0]
                if short.startswith("embedding"):
                    rows = (c.get("shape") or [1])[0] or 1
                    embedding_row += c["bytes"] // rows
                elif "sdpa" in short and "cache" in arg:
                    max_len = (c.get("shape") or [0, 1])[1] or 1
                    cache += c["bytes"] * min(1.0, (-(-(position + 1) // 4) * 4) / max_len)
                else:
                    weights += c["bytes"]
    return {"position": position, "weights": weights, "kv_cache": int(cache), "embedding_row": embedding_row,
            "total": weights + int(cache) + embedding_row}


def print_breakdown(name: str, b: dict) -> None:
    c, g = b["cpu"], b["gpu"]
    print(f"\n{name}: a decode step, {c['decode_ms_median']:.2f} ms (median; profiled run)")
    if b.get("bytes_per_token"):
        read = b["bytes_per_token"]
        print(f"  bytes read per token at position {read['position']}: {read['total'] / 1e6:.1f} MB "
              f"(weights and scales {read['weights'] / 1e6:.1f}, K/V cache {read['kv_cache'] / 1e6:.1f})")
    print(f"  dispatches/token {c['dispatches_per_token']:.0f}, barriers/token {c['barriers_per_token']:.0f}, "
          f"submits/token {c['submits_per_token']:.0f}, re-encodes per 100 tokens {c['reencodes_per_100_tokens']:.0f}")
    print(f"  CPU: host between steps {c['host_us_median']:.0f} us, encoding {c['encode_us_mean']:.0f} us/token "
          f"({c['encode_us_when_reencoding']:.0f} us when it re-encodes), submit {c['submit_us_median']:.0f} us, "
          f"waiting on the GPU {c['wait_us_median']:.0f} us")
    print(f"  GPU (timestamps on): span {g['gpu_span_us_median']:.0f} us, dispatches {g['gpu_us_per_token']:.0f} us, "
          f"{g['gpu_us_per_dispatch_median']:.1f} us per dispatch (median)")
    for kind, v in g["gpu_by_kind"].items():
        print(f"    {kind:<24}{v['calls_per_token']:>7.0f} calls {v['us_per_token']:>9.0f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="KV-cache .pte files; ratios are against the first")
    parser.add_argument("--runner", required=True, help="path to llm_step_runner")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vkprof", type=Path, help="folder holding benchmarks/vkprof built as libvulkan.so.1: "
                        "also break a decode step down (CPU and GPU) for each file")
    parser.add_argument("--real-loader", default="/usr/lib/x86_64-linux-gnu/libvulkan.so.1",
                        help="the real Vulkan loader, for --vkprof")
    parser.add_argument("--profile-steps", type=int, default=100, help="decode steps of a --vkprof run")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench: run it on --gguf in the same run")
    parser.add_argument("--gguf", type=Path, help="the GGUF model for --llama-bench")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if bool(args.llama_bench) != bool(args.gguf):
        parser.error("--llama-bench and --gguf go together")
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
    if args.llama_bench:
        results.append(llama_bench(args.llama_bench, args.gguf, args.prompt_len, args.steps, args.rounds))
    base = results[0]
    for r in results:
        r["decode_speedup"] = base["decode_ms_median"] / r["decode_ms_median"]
        r["prefill_speedup"] = base["prefill_ms_median"] / r["prefill_ms_median"]
    if args.vkprof:
        for r in results:
            if "command" in r:  # llama.cpp: not an ExecuTorch file
                continue
            f = Path(r["file"])
            r["breakdown"] = {
                "cpu": profile_once(args.runner, f, args.prompt_len, args.profile_steps, args.vkprof,
                                    args.real_loader, timestamps=False),
                "gpu": profile_once(args.runner, f, args.prompt_len, args.profile_steps, args.vkprof,
                                    args.real_loader, timestamps=True),
            }
            read = bytes_per_token(f, args.prompt_len + args.profile_steps // 2)   # where qlower is installed
            if read is not None:
                r["breakdown"]["bytes_per_token"] = read
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'file':<40}{'decode ms':>11}{'tok/s':>9}{'prefill ms':>12}{'decode x':>10}{'prefill x':>11}")
        for r in results:
            print(f"{Path(r['file']).name:<40}{r['decode_ms_median']:>11.2f}{r['tokens_per_s']:>9.1f}"
                  f"{r['prefill_ms_median']:>12.1f}{r['decode_speedup']:>10.2f}{r['prefill_speedup']:>11.2f}")
        for r in results:
            if "breakdown" in r:
                print_breakdown(Path(r["file"]).name, r["breakdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
