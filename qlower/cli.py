"""The command line: parse arguments, call the library, render the result.

Exit codes: 0 success, 1 a QlowerError (one ``error:`` line and a hint),
2 a usage error, 3 a quality bar the user set (--min-sqnr-float) missed by a
faithful file (qlower.metrics). ``QLOWER_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from typer._click import exceptions as click_exc

from . import console
from .config import GPTQ_DEVICES, SCHEMES, WEIGHT_ALGORITHMS
from .vkops import RUNTIMES
from .errors import QlowerError

class QlowerGroup(typer.core.TyperGroup):
    """Maps errors to exit codes in one place, for the console script and CliRunner alike."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        debug = os.environ.get("QLOWER_DEBUG") == "1"
        wants_json = "--json" in (sys.argv[1:] if args is None else args)
        _printed_json.clear()
        native = None  # what the libraries print on fd 2, hidden (console.native_output_hidden)
        try:
            with console.native_output_hidden() as native:
                # Without standalone mode, click returns a typer.Exit's code instead of raising it.
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            return code if isinstance(code, int) else 0
        except QlowerError as exc:
            if debug:
                raise
            return _report_error(_with_native_line(exc, native), exc.hint, exc.exit_code, wants_json)
        except click_exc.NoArgsIsHelpError:
            return 0
        except click_exc.UsageError as exc:
            if debug:
                raise
            command = exc.ctx.command_path if exc.ctx else "qlower"
            return _report_error(exc.format_message(), f"see '{command} --help'", 2, wants_json)
        except typer.Exit as exc:
            return exc.exit_code
        except typer.Abort:
            console.err.print("aborted")
            return 130
        except Exception as exc:  # a bug: its traceback follows, with the last line the C++ side printed
            line = native.last_line() if native is not None else None
            if line:
                exc.add_note(f"last native output: {line}")
            raise
        finally:
            if native is not None:
                native.close()


def _with_native_line(exc: QlowerError, native) -> str:
    """A failure of a library call (a QlowerError raised from another exception) with the last
    meaningful line the C++ side printed, which is often the only account of what went wrong."""
    cause = exc.__cause__
    line = native.last_line() if native is not None and cause is not None and not isinstance(cause, QlowerError) else None
    return f"{exc.message} [{line}]" if line and line not in exc.message else exc.message


app = typer.Typer(
    cls=QlowerGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize a PyTorch model into an ExecuTorch .pte for the Vulkan GPU delegate, and show and prove what was produced.",
)



@app.callback()
def _root() -> None:
    """Quantize a PyTorch model into an ExecuTorch .pte for the Vulkan GPU delegate, and show and prove what was produced."""


VERIFY_SAMPLES = 4  # example inputs + 3 random batches, as `qlower verify` does by default
JSON_OPTION = typer.Option(False, "--json", help="Print exactly one JSON document on stdout, no progress.")
ALL_LAYERS_OPTION = typer.Option(False, "--all-layers", help="One row per layer; by default layers that differ only by their index share a row (--json always lists every layer).")


def _weight_algorithm_option(default_help: str):
    return typer.Option(None, "--weight-algorithm", callback=lambda v: _check_choice(v, WEIGHT_ALGORITHMS),
                        help=f"How int4 weights are chosen: {', '.join(WEIGHT_ALGORITHMS)} (same stored format) {default_help}.")


CALIBRATION_TEXT_OPTION = typer.Option(None, "--calibration-text", help="gptq: text file to calibrate on, read with the Hugging Face folder's tokenizer.")
# The model a .pte was exported from, as verify, generate and eval take it.
SOURCE_MODEL_ARGUMENT = typer.Argument(..., help="The model file or Hugging Face folder the .pte was exported from.")
SOURCE_CONFIG_OPTION = typer.Option(None, "--config", help="The TOML preset the .pte was exported with (per-layer overrides).")
ENTRY_OPTION = typer.Option(None, "--entry", help="Name of the model (or factory) in the file, when it defines several.")
SOURCE_CHECKPOINT_OPTION = typer.Option(None, "--checkpoint", help="State dict the .pte was exported with.")
SOURCE_SEED_OPTION = typer.Option(0, "--seed", help="Seed for the model's initialization (as export's --seed).")
CALIBRATION_TOKENS_OPTION = typer.Option(None, "--calibration-tokens", min=1, help="gptq: tokens of the calibration text to use [default: 4096].")


