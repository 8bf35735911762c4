"""Shared fixtures: model files, and .pte files exported once per test session."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qlower.console import import_heavy_libraries

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = {
    "mlp": EXAMPLES / "mlp.py",
    "cnn": EXAMPLES / "cnn.py",
    # examples/llama.py at test size (1 layer): same code path, a fraction of the time.
    "llama": ROOT / "tests" / "models" / "tiny_llama.py",
}

import_heavy_libraries()


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return MODELS["llama"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(example, scheme) -> (model path, .pte path); exports once per session."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}
    errors: dict[tuple[str, str], Exception] = {}
    directory = tmp_path_factory.mktemp("pte")

    def get(example: str, scheme: str) -> tuple[Path, Path]:
        from qlower.api import export

        key = (example, scheme)
        if key in errors:
            raise errors[key]
        if key not in cache:
            out = directory / f"{example}_{scheme}.pte"
            try:
                export(MODELS[example], out, scheme=scheme)
            except Exception as exc:
                errors[key] = exc
                raise
            cache[key] = (MODELS[example], out)
        return cache[key]

    return get


def write_model(tmp_path: Path, body: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text("import torch\nfrom torch import nn\n" + textwrap.dedent(body))
    return path
