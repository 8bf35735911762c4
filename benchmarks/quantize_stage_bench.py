"""Export's load and quantize stages on a Llama-shaped Hugging Face folder: time, peak host memory, peak GPU
memory, and a hash of every quantized tensor (two runs with the same hash made the same bits).

It calls the functions ``qlower export`` runs (``llm.load.load_any`` with streaming, then
``quantize.quantize_model``); nothing is lowered. For the int4 schemes these stages need torch,
transformers and torchao (whose quantize/dequantize ops run the quantized layers), not ExecuTorch, so this
runs on a GPU host without ExecuTorch:

    python3 benchmarks/quantize_stage_bench.py --shape 1b --dir /tmp/b1 --gptq-device cuda --json out.json
    python3 benchmarks/quantize_stage_bench.py --shape 1b --layers 2 --dir /tmp/b2 --gptq-device cpu

The folder (random bf16 weights, written shard by shard) and the calibration windows (random token ids)
are made in ``--dir`` when missing, the folder by a child process. Peak host memory is the measuring
process's high-water mark (VmHWM) over both stages, imports included, as ``/usr/bin/time`` would report it
for an export of an existing folder; quantized weights go to files as they do in export (``weight_store``).
``--breakdown`` also samples where that memory goes (``host_memory.py``): at each stage's peak, resident
memory by mapping, malloc's in-use bytes and the largest CPU tensors Python holds (its scans of Python's
objects slow the stages). A run stopped by SIGTERM (``timeout``) still writes its JSON: the layers done,
the peak so far and ``"stopped"``, and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import platform
import signal
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from llm_bench import SHAPES, random_calibration, write_checkpoints  # noqa: E402


def state_hash(module: torch.nn.Module) -> tuple[str, dict[str, str]]:
    """sha256 over every tensor of the quantized model (parameters, buffers and the quantized layers' own),
    and one per top-level block, so that two runs can be told apart where they first differ."""
    whole, parts = hashlib.sha256(), {}
    for name, t in sorted(_tensors(module).items()):
        data = memoryview(t.detach().cpu().contiguous().view(torch.uint8).numpy()) if t.numel() else b""
        block = parts.setdefault(_block_of(name), hashlib.sha256())
        for digest in (whole, block):  # the name's bytes then the tensor's, read in place
            digest.update(name.encode())
            digest.update(data)
    return whole.hexdigest(), {k: h.hexdigest()[:16] for k, h in parts.items()}


def _block_of(name: str) -> str:
    """The top-level part a tensor belongs to: a numbered block (``lm.model.layers.3``) or the name's first
    three parts (``lm.lm_head.weight``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:3])


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    found = dict(module.state_dict(keep_vars=True))
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                found.setdefault(f"{prefix}.{attr}" if prefix else attr, value)
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