def _check_choice(value: str | None, legal) -> str | None:
    if value is not None and value not in legal:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(legal)}")
    return value


_printed_json: list[bool] = []  # non-empty once this invocation wrote its JSON document


def print_json(document: dict[str, Any], ok: bool = True) -> None:
    """The command's one JSON document; every one has "ok" (false for errors, failed checks)."""
    document = {"ok": ok, **document}
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    _printed_json.append(True)


def _report_error(message: str, hint: str | None, exit_code: int, wants_json: bool) -> int:
    """The ``error:`` and ``hint:`` lines on stderr; with --json, also the one document on stdout."""
    console.err.print(f"[red]error:[/] {message}", markup=True)
    if hint:
        console.err.print(f"hint: {hint}", markup=False)
    if wants_json and not _printed_json:
        print_json({"error": message, "hint": hint, "exit_code": exit_code}, ok=False)
    return exit_code


class StageProgress:
    """Per-stage progress on stderr: a spinner on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.status = None
        self.last_block = None

    def __call__(self, name: str, seconds: float | None) -> None:
        if not self.enabled:
            return
        if seconds is None:
            if console.err.is_terminal:
                self.status = console.err.status(f"{name}…")
                self.status.start()
            return
        if self.status is not None:
            self.status.stop()
            self.status = None
        console.err.print(f"[green]✓[/] {name:<9} {seconds:6.2f} s")

    def layer(self, progress) -> None:
        """Streaming load + quantize: one line per decoder block (a status line on a terminal), with an ETA."""
        if not self.enabled:
            return
        block = _block(progress.layer)
        eta = progress.eta_s
        text = (f"  {block:<24} {progress.fraction:4.0%} of {progress.total_bytes / 2**30:.2f} GiB read"
                + (f", ETA {_duration(eta)}" if eta is not None and progress.fraction < 1 else ""))
        if self.status is not None:
            self.status.update(f"quantize… {text.strip()}")
        elif block != self.last_block:
            console.err.print(text, markup=False)
        self.last_block = block

    def count(self, name: str, done: int, total: int, unit: str = "tokens") -> None:
        """A part's progress in units: a bar with an ETA on a terminal, nothing otherwise; a ✓ line when done."""
        if not self.enabled or not console.err.is_terminal:
            return
        now = time.perf_counter()
        if done == 0 or self.status is None:
            self.started = now
            self.close()
            self.status = console.err.status(f"{name}…")
            self.status.start()
        elapsed = now - self.started
        if done >= total:
            self.close()
            self.status = None
            console.err.print(f"[green]✓[/] {name:<9} {elapsed:6.2f} s")
            return
        filled = int(BAR_WIDTH * done / total) if total else 0
        eta = elapsed * (total - done) / done if done else None
        self.status.update(f"{name} {'█' * filled}{'░' * (BAR_WIDTH - filled)} {done}/{total} {unit}"
                           + (f", ETA {_duration(eta)}" if eta is not None else ""))

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


BAR_WIDTH = 24  # characters of a progress bar


