"""Perplexity of int4 weight algorithms on a trained Hugging Face folder (eager, as export quantizes).

    python3 benchmarks/weight_quality.py FOLDER [--heldout heldout.txt] [--calibration calibration.txt]
        [--groups 32,64,128] [--algorithms rtn,hqq,gptq,auto] [--windows 16] [--window 256] [--json out.json]

Non-overlapping windows of ``--window`` tokens from the start of the held-out text, each run from
position 0; the float model and each algorithm's quantize_model output (the function export calls).
Reports mean perplexity (exp of the mean token NLL over all windows), the spread of the per-window
perplexity ratio to float, and the share of RTN's gap to float each algorithm closes.
GPTQ variants: ``gptq:act_order=0+scales=absmax+damp=0.01`` (weight_quant.GptqSettings fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def windows(folder: Path, text_file: Path, count: int, length: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).encode(text_file.read_text(), add_special_tokens=False)
    available = len(ids) // length
    out = [torch.tensor([ids[i * length:(i + 1) * length]]) for i in range(available if count <= 0 else min(count, available))]
    if len(out) < count:
        print(f"note: only {len(out)} windows of {length} tokens in {text_file}", file=sys.stderr)
    return out


def window_nll(model, batches) -> list[float]:
    """Mean next-token NLL of each window."""
    out = []
    with torch.no_grad():
        for ids in batches:
            logits = model(ids)
            logits = logits.logits if hasattr(logits, "logits") else logits
            out.append(float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])))
    return out


def parse_algorithm(spec: str):
    from qlower import weight_quant

    name, _, rest = spec.partition(":")
    settings = weight_quant.GptqSettings()
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        kind = type(getattr(settings, key))
        settings = dataclasses.replace(settings, **{key: bool(int(value)) if kind is bool else kind(value)})
    return name, settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--heldout", type=Path)
    parser.add_argument("--calibration", type=Path)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--groups", default="32,64,128")
    parser.add_argument("--algorithms", default="rtn,hqq,gptq")
    parser.add_argument("--scheme", default="qta8a_qga4w")
    parser.add_argument("--windows", type=int, default=16, help="0: every whole window of the text")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from qlower import weight_quant
    from qlower.config import make_options
    from qlower.llm.load import load_any
    from qlower.quantize import quantize_model

    heldout = args.heldout or args.folder / "heldout.txt"
    calibration = args.calibration or args.folder / "calibration.txt"
    batches = windows(args.folder, heldout, args.windows, args.window)
    base = make_options(scheme="fp32", kv_cache=False)
    float_model = load_any(args.folder, base)[0].module
    float_nll = window_nll(float_model, batches)
    del float_model
    results = {"folder": str(args.folder), "windows": len(batches), "window": args.window,
               "float": math.exp(statistics.mean(float_nll)), "rows": []}
    print(f"float ppl {results['float']:.4f} over {len(batches)} windows of {args.window}", flush=True)
    for group in (int(g) for g in args.groups.split(",")):
        rtn_ppl, rtn_nll = None, None
        for spec in args.algorithms.split(","):
            name, settings = parse_algorithm(spec)
            weight_quant.DEFAULT_GPTQ = settings
            calibrated = name in ("gptq", "auto")
            options = make_options(scheme=args.scheme, group_size=group, kv_cache=False, weight_algorithm=name,
                                   calibration_text=str(calibration) if calibrated else None,
                                   calibration_tokens=args.calibration_tokens)
            loaded = load_any(args.folder, options, stream=True)[0]
            start = time.perf_counter()
            model, plans = quantize_model(loaded, options, lambda m: print("warning:", m, file=sys.stderr))
            seconds = time.perf_counter() - start
            nll = window_nll(model, batches)
            ppl = math.exp(statistics.mean(nll))
            ratios = [math.exp(q - f) for q, f in zip(nll, float_nll)]
            rtn_ppl, rtn_nll = (ppl, nll) if name == "rtn" else (rtn_ppl, rtn_nll)
            closed = (rtn_ppl - ppl) / (rtn_ppl - results["float"]) if rtn_ppl and rtn_ppl != results["float"] else None
            # against RTN on the same windows: mean log ratio and its standard error over windows
            diff = [q - r for q, r in zip(nll, rtn_nll)] if rtn_nll else []
            se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else None
            picks = {}
            for plan in plans:
                if plan.quantized and plan.algorithm:
                    picks[plan.algorithm] = picks.get(plan.algorithm, 0) + 1
            row = {"group_size": group, "algorithm": spec, "ppl": ppl, "ratio_mean": statistics.mean(ratios),
                   "ratio_stdev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                   "gap_closed": closed, "vs_rtn_pct": 100 * (math.exp(statistics.mean(diff)) - 1) if diff else None,
                   "vs_rtn_se_pct": None if se is None else 100 * se, "layers": picks, "quantize_s": seconds}
            results["rows"].append(row)
            paired = "" if se is None or name == "rtn" else f"  vs rtn {row['vs_rtn_pct']:+.2f}% ± {row['vs_rtn_se_pct']:.2f}"
            print(f"g{group:<4} {spec:<40} ppl {ppl:.4f}  ratio {row['ratio_mean']:.4f}±{row['ratio_stdev']:.4f}  "
                  f"gap closed {'' if closed is None else f'{closed:+.0%}'}{paired}  {seconds:.1f}s  {picks}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
