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

class QlowerGroup(typer.core.TyperGroup):
    """Maps errors to exit codes in one place, for the console script and CliRunner alike."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        debug = os.environ.get("QLOWER_DEBUG") == "1"
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            return 0
        except QlowerError as exc:
            if debug:
                raise
            console.err.print(f"[red]error:[/] {exc.message}", markup=True)
            if exc.hint:
                console.err.print(f"hint: {exc.hint}", markup=False)
            return exc.exit_code
        except click_exc.NoArgsIsHelpError:
            return 0
        except click_exc.UsageError as exc:
            if debug:
                raise
            command = exc.ctx.command_path if exc.ctx else "qlower"
            console.err.print(f"[red]error:[/] {exc.format_message()}", markup=True)
            console.err.print(f"hint: see '{command} --help'", markup=False)
            return 2
        except typer.Exit as exc:
            return exc.exit_code
        except typer.Abort:
            console.err.print("aborted")
            return 130


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


def main(argv: list[str] | None = None) -> int:
    return typer.main.get_command(app).main(args=argv, prog_name="qlower", standalone_mode=False)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