def _block(layer: str) -> str:
    """'model.layers.3.mlp.up_proj' → 'model.layers.3': progress per decoder block."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return layer


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qlower export examples/mlp.py -o mlp.pte\n\n"
        "  qlower export examples/llama.py --scheme qga4w --group-size 64 -o llama.pte --json\n\n"
        "  qlower export examples/llama.py --config configs/llm.toml -o llama.pte\n\n"
        "  qlower export ./my-hf-model --max-seq-len 1024 -o model.pte"
    )
)
def export(
    model: Path = typer.Argument(..., help="Python file that defines the model and its example inputs, or a Hugging Face model folder (save_pretrained)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the .pte (default: <model>.pte in the current directory)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", callback=lambda v: _check_choice(v, SCHEMES), help=f"Quantization scheme: {', '.join(SCHEMES)} [default: qta8a_qga4w]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", min=1, help="Weight group size for int4 schemes [default: 128]."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML preset (see configs/); flags override it."),
    entry: Optional[str] = ENTRY_OPTION,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="State dict to load: .safetensors, or .pt (loaded with weights_only)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="q8ta_q8csw: torch.save'd list of input tuples."),
    calibration_batches: Optional[int] = typer.Option(None, "--calibration-batches", min=1, help="q8ta_q8csw: random batches when no data is given."),
    quantize_embeddings: Optional[bool] = typer.Option(None, "--quantize-embeddings/--no-quantize-embeddings", help="Quantize nn.Embedding to int4 groups (et_vk.embedding_q4gsw)."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Fail when a layer cannot take the scheme instead of leaving it float."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the model's initialization and random calibration."),
    kv_cache: Optional[bool] = typer.Option(None, "--kv-cache/--no-kv-cache", help="Export the LLM decode method forward(tokens[1, T], input_pos[1]) -> logits[1, vocab] with a static KV cache [default: on for a Hugging Face folder]."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", min=2, help="--kv-cache: context length, prompt + generated [default: min(the model's max positions, 2048)]."),
    metadata: Optional[str] = typer.Option(None, "--metadata", help="--kv-cache: JSON object of runner metadata overriding the derived values, e.g. '{\"get_bos_id\": 1, \"get_eos_ids\": [2]}'."),
    weight_algorithm: Optional[str] = _weight_algorithm_option("[default: auto with --calibration-text, else rtn]"),
    calibration_text: Optional[Path] = CALIBRATION_TEXT_OPTION,
    calibration_tokens: Optional[int] = CALIBRATION_TOKENS_OPTION,
    runtime: Optional[str] = typer.Option(None, "--runtime", callback=lambda v: _check_choice(v, RUNTIMES), help="Which ExecuTorch Vulkan runtime the file is for: stock (any ET-VK runtime), or qlower (one linked with qlower's op library, runtime/: fewer, faster dispatches a decode step; a stock runtime refuses the file at load) [default: stock]."),
    dump_after: Optional[str] = typer.Option(None, "--dump-after", help="Print the graph (stderr) after this fusion pass: share_act_qparams, fuse_quantized_linear, merge_sibling_projections, merge_gate_up (--runtime qlower), fuse_quantized_embedding, fuse_q8ta_conv, fuse_q8ta_add, drop_unused_constants."),
    gptq_device: Optional[str] = typer.Option(None, "--gptq-device", callback=lambda v: _check_choice(v, GPTQ_DEVICES),
                                              help="Where gptq (and auto's gptq) runs: auto (a CUDA GPU when torch sees one), cpu, cuda; the same bits on each [default: auto]."),
    verify: bool = typer.Option(False, "--verify", help="Run the .pte's graph with the golden executor against the eager model before writing; write nothing if it does not compute what the quantized model computes."),
    min_sqnr_float: Optional[float] = typer.Option(None, "--min-sqnr-float", help="With --verify (implied): also write nothing (exit 3) when an output is below this SQNR (dB) vs the float model."),
    external_weights: bool = typer.Option(False, "--external-weights", help="Put the weights in <output stem>.ptd beside the .pte (ExecuTorch's named-data file; runners take it as --data_path)."),
    all_layers: bool = ALL_LAYERS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Quantize MODEL and write a Vulkan-delegated .pte, with a summary of what was fused."""
    console.import_heavy_libraries()
    from .api import export as run_export

    progress = StageProgress(enabled=not as_json)
    try:
        summary = run_export(
            model,
            output or Path(model.stem + ".pte"),
            config=config,
            entry=entry,
            checkpoint=checkpoint,
            on_stage=progress,
            on_layer=progress.layer,
            warn=console.warn,
            log=lambda text: console.err.print(text, markup=False, highlight=False),
            dump_after=dump_after,
            verify=VERIFY_SAMPLES if verify or min_sqnr_float is not None else 0,
            verify_min_sqnr_float=min_sqnr_float,
            external_weights=external_weights,
            scheme=scheme,
            group_size=group_size,
            calibration=str(calibration) if calibration else None,
            calibration_batches=calibration_batches,
            quantize_embeddings=quantize_embeddings,
            strict=strict,
            seed=seed,
            kv_cache=kv_cache,
            max_seq_len=max_seq_len,
            metadata=metadata,
            weight_algorithm=weight_algorithm,
            calibration_text=str(calibration_text) if calibration_text else None,
            calibration_tokens=calibration_tokens,
            runtime=runtime,
            gptq_device=gptq_device,
        )
    finally:
        progress.close()
    if as_json:
        print_json(summary)
    else:
        from .render import render_export

        render_export(summary, all_layers=all_layers)


