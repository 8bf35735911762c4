"""What quantization costs on real text: perplexity per scheme × group size × weight algorithm.

For a Hugging Face folder of a model with learned weights (the shipped ones are in examples/trained/),
exports one KV-cache file per row with qlower and measures it with ``qlower eval`` on held-out text:
the float model, the model quantized as export quantizes it, and the file itself (the golden executor,
or the real runtime with ``--runner``), plus export time and file size. Rows run one after another in
this process's machine; every number of a table comes from the same run.

    python benchmarks/quality_bench.py examples/trained/py-llama
    python benchmarks/quality_bench.py examples/trained/* /other/folder --group-sizes 128 --windows 16 --tokens 128 --skip-quantized
    python benchmarks/quality_bench.py examples/trained/py-llama --group-sizes 32,128 --algorithms rtn,hqq,gptq \\
        --runner /path/to/llm_step_runner --json benchmarks/results/quality_py_llama.json

The evaluation text defaults to ``heldout.txt`` in the folder and the calibration text (for
calibrated algorithms) to ``calibration.txt``: different files of the same source, never the same
passages. The table ends with, per scheme and group size, the share of round-to-nearest's
perplexity gap to float that each algorithm closes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALIBRATED = {"gptq", "auto"}


def qlower(*args: str) -> dict:
    """Run a qlower command with --json; its document (also when it reports a failure)."""
    cmd = [sys.executable, "-m", "qlower", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    if not doc.get("ok", False) and "error" in doc:
        raise SystemExit(f"{' '.join(cmd)}: {doc['error']}")
    return doc


def run_row(model: Path, scheme: str, group_size: int, algorithm: str, args, workdir: Path) -> dict:
    pte = workdir / f"{scheme}_g{group_size}_{algorithm}.pte"
    export_args = ["export", str(model), "-o", str(pte), "--scheme", scheme, "--group-size", str(group_size),
                   "--max-seq-len", str(max(args.tokens, 64))]
    if algorithm != "rtn":
        export_args += ["--weight-algorithm", algorithm]
    if algorithm in CALIBRATED:
        export_args += ["--calibration-text", str(args.calibration_text), "--calibration-tokens", str(args.calibration_tokens)]
    if args.quantize_embeddings:
        export_args.append("--quantize-embeddings")
    start = time.perf_counter()
    summary = qlower(*export_args)
    export_s = time.perf_counter() - start
    eval_args = ["eval", str(model), str(pte), "--text", str(args.text), "--windows", str(args.windows),
                 "--tokens", str(args.tokens), "--spread"]
    if args.skip_quantized:
        eval_args += ["--skip", "quantized"]
    if algorithm != "rtn":
        eval_args += ["--weight-algorithm", algorithm]
    if algorithm in CALIBRATED:
        eval_args += ["--calibration-text", str(args.calibration_text), "--calibration-tokens", str(args.calibration_tokens)]
    if args.runner:
        eval_args += ["--runner", args.runner]
    start = time.perf_counter()
    report = qlower(*eval_args)
    eval_s = time.perf_counter() - start
    ppl = report["perplexity"]
    row = {"model": model.name, "scheme": scheme, "group_size": group_size, "algorithm": algorithm,
           "ppl_float": ppl["float"], "ppl_quantized": ppl.get("quantized"), "ppl_file": ppl["file"],
           "file_on": "runtime" if args.runner else "golden",
           "delta_pct_quantized": report["delta_pct"].get("quantized"), "delta_pct_file": report["delta_pct"]["file"],
           "windows": report["windows"], "scored": report["scored"],
           "export_s": round(export_s, 1), "eval_s": round(eval_s, 1), "pte_bytes": pte.stat().st_size}
    for key in ("window_perplexity", "spread"):
        if key in report:
            row[key] = report[key]
    for part in ("float", "file"):  # per window: paired comparisons between rows (same windows)
        windows = (report.get("parts") or {}).get(part, {}).get("window_perplexity")
        if windows:
            row[f"window_{part}"] = windows
    pte.unlink()
    return row


def gap_closed(rows: list[dict]) -> list[dict]:
    """Per (scheme, group size): the share of RTN's perplexity gap to float each algorithm closes."""
    out = []
    for row in rows:
        rtn = next((r for r in rows if r["algorithm"] == "rtn" and r["scheme"] == row["scheme"]
                    and r["group_size"] == row["group_size"] and r.get("model") == row.get("model")), None)
        if rtn is None or row["algorithm"] == "rtn":
            continue
        for which in ("quantized", "file"):
            if rtn[f"ppl_{which}"] is None or row[f"ppl_{which}"] is None:
                continue
            gap = rtn[f"ppl_{which}"] - rtn["ppl_float"]
            if gap > 0:
                entry = {"model": row.get("model"), "scheme": row["scheme"], "group_size": row["group_size"], "algorithm": row["algorithm"],
                         "measured_on": which, "gap_closed_pct": round(100 * (rtn[f"ppl_{which}"] - row[f"ppl_{which}"]) / gap, 1)}
                entry.update(paired_vs_rtn(row, rtn, which))
                out.append(entry)
    return out


