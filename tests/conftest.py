"""Shared fixtures: tiny model files and one export per (example, scheme) per session."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qlower.console import import_heavy_libraries

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

import_heavy_libraries()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 1-layer, width-64 config of examples/llama.py: same code path, a fraction of the time."""
    path = tmp_path_factory.mktemp("models") / "tiny_llama.py"
    path.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(EXAMPLES)!r})
        import llama
        CFG = llama.LlamaConfig(vocab_size=128, dim=64, n_layers=1, n_heads=2, hidden_dim=128, seq_len=8)
        def make_model():
            return llama.make_model(CFG)
        def make_example_inputs():
            return llama.make_example_inputs(CFG)
    """))
    return path


def write_model(tmp_path: Path, body: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text("import torch\nfrom torch import nn\n" + textwrap.dedent(body))
    return path