def _parse_expectations(values: Optional[list[str]]) -> list:
    from .inspect import parse_expectation

    try:
        return [parse_expectation(v) for v in values or []]
    except QlowerError as exc:
        raise typer.BadParameter(f"{exc.message} ({exc.hint})") from None


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qlower inspect mlp.pte\n\n"
        "  qlower inspect mlp.pte --ops --constants\n\n"
        "  qlower inspect mlp.pte --expect 'fused.linear_dq8ca_q4gsw>=2' --expect 'partitions==1' --expect 'cpu_ops==0'\n\n"
        "Expectation keys: partitions, methods, size, gpu_memory, runtime_problems; "
        "delegates, fused, vk_ops, cpu_ops, each alone (a total) or with .<name> "
        "(fused.linear_q4gsw, cpu_ops.aten::mul.Scalar, delegates.XnnpackBackend)."
    )
)
def inspect(
    pte_path: Path = typer.Argument(..., metavar="FILE.pte", help="The .pte to read (any ExecuTorch program, not only qlower's)."),
    ops: bool = typer.Option(False, "--ops", help="Show each Vulkan graph's op chain with its arguments."),
    tensors: bool = typer.Option(False, "--tensors", help="Show every tensor: dtype[shape], storage/layout, memory object, users."),
    constants: bool = typer.Option(False, "--constants", help="Show the constants: size, tensor, where stored, users."),
    expect: Optional[list[str]] = typer.Option(None, "--expect", metavar="KEY OP N", callback=_parse_expectations, help="Fail (exit 1) unless KEY OP N holds, e.g. 'partitions==1'; OP is ==, !=, >=, <=, > or <. Repeatable."),
    all_layers: bool = typer.Option(False, "--all-layers", help="One row per fused node; by default nodes with equal parameters share a row (--json always lists every node)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show what is inside a .pte: execution plan, delegates, the Vulkan graph, fused nodes, CPU fallbacks, sizes."""
    from .et_modules import read_without_compiler

    read_without_compiler()  # no torchao or ExecuTorch compiler imports for reading a file
    from .inspect import inspect_pte
    from .render import render_expectations, render_inspect

    report = inspect_pte(pte_path, expect=expect or [])
    if as_json:
        print_json(report)
    else:
        render_inspect(report, ops=ops, tensors=tensors, constants=constants, all_layers=all_layers)
    render_expectations(report["expectations"])
    if not report["ok"]:
        raise typer.Exit(1)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qlower verify examples/mlp.py mlp.pte\n\n"
        "  qlower verify examples/llama.py llama.pte --samples 8 --layers --plot layers.png\n\n"
        "  qlower verify examples/mlp.py mlp.pte --inputs batch.pt --json"
    )
)
def verify(
    model: Path = typer.Argument(..., help="The Python model file the .pte was exported from."),
    pte: Path = typer.Argument(..., help="The .pte to verify."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="torch.save'd input tuple, or list of tuples (default: the example inputs, then random ones)."),
    samples: int = typer.Option(4, "--samples", min=1, help="Input batches: the example inputs, then random ones like them."),
    seed: int = typer.Option(0, "--seed", help="Seed for random inputs, the model's initialization and random calibration (as export's --seed)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", callback=lambda v: _check_choice(v, SCHEMES), help="Scheme the .pte was exported with [default: read from the .pte]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", min=1, help="Group size of int4 schemes [default: read from the .pte]."),
    config: Optional[Path] = SOURCE_CONFIG_OPTION,
    entry: Optional[str] = ENTRY_OPTION,
    checkpoint: Optional[Path] = SOURCE_CHECKPOINT_OPTION,
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="q8ta_q8csw: the calibration data the .pte was exported with."),
    weight_algorithm: Optional[str] = _weight_algorithm_option("[default: read from the .pte]"),
    calibration_text: Optional[Path] = CALIBRATION_TEXT_OPTION,
    calibration_tokens: Optional[int] = CALIBRATION_TOKENS_OPTION,
    min_sqnr_float: Optional[float] = typer.Option(None, "--min-sqnr-float", help="Fail (exit 3) when an output is below this SQNR (dB) vs the float model. Without it, the scheme's bar only warns: that is what quantization costs, not a defect of the file."),
    min_sqnr_quantized: Optional[float] = typer.Option(None, "--min-sqnr-quantized", help="Minimum SQNR (dB) of each output vs the quantized eager model [default: per scheme]."),
    min_sqnr_layer: Optional[float] = typer.Option(None, "--min-sqnr-layer", help="Minimum SQNR (dB) of each layer vs the quantized eager model [default: per scheme]."),
    layers: bool = typer.Option(False, "--layers", help="Show each fused layer's SQNR vs the same layer of the quantized eager model (repeated layers share a row: least and median SQNR)."),
    all_layers: bool = typer.Option(False, "--all-layers", help="With --layers (implied): one row per layer (--json always lists every layer)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the per-layer SQNR as a PNG bar chart."),
    sample: Optional[int] = typer.Option(None, "--sample", min=1, help="Check N fused int4 layers alone (spread over the model, first and last included), each against the same layer read from the checkpoint and quantized as export does: one layer in memory at a time, for big models (a Hugging Face folder or --checkpoint x.safetensors)."),
    device: Optional[str] = typer.Option(None, "--device", help="Also compute the fused layers with qlower's kernels on a Vulkan device ('vulkan', or a device index or name) and compare them with the golden executor."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the .pte's serialized graph on the CPU (golden executor) and compare it with the eager models; exit 1 when it does not compute what the quantized model computes."""
    console.import_heavy_libraries()
    from .metrics import check_findings, conclude
    from .verify import plot_layers, render_report, verify as run_verify

    report = run_verify(
        model, pte, scheme=scheme, group_size=group_size, config=config, entry=entry, checkpoint=checkpoint,
        calibration=str(calibration) if calibration else None, inputs=inputs, seed=seed, samples=samples,
        min_sqnr_float=min_sqnr_float, min_sqnr_quantized=min_sqnr_quantized, min_sqnr_layer=min_sqnr_layer,
        sample=sample, warn=console.warn, weight_algorithm=weight_algorithm, calibration_text=calibration_text,
        calibration_tokens=calibration_tokens,
    )
    if sample and (device is not None or plot is not None):
        raise typer.BadParameter("--sample checks layers alone: it cannot be combined with --device or --plot")
    if device is not None:
        from .vk.pte_layers import check_on_device, fused_calls

        checks = check_on_device(fused_calls(pte, seed=seed), _vk_device(device))
        report["device_layers"] = checks
        report["defects"] += [f"{c['op']} (delegate call {c['delegate_call']} op {c['op_index']}) on the device differs from the golden "
                              f"executor by {c['max_abs_diff']:.3g} (tolerance {c['tolerance']:.3g})" for c in checks if not c["passed"]]
        conclude(report)
    if plot is not None:
        plot_layers(report, plot)
    if as_json:
        print_json(report, ok=report["passed"])
    elif report.get("kind") == "decode":
        from .render import render_generate

        render_generate(report)
    elif report.get("kind") == "sample":
        from .verify import render_sample

        render_sample(report)
    else:
        render_report(report, show_layers=layers or all_layers, all_layers=all_layers)
        if device is not None:
            from .render import render_device_checks

            render_device_checks(report["device_layers"])
    check_findings(report, defect="verification failed", warn=console.warn, what="step" if report.get("kind") == "decode" else "output",
                   defect_hint="the .pte does not compute what the model does; re-export it, or see --layers for where it diverges")


def _parse_ids(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        ids = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of token ids, e.g. 1,2,3") from None
    if not ids or any(i < 0 for i in ids):
        raise typer.BadParameter("give at least one non-negative token id, e.g. 1,2,3")
    return ids


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qlower generate ./my-hf-model model.pte --prompt-ids 1,2,3\n\n"
        "  qlower generate ./my-hf-model model.pte --prompt 'Once upon a time' --bos --max-new-tokens 16\n\n"
        "  qlower generate examples/llama.py llama.pte --prompt-ids 5,6,7 --json"
    )
)
def generate(
    model: Path = SOURCE_MODEL_ARGUMENT,
    pte: Path = typer.Argument(..., metavar="FILE.pte", help="A .pte exported with --kv-cache."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", callback=_parse_ids, help="Prompt token ids, comma-separated."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (needs a tokenizer in the Hugging Face folder)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Tokens to generate (fewer if an end-of-sequence id comes first)."),
    bos: bool = typer.Option(False, "--bos", help="Prepend the file's get_bos_id to the prompt, as ExecuTorch's llama_main --num_bos 1 does."),
    config: Optional[Path] = SOURCE_CONFIG_OPTION,
    entry: Optional[str] = ENTRY_OPTION,
    checkpoint: Optional[Path] = SOURCE_CHECKPOINT_OPTION,
    seed: int = SOURCE_SEED_OPTION,
    weight_algorithm: Optional[str] = _weight_algorithm_option("[default: read from the .pte]"),
    calibration_text: Optional[Path] = CALIBRATION_TEXT_OPTION,
    calibration_tokens: Optional[int] = CALIBRATION_TOKENS_OPTION,
    min_sqnr_float: Optional[float] = typer.Option(None, "--min-sqnr-float", help="Fail (exit 3) when a step's logits are below this SQNR (dB) vs the float model. Without it, the scheme's bar only warns: that is what quantization costs, not a defect of the file."),
    min_sqnr_quantized: Optional[float] = typer.Option(None, "--min-sqnr-quantized", help="Minimum SQNR (dB) of each step's logits vs the quantized eager model [default: per scheme]."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Greedy decoding with the .pte (golden executor, KV cache kept across calls) beside the quantized eager and float models; exit 1 when it does not decode as the quantized model does."""
    if (prompt_ids is None) == (prompt is None):
        raise typer.BadParameter("give exactly one of --prompt-ids and --prompt")
    console.import_heavy_libraries()
    from .llm.generate import generate as run_generate
    from .metrics import check_findings

    report = run_generate(model, pte, prompt_ids, prompt=prompt, max_new_tokens=max_new_tokens, config=config, entry=entry,
                          checkpoint=checkpoint, seed=seed, min_sqnr_float=min_sqnr_float,
                          min_sqnr_quantized=min_sqnr_quantized, bos=bos, warn=console.warn, weight_algorithm=weight_algorithm,
                          calibration_text=calibration_text, calibration_tokens=calibration_tokens)
    if as_json:
        print_json(report, ok=report["ok"])
    else:
        from .render import render_generate

        render_generate(report)
    check_findings(report, defect="generation check failed", warn=console.warn, what="step",
                   defect_hint="the .pte does not decode as the model does; `qlower verify` shows where it diverges")


@app.command(
    "eval",
    epilog=(
        "Examples:\n\n"
        "  qlower eval ./my-hf-model model.pte --text heldout.txt\n\n"
        "  qlower eval ./my-hf-model model.pte --text heldout.txt --tokens 512 --windows 8 --spread --json\n\n"
        "  qlower eval examples/llama.py llama.pte --text-ids ids.txt --skip float,quantized --runner ./llm_step_runner"
    ),
)
def eval_(
    model: Path = SOURCE_MODEL_ARGUMENT,
    pte: Path = typer.Argument(..., metavar="FILE.pte", help="The .pte to score (a --kv-cache decoder, or a prefill file returning every position's logits)."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text, tokenized whole by the folder's tokenizer (no special tokens added)."),
    text_ids: Optional[Path] = typer.Option(None, "--text-ids", help="Whitespace-separated token ids, for models without a tokenizer."),
    tokens: int = typer.Option(256, "--tokens", min=2, help="Tokens a window; each window starts at position 0 and scores all but its first token."),
    windows: int = typer.Option(16, "--windows", min=0, help="Windows at most (0: every whole window of the text)."),
    spread: bool = typer.Option(False, "--spread", help="Take the --windows windows spread evenly through the text instead of the first ones."),
    skip: Optional[str] = typer.Option(None, "--skip", help="Parts to leave out, comma-separated: float, quantized, file (e.g. --skip float,quantized scores the file alone)."),
    runner: Optional[Path] = typer.Option(None, "--runner", help="Score the file on the real runtime: the path of llm_step_runner (tools/llm_step_runner), one process a window."),
    scheme: Optional[str] = typer.Option(None, "--scheme", callback=lambda v: _check_choice(v, SCHEMES), help="Scheme the .pte was exported with [default: read from the .pte]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", min=1, help="Group size of int4 schemes [default: read from the .pte]."),
    config: Optional[Path] = SOURCE_CONFIG_OPTION,
    entry: Optional[str] = ENTRY_OPTION,
    checkpoint: Optional[Path] = SOURCE_CHECKPOINT_OPTION,
    seed: int = SOURCE_SEED_OPTION,
    weight_algorithm: Optional[str] = _weight_algorithm_option("[default: read from the .pte]"),
    calibration_text: Optional[Path] = CALIBRATION_TEXT_OPTION,
    calibration_tokens: Optional[int] = CALIBRATION_TOKENS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Perplexity on your text of the float model, the model quantized as export does, and the .pte: what quantization costs."""
    console.import_heavy_libraries()
    from .api import evaluate

    progress = StageProgress(enabled=not as_json)
    try:
        with console.native_stderr_silenced():
            report = evaluate(model, pte, text=text, text_ids=text_ids, tokens=tokens, windows=windows, spread=spread, skip=skip,
                              runner=runner, scheme=scheme, group_size=group_size, config=config, entry=entry,
                              checkpoint=checkpoint, seed=seed, weight_algorithm=weight_algorithm,
                              calibration_text=calibration_text, calibration_tokens=calibration_tokens,
                              on_progress=progress.count, warn=console.warn)
    finally:
        progress.close()
    if as_json:
        print_json(report)
    else:
        from .render import render_eval

        render_eval(report)


def _vk_device(choice: str | None):
    """'vulkan' (or 'vulkan:X') and None mean the default device (QLOWER_VK_DEVICE); X is an index or name."""
    if choice is None or choice == "vulkan":
        return None
    choice = choice.removeprefix("vulkan:")
    return int(choice) if choice.isdigit() else choice


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qlower bench mlp.pte\n\n"
        "  qlower bench llama.pte --device 0 --tokens 16 --json\n\n"
        "  QLOWER_VK_DEVICE=NVIDIA qlower bench llama.pte"
    )
)
def bench(
    pte: Path = typer.Argument(..., metavar="FILE.pte", help="The .pte whose fused layers to time."),
    device: Optional[str] = typer.Option(None, "--device", help="Vulkan device: index or name substring [default: QLOWER_VK_DEVICE, else the first]."),
    tokens: int = typer.Option(1, "--tokens", min=1, help="Rows of activations per call (1 = GEMV, decode)."),
    repeats: int = typer.Option(20, "--repeats", min=1, help="Timed calls per layer; the median is reported."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Time each fused layer of a .pte with qlower's kernels on a Vulkan device, against the device's copy bandwidth."""
    console.import_heavy_libraries()
    from .bench import bench_layers
    from .vk.pte_layers import bench_args, fused_calls

    calls = fused_calls(pte)
    if not calls:
        raise QlowerError(f"{pte} has no fused layers that qlower's kernels implement",
                          "bench times linear_dq8ca_q4gsw and q8ta_linear layers; export with --scheme qta8a_qga4w or q8ta_q8csw")
    report = bench_layers(bench_args(calls), device=_vk_device(device), tokens=tokens, repeats=repeats)
    if as_json:
        print_json(report)
    else:
        from .render import render_bench

        render_bench(report)


def main(argv: list[str] | None = None) -> int:
    return typer.main.get_command(app).main(args=argv, prog_name="qlower", standalone_mode=False)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
