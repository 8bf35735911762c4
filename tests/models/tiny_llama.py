"""examples/llama.py at a size the test suite can export in seconds."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("qlower_example_llama", Path(__file__).resolve().parents[2] / "examples" / "llama.py")
_llama = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_llama)

# Every linear's K (128, 256) is a multiple of the default group size 128.
CONFIG = _llama.LlamaConfig(vocab_size=256, dim=128, n_layers=1, n_heads=2, hidden_dim=256, seq_len=8)


def make_model():
    return _llama.make_model(CONFIG)


def make_example_inputs():
    return _llama.make_example_inputs(CONFIG)