class Stopped(Exception):
    """SIGTERM arrived (``timeout`` ran out): the run ends with what it has measured."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, help="decoder blocks instead of the shape's own")
    ap.add_argument("--dir", type=Path, required=True, help="where the folder and calibration live (made when missing)")
    ap.add_argument("--weight-algorithm", default="gptq")
    ap.add_argument("--gptq-device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--breakdown", action="store_true",
                    help="sample where host memory goes (benchmarks/host_memory.py): at each block's peak, RSS by mapping, "
                         "malloc's in-use bytes and the largest CPU tensors; the JSON gets a 'host_memory' entry")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(SHAPES[args.shape], **({"n_layers": args.layers} if args.layers else {}))
    args.dir.mkdir(parents=True, exist_ok=True)
    folder = args.dir / "hf"
    t0 = time.perf_counter()
    if not (folder / "config.json").is_file():
        # In a process of its own: making the random weights must not count towards the measured peak, nor
        # leave its freed buffers in this process's heap.
        writer = multiprocessing.get_context("spawn").Process(target=write_checkpoints, args=(shape, args.dir),
                                                              kwargs=dict(zero=False, meta=False))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            sys.exit(f"writing the folder failed (exit code {writer.exitcode})")
        print(f"folder written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    calibration = args.dir / f"calibration_{args.calibration_tokens}.pt"
    if not calibration.is_file():
        calibration = random_calibration(args.dir, shape["vocab"], args.calibration_tokens)

    from qlower.config import ExportOptions
    from qlower.llm.load import load_any
    from qlower.memory import return_freed_memory
    from qlower.quantize import quantize_model
    from qlower.weight_store import WeightStore

    # kv_cache=False: the load stage's check of the KV-cache decoder runs ExecuTorch's custom ops; the
    # layers quantized (and how) are the same either way.
    options = ExportOptions(scheme="qta8a_qga4w", group_size=args.group_size, quantize_embeddings=True, kv_cache=False,
                            weight_algorithm=args.weight_algorithm, calibration=str(calibration), gptq_device=args.gptq_device)
    sampler = None
    if args.breakdown:
        from host_memory import StageSampler, mallinfo_mb, status_mb

        baseline = {"before_stages": dict(status_mb(), malloc_mb=mallinfo_mb())}
        if args.weight_algorithm in ("gptq", "auto") and args.gptq_device != "cpu" and torch.cuda.is_available():
            torch.zeros(1, device="cuda")  # what CUDA's context itself holds, before any work
            baseline["after_cuda_init"] = dict(status_mb(), malloc_mb=mallinfo_mb())
        sampler = StageSampler().start()
    start = time.perf_counter()
    layer_times: list[tuple[str, float]] = []

    def on_layer(progress) -> None:
        layer_times.append((progress.layer, round(time.perf_counter() - start, 1)))
        print(f"  {progress.layer}: {layer_times[-1][1]} s, peak RSS so far {hwm_mb():.0f} MB", file=sys.stderr)
        if sampler is not None:  # stages named by the last layer done (the LM head's passes come after the last block)
            sampler.stage(f"after {_block_of(progress.layer)}")

    return_freed_memory()  # as export does before its stages
    store = WeightStore(args.dir, "bench.pte")  # quantized weights go to files as export's do
    cuda = torch.cuda.is_available()
    result = {
        "shape": args.shape, "blocks": shape["n_layers"], "weight_algorithm": args.weight_algorithm,
        "gptq_device": args.gptq_device, "group_size": args.group_size, "calibration_tokens": args.calibration_tokens,
        "host": f"{platform.node()}, {torch.get_num_threads()} torch threads",
        "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
    }
    module = plans = None
    signal.signal(signal.SIGTERM, _stop)
    try:
        loaded, _, _ = load_any(folder, options, stream=True, warn=lambda m: print("warning:", m, file=sys.stderr))
        result["load_s"] = round(time.perf_counter() - start, 1)
        module, plans = quantize_model(loaded, options, lambda m: print("warning:", m, file=sys.stderr), on_layer=on_layer, store=store)
        result["load_and_quantize_s"] = round(time.perf_counter() - start, 1)
    except Stopped as stop:
        result["stopped"] = f"{stop} after {time.perf_counter() - start:.1f} s, after {layer_times[-1][0] if layer_times else 'no layer'}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        result["peak_host_rss_mb"] = round(hwm_mb())
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
        result["layers_done_at_s"] = layer_times
        if sampler is not None:
            result["host_memory"] = dict(baseline=baseline, **sampler.stop())
        if module is not None:
            result["algorithms"] = sorted({p.algorithm for p in plans if p.quantized})
            result["state_sha256"], result["block_sha256"] = state_hash(module)
        store.close()
    print(json.dumps({k: v for k, v in result.items() if k not in ("layers_done_at_s", "block_sha256", "host_memory")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if "stopped" in result:
        print(f"error: stopped ({result['stopped']}); the JSON has what was measured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
