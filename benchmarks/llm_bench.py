"""KV-cache LLM export: qlower vs ExecuTorch's own exporter (export_llama), same weights, same run.

Writes one random bf16 checkpoint of a Llama-3-style decoder in both formats
(a Hugging Face folder, sharded safetensors, for qlower; Meta's params.json +
consolidated .pth for export_llama), then exports it with both:

    qlower export FOLDER --max-seq-len S --group-size G --quantize-embeddings
    python -m executorch.examples.models.llama.export_llama -p params.json -c ckpt.pth \\
        --vulkan -kv --use_sdpa_with_kv_cache -qmode 8da4w -G G -E 4,32 --max_seq_length S ...

and reports wall time, peak RSS (each flow in its own process), .pte size,
Vulkan partitions and CPU kernel calls (read with qlower inspect), as ratios.

    python benchmarks/llm_bench.py                      # Llama-3.2-1B shape, max_seq_len 2048 (~10 min, ~9 GB RAM)
    python benchmarks/llm_bench.py --shape small        # 4 layers, dim 512: a minute
    python benchmarks/llm_bench.py --shape 8b --skip-stock --keep DIR   # Llama-3-8B shape: 16 GB folder written shard by shard
    python benchmarks/llm_bench.py --shape 8b           # export_llama too, under a 14 GB cap (--stock-mem-cap-gb)
    python benchmarks/llm_bench.py --zero-weights       # all-zero weights: files that compress for carrying

``--keep DIR`` keeps the checkpoints and both .pte files (for the runtime
decode benchmark, benchmarks/llm_decode_bench.py), and reuses checkpoints
already there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.2-1B: dim 2048, 16 layers, 32/8 heads, FFN 8192, vocab 128256, tied embeddings.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab=128256, tied=True,
               rope_theta=500000.0, max_positions=131072),
    # Llama-3-8B: dim 4096, 32 layers, 32/8 heads, FFN 14336, vocab 128256, untied (16 GB in bf16).
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab=128256, tied=False,
               rope_theta=500000.0, max_positions=8192),
    "small": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=1536, vocab=8192, tied=True,
                  rope_theta=500000.0, max_positions=4096),
}
SHARD_BYTES = 1 << 30  # safetensors shard size of the written folder


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows → Hugging Face's rotate-half order (as transformers' converter permutes)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def tensors(shape: dict, zero: bool, seed: int = 0):
    """(meta name, hf name, tensor) one at a time, bf16, N(0, 0.02) like an HF init."""
    gen = torch.Generator().manual_seed(seed)
    dim, hd = shape["dim"], shape["dim"] // shape["n_heads"]

    def rand(*size):
        t = torch.zeros(size, dtype=torch.bfloat16) if zero else (torch.randn(size, generator=gen) * 0.02).to(torch.bfloat16)
        return t

    yield "tok_embeddings.weight", "model.embed_tokens.weight", rand(shape["vocab"], dim)
    for i in range(shape["n_layers"]):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        wq, wk = rand(dim, dim), rand(shape["n_kv_heads"] * hd, dim)
        yield p + "attention.wq.weight", (q + "self_attn.q_proj.weight", meta_to_hf_rope(wq, shape["n_heads"])), wq
        yield p + "attention.wk.weight", (q + "self_attn.k_proj.weight", meta_to_hf_rope(wk, shape["n_kv_heads"])), wk
        yield p + "attention.wv.weight", q + "self_attn.v_proj.weight", rand(shape["n_kv_heads"] * hd, dim)
        yield p + "attention.wo.weight", q + "self_attn.o_proj.weight", rand(dim, dim)
        yield p + "feed_forward.w1.weight", q + "mlp.gate_proj.weight", rand(shape["hidden_dim"], dim)
        yield p + "feed_forward.w3.weight", q + "mlp.up_proj.weight", rand(shape["hidden_dim"], dim)
        yield p + "feed_forward.w2.weight", q + "mlp.down_proj.weight", rand(dim, shape["hidden_dim"])
        yield p + "attention_norm.weight", q + "input_layernorm.weight", torch.ones(dim, dtype=torch.bfloat16)
        yield p + "ffn_norm.weight", q + "post_attention_layernorm.weight", torch.ones(dim, dtype=torch.bfloat16)
    yield "norm.weight", "model.norm.weight", torch.ones(dim, dtype=torch.bfloat16)
    if not shape["tied"]:
        yield "output.weight", "lm_head.weight", rand(shape["vocab"], dim)


def write_checkpoints(shape: dict, directory: Path, zero: bool, meta: bool = True) -> tuple[Path, Path, Path | None]:
    """(HF folder, params.json, .pth): the same weights in both formats, the folder written shard by shard.

    ``meta=False``: no .pth (torch.save needs the whole state dict in memory: 16 GB for the 8B shape);
    export_llama then runs with uninitialised weights, which costs it the same memory."""
    from safetensors.torch import save_file

    folder = directory / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    meta_state, shard, shard_bytes, index = {}, {}, 0, {}
    shards = 0  # written so far; each shard is dropped once written (an 8B folder is 16 GB)

    def flush():
        nonlocal shard, shard_bytes, shards
        if shard:
            shards += 1
            name = f"model-{shards:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for meta_name, hf, t in tensors(shape, zero):
        hf_name, hf_t = hf if isinstance(hf, tuple) else (hf, t)
        if meta:
            meta_state[meta_name] = t
        shard[hf_name] = hf_t.contiguous()
        shard_bytes += hf_t.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    if meta and shape["tied"]:
        meta_state["output.weight"] = meta_state["tok_embeddings.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["dim"],
        "intermediate_size": shape["hidden_dim"], "num_hidden_layers": shape["n_layers"],
        "num_attention_heads": shape["n_heads"], "num_key_value_heads": shape["n_kv_heads"],
        "vocab_size": shape["vocab"], "max_position_embeddings": shape["max_positions"], "rms_norm_eps": 1e-5,
        "rope_theta": shape["rope_theta"], "tie_word_embeddings": shape["tied"], "bos_token_id": 128000,
        "eos_token_id": [128001, 128009], "torch_dtype": "bfloat16", "hidden_act": "silu",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    params = directory / "params.json"
    params.write_text(json.dumps({
        "dim": shape["dim"], "n_layers": shape["n_layers"], "n_heads": shape["n_heads"], "n_kv_heads": shape["n_kv_heads"],
        "vocab_size": shape["vocab"], "hidden_dim": shape["hidden_dim"], "norm_eps": 1e-5, "rope_theta": shape["rope_theta"],
        "use_scaled_rope": False,
    }))
    if not meta:
        return folder, params, None
    ckpt = directory / "consolidated.pth"
    torch.save(meta_state, ckpt)
    return folder, params, ckpt


def random_calibration(directory: Path, vocab: int, tokens: int, window: int = 512) -> Path:
    """GPTQ's calibration batches for a random-weight model: windows of random token ids (torch.save'd)."""
    path = directory / f"calibration_{tokens}.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save([(torch.randint(0, vocab, (1, window), generator=gen),) for _ in range(max(1, tokens // window))], path)
    return path


def timed(cmd: list[str], log: Path, cwd: Path | None = None, check: bool = True) -> dict:
    """Run ``cmd``; wall seconds and peak RSS (GNU time), stderr to ``log``, stdout to ``log``.out.

    qlower's own summary (``--json``) reports its peak RSS per stage; it resets the kernel's
    high-water mark between stages, which also resets what GNU time sees, so for qlower the
    summary's ``peak_rss_mb`` (the maximum over all stages) is the number to read.
    """
    start = time.perf_counter()
    stdout = log.with_suffix(".out")
    with open(log, "w") as f, open(stdout, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-f", "QLOWER_MAXRSS_KB %M", *cmd], stdout=out, stderr=f, cwd=cwd)
    seconds = time.perf_counter() - start
    text = log.read_text()
    rss = [int(line.split()[1]) for line in text.splitlines() if line.startswith("QLOWER_MAXRSS_KB")]
    result = {"seconds": seconds, "peak_rss_mb": rss[-1] / 1024 if rss else None, "exit": proc.returncode}
    try:
        summary = json.loads(stdout.read_text())
    except ValueError:
        summary = None
    if isinstance(summary, dict) and "peak_rss_mb" in summary:
        result.update(peak_rss_mb=summary["peak_rss_mb"], stage_peak_rss_mb=summary["stage_peak_rss_mb"],
                      stage_seconds=summary.get("timings_s"))
    if proc.returncode != 0 and check:
        tail = "\n".join(text.splitlines()[-15:])
        raise SystemExit(f"{cmd[0]} … failed (exit {proc.returncode}); log {log}:\n{tail}")
    if proc.returncode != 0:
        result["log_tail"] = text.splitlines()[-3:]
    return result


def pte_facts(path: Path) -> dict:
    from qlower.inspect import inspect_pte

    report = inspect_pte(path)
    s = report["summary"]
    return {"bytes": path.stat().st_size, "partitions": s["vulkan_partitions"], "cpu_op_calls": s["cpu_op_calls"],
            "fused_ops": s["fused_ops"], "runtime_problems": len(report["runtime_problems"] or []),
            "vk_ops": sum(v["op_count"] if "op_count" in v else len(v["ops"]) for v in report["vulkan"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--zero-weights", action="store_true", help="all-zero weights (same timing, files compress)")
    parser.add_argument("--skip-stock", action="store_true", help="only qlower")
    parser.add_argument("--keep", type=Path, help="keep checkpoints and .pte files in this folder")
    parser.add_argument("--stock-mem-cap-gb", type=float, help="run export_llama under this address-space cap (prlimit --as): "
                        "a flow that needs more fails there instead of taking the machine down [default: 14 for 8b]")
    parser.add_argument("--layers", type=int, help="decoder blocks instead of the shape's own (per-block costs of a wide shape, quickly)")
    parser.add_argument("--weight-algorithms", default="rtn",
                        help="qlower exports one file per int4 weight algorithm, comma-separated (rtn, hqq, gptq); "
                             "gptq calibrates on --calibration-tokens random token ids")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    shape = dict(SHAPES[args.shape], **({"n_layers": args.layers} if args.layers else {}))
    big = args.shape == "8b"
    cap = args.stock_mem_cap_gb if args.stock_mem_cap_gb is not None else (14 if big else None)
    directory = args.keep or Path(tempfile.mkdtemp(prefix="qlower_llm_bench_"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        folder, params, ckpt = directory / "hf", directory / "params.json", directory / "consolidated.pth"
        if big:
            ckpt = None
        if not (args.keep and (folder / "config.json").is_file() and (ckpt is None or ckpt.is_file())):
            folder, params, ckpt = write_checkpoints(shape, directory, args.zero_weights, meta=not big)
            print(f"checkpoints written in {time.perf_counter() - t0:.0f} s: {folder}, {ckpt}", file=sys.stderr)
        results = {"shape": args.shape, **shape, "max_seq_len": args.max_seq_len, "group_size": args.group_size}
        for algorithm in args.weight_algorithms.split(","):
            key = "qlower" if algorithm == "rtn" else f"qlower_{algorithm}"
            q_pte = directory / f"{key}.pte"
            extra = ["--weight-algorithm", algorithm] if algorithm != "rtn" else []
            if algorithm == "gptq":
                extra += ["--calibration", str(random_calibration(directory, shape["vocab"], args.calibration_tokens))]
            results[key] = timed([sys.executable, "-m", "qlower", "export", str(folder), "-o", str(q_pte),
                                  "--max-seq-len", str(args.max_seq_len), "--group-size", str(args.group_size),
                                  "--quantize-embeddings", *extra, "--json"], directory / f"{key}.log")
            results[key].update(pte_facts(q_pte))
            print(f"{key}: {results[key]}", file=sys.stderr)
        if not args.skip_stock:
            s_pte = directory / "export_llama.pte"
            s_pte.unlink(missing_ok=True)
            capped = ["prlimit", f"--as={int(cap * 2**30)}", "--"] if cap else []
            results["export_llama"] = timed([
                *capped, sys.executable, "-m", "executorch.examples.models.llama.export_llama", "-p", str(params),
                *(["-c", str(ckpt)] if ckpt else []),
                "--vulkan", "-kv", "--use_sdpa_with_kv_cache", "-qmode", "8da4w", "-G", str(args.group_size), "-E", "4,32",
                "--max_seq_length", str(args.max_seq_len), "--max_context_length", str(args.max_seq_len), "-d", "fp32",
                "--metadata", '{"get_bos_id": 128000, "get_eos_ids": [128001, 128009]}',
                "--output_name", s_pte.name], directory / "export_llama.log", cwd=directory, check=not cap)
            results["export_llama"]["mem_cap_gb"] = cap
            results["export_llama"]["weights"] = "checkpoint" if ckpt else "uninitialised (no .pth: see write_checkpoints)"
            if results["export_llama"]["exit"] != 0:
                print(f"export_llama: {results['export_llama']}", file=sys.stderr)
                _finish(results, args)
                return 0
            results["export_llama"].update(pte_facts(s_pte))
            q, s = results["qlower"], results["export_llama"]
            results["ratios"] = {
                "export_speedup": s["seconds"] / q["seconds"],
                "peak_rss": q["peak_rss_mb"] / s["peak_rss_mb"] if q["peak_rss_mb"] and s["peak_rss_mb"] else None,
                "pte_size": q["bytes"] / s["bytes"],
            }
        _finish(results, args)
    finally:
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _finish(results: dict, args) -> None:
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        _print(results)


def _print(r: dict) -> None:
    print(f"{r['shape']}: dim {r['dim']}, {r['n_layers']} layers, {r['n_heads']}/{r['n_kv_heads']} heads, FFN {r['hidden_dim']}, "
          f"vocab {r['vocab']}, max_seq_len {r['max_seq_len']}, g{r['group_size']} + 4-bit embeddings")
    print(f"{'flow':<14}{'time':>10}{'peak RSS':>12}{'.pte':>12}{'partitions':>12}{'CPU calls':>11}")
    for name in ("export_llama", *sorted(k for k in r if k.startswith("qlower"))):
        if name in r and r[name]["exit"] != 0:
            x = r[name]
            print(f"{name:<14}{x['seconds']:>9.1f}s  failed (exit {x['exit']}) under a {x.get('mem_cap_gb')} GB cap: "
                  + " / ".join(x.get("log_tail", [])))
        elif name in r:
            x = r[name]
            print(f"{name:<14}{x['seconds']:>9.1f}s{x['peak_rss_mb']:>10.0f}MB{x['bytes'] / 2**20:>10.1f}MB"
                  f"{x['partitions']:>12}{x['cpu_op_calls']:>11}")
            if x.get("stage_peak_rss_mb"):
                print("    peak RSS per stage (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in x["stage_peak_rss_mb"].items()))
                print("    seconds per stage:       " + ", ".join(f"{k} {v:.0f}" for k, v in x["stage_seconds"].items()))
    if "ratios" in r:
        ra = r["ratios"]
        print(f"qlower vs export_llama: {ra['export_speedup']:.2f}x faster, peak RSS {ra['peak_rss']:.2f}x, .pte {ra['pte_size']:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
