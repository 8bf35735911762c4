"""The command line: parse arguments, call the library, render the result.

Exit codes: 0 success, 1 a QlowerError (one ``error:`` line and a hint),
2 a usage error. ``QLOWER_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer._click import exceptions as click_exc

from . import console
from .config import SCHEMES
from .errors import QlowerError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize a PyTorch model into an ExecuTorch .pte for the Vulkan GPU delegate, and show and prove what was produced.",
)



@app.callback()
def _root() -> None:
    """Quantize a PyTorch model into an ExecuTorch .pte for the Vulkan GPU delegate, and show and prove what was produced."""


JSON_OPTION = typer.Option(False, "--json", help="Print exactly one JSON document on stdout, no progress.")


def _check_choice(value: str | None, legal) -> str | None:
    if value is not None and value not in legal:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(legal)}")
    return value


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


class StageProgress:
    """Per-stage progress on stderr: a spinner on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.status = None

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

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qlower export examples/mlp.py -o mlp.pte\n\n"
        "  qlower export examples/llama.py --scheme qga4w --group-size 64 -o llama.pte --json\n\n"
        "  qlower export examples/llama.py --config configs/llm.toml -o llama.pte"
    )
)
def export(
    model: Path = typer.Argument(..., help="Python file that defines the model and its example inputs."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the .pte (default: <model>.pte in the current directory)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", callback=lambda v: _check_choice(v, SCHEMES), help=f"Quantization scheme: {', '.join(SCHEMES)} [default: qta8a_qga4w]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", min=1, help="Weight group size for int4 schemes [default: 128]."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML preset (see configs/); flags override it."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Name of the model (or factory) in the file, when it defines several."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="State dict to load: .safetensors, or .pt (loaded with weights_only)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="q8ta_q8csw: torch.save'd list of input tuples."),
    calibration_batches: Optional[int] = typer.Option(None, "--calibration-batches", min=1, help="q8ta_q8csw: random batches when no data is given."),
    quantize_embeddings: Optional[bool] = typer.Option(None, "--quantize-embeddings/--no-quantize-embeddings", help="Quantize nn.Embedding to int4 groups (et_vk.embedding_q4gsw)."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Fail when a layer cannot take the scheme instead of leaving it float."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the model's initialization and random calibration."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Quantize MODEL and write a Vulkan-delegated .pte, with a summary of what was fused."""
    from .api import export as run_export

    progress = StageProgress(enabled=not as_json)
    console.import_heavy_libraries()
    try:
        summary = run_export(
            model,
            output or Path(model.stem + ".pte"),
            config=config,
            entry=entry,
            checkpoint=checkpoint,
            on_stage=progress,
            warn=console.warn,
            scheme=scheme,
            group_size=group_size,
            calibration=str(calibration) if calibration else None,
            calibration_batches=calibration_batches,
            quantize_embeddings=quantize_embeddings,
            strict=strict,
            seed=seed,
        )
    finally:
        progress.close()
    if as_json:
        print_json(summary)
    else:
        from .render import render_export

        render_export(summary)


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
    config: Optional[Path] = typer.Option(None, "--config", help="The TOML preset the .pte was exported with (per-layer overrides)."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Name of the model (or factory) in the file, when it defines several."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="State dict the .pte was exported with."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="q8ta_q8csw: the calibration data the .pte was exported with."),
    min_sqnr_float: Optional[float] = typer.Option(None, "--min-sqnr-float", help="Minimum SQNR (dB) of each output vs the float model [default: per scheme]."),
    min_sqnr_quantized: Optional[float] = typer.Option(None, "--min-sqnr-quantized", help="Minimum SQNR (dB) of each output vs the quantized eager model [default: per scheme]."),
    min_sqnr_layer: Optional[float] = typer.Option(None, "--min-sqnr-layer", help="Minimum SQNR (dB) of each layer vs the quantized eager model [default: per scheme]."),
    layers: bool = typer.Option(False, "--layers", help="Show each fused layer's SQNR vs the same layer of the quantized eager model."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the per-layer SQNR as a PNG bar chart."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the .pte's serialized graph on the CPU (golden executor) and compare it with the eager model; exit 1 below the thresholds."""
    from .errors import VerifyError
    from .verify import plot_layers, render_report, verify as run_verify

    console.import_heavy_libraries()
    report = run_verify(
        model, pte, scheme=scheme, group_size=group_size, config=config, entry=entry, checkpoint=checkpoint,
        calibration=str(calibration) if calibration else None, inputs=inputs, seed=seed, samples=samples,
        min_sqnr_float=min_sqnr_float, min_sqnr_quantized=min_sqnr_quantized, min_sqnr_layer=min_sqnr_layer,
        warn=console.warn,
    )
    if plot is not None:
        plot_layers(report, plot)
    if as_json:
        print_json(report)
    else:
        render_report(report, show_layers=layers)
    if not report["passed"]:
        raise VerifyError(f"verification failed: {report['failures'][0]}",
                          "the .pte does not compute what the model does; re-export it, or see --layers for where it diverges")


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("QLOWER_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False, prog_name="qlower")
        return 0
    except QlowerError as exc:
        if debug:
            raise
        console.err.print(f"[red]error:[/] {exc.message}", markup=True)
        if exc.hint:
            console.err.print(f"hint: {exc.hint}", markup=False)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        console.err.print("aborted")
        return 130
    except click_exc.NoArgsIsHelpError:
        return 0
    except click_exc.UsageError as exc:
        if debug:
            raise
        command = exc.ctx.command_path if exc.ctx else "qlower"
        console.err.print(f"[red]error:[/] {exc.format_message()}", markup=True)
        console.err.print(f"hint: see '{command} --help'", markup=False)
        return 2


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