def paired_vs_rtn(row: dict, rtn: dict, which: str) -> dict:
    """The change of perplexity against RTN's on the same windows, with its standard error over windows
    (windows of equal length: the mean of the per-window log ratios is the log of the ratio)."""
    a, b = row.get(f"window_{which}"), rtn.get(f"window_{which}")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return {}
    d = [math.log(x / y) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return {"vs_rtn_pct": round(100 * (math.exp(mean) - 1), 2), "vs_rtn_se_pct": round(100 * se, 2)}


def render(rows: list[dict], closed: list[dict]) -> str:
    lines = ["| model | scheme | g | algorithm | float | quantized (eager) | file | Δ file vs float | export s | .pte KB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        quantized = "–" if r["ppl_quantized"] is None else f"{r['ppl_quantized']:.3f}"
        lines.append(f"| {r.get('model', '')} | {r['scheme']} | {r['group_size']} | {r['algorithm']} | {r['ppl_float']:.3f} | {quantized} "
                     f"| {r['ppl_file']:.3f} ({r['file_on']}) | {r['delta_pct_file']:+.2f}% | {r['export_s']:.1f} "
                     f"| {r['pte_bytes'] / 1024:.0f} |")
    if closed:
        lines += ["", "| model | scheme | g | algorithm | RTN gap closed (eager) | RTN gap closed (file) | file vs RTN (± s.e. over windows) |",
                  "|---|---|---|---|---|---|---|"]
        keys = sorted({(c.get("model") or "", c["scheme"], c["group_size"], c["algorithm"]) for c in closed})
        for key in keys:
            mine = [c for c in closed if (c.get("model") or "", c["scheme"], c["group_size"], c["algorithm"]) == key]
            vals = {c["measured_on"]: c["gap_closed_pct"] for c in mine}
            paired = next((f"{c['vs_rtn_pct']:+.2f}% ± {c['vs_rtn_se_pct']:.2f}" for c in mine
                           if c["measured_on"] == "file" and "vs_rtn_pct" in c), "–")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {vals.get('quantized', '–')}% | {vals.get('file', '–')}% | {paired} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help="Hugging Face folders with a tokenizer (each measured in turn)")
    ap.add_argument("--schemes", default="qta8a_qga4w")
    ap.add_argument("--group-sizes", default="32,64,128")
    ap.add_argument("--algorithms", default="rtn,hqq,gptq,auto")
    ap.add_argument("--text", type=Path, help="evaluation text [default: MODEL/heldout.txt]")
    ap.add_argument("--calibration-text", type=Path, help="[default: MODEL/calibration.txt]")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--skip-quantized", action="store_true", help="score the float model and the file only (the file is the quantized model, measured)")
    ap.add_argument("--quantize-embeddings", action="store_true")
    ap.add_argument("--runner", help="llm_step_runner: the file's perplexity on the real runtime")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    text, calibration_text = args.text, args.calibration_text
    rows = []
    with tempfile.TemporaryDirectory(prefix="quality_bench") as tmp:
        for model in args.models:
            args.text = text or model / "heldout.txt"
            args.calibration_text = calibration_text or model / "calibration.txt"
            for scheme in args.schemes.split(","):
                for g in map(int, args.group_sizes.split(",")):
                    for algorithm in args.algorithms.split(","):
                        row = run_row(model, scheme, g, algorithm, args, Path(tmp))
                        rows.append(row)
                        print(f"{model.name} {scheme} g{g} {algorithm}: float {row['ppl_float']:.3f} quantized {row['ppl_quantized']} "
                              f"file {row['ppl_file']:.3f} ({row['export_s']}s export, {row['eval_s']}s eval)", file=sys.stderr, flush=True)
                        if args.json:  # written as rows come: a long run keeps what it measured
                            write_json(args, rows)
    closed = gap_closed(rows)
    print(render(rows, closed))
    if args.json:
        write_json(args, rows)
    return 0


def write_json(args, rows: list[dict]) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"models": [str(m) for m in args.models], "windows": args.windows, "tokens": args.tokens,
                                     "calibration_tokens": args.calibration_tokens, "spread": True,
                                     "file_on": "runtime" if args.runner else "golden",
                                     "rows": rows, "gap_closed": gap_closed(rows)}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
