"""Int4 group sizes on the real ExecuTorch Vulkan runtime (opt-in: QLOWER_ET_RUNNER, see test_et_runtime).

ET-VK quantizes a multi-row input of ``linear_dq8ca_q4gsw`` with a shader that is right only
for some group sizes (``qlower.runtime_caps.dq8ca_prefill_group_size_ok``); qlower stores a
layer at any other group size as a safe one that divides it. Each file here is run on a
prefill-shaped input and compared with the eager quantized model at the user's group size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qlower
from qlower.config import make_options
from qlower.loader import load_model
from qlower.quantize import quantize_model
from qlower.metrics import sqnr_db

from .conftest import write_model
from .test_group_size import MLP
from .test_et_runtime import RUNNER, run_on_runtime

pytestmark = pytest.mark.skipif(not RUNNER, reason="set QLOWER_ET_RUNNER to an ExecuTorch executor_runner built with Vulkan")

# Runtime vs eager at the same group size: the safe sizes measure 131-133 dB on lavapipe;
# the unsafe ones stored as such measure below 0 dB.
MIN_RUNTIME_VS_EAGER_DB = 100.0
PREFILL_TOKENS = 16



def runtime_vs_eager(tmp_path, scheme: str, group_size: int, k: int, hidden: int, n: int | None = None,
                     tokens: int = PREFILL_TOKENS):
    """(summary, runtime vs eager dB): the file at ``group_size`` run on ``tokens`` rows of width ``k``."""
    path = write_model(tmp_path, MLP.format(k=k, hidden=hidden, n=n or k, tokens=tokens))
    pte = tmp_path / "m.pte"
    summary = qlower.export(path, pte, scheme=scheme, group_size=group_size, strict=True)
    loaded = load_model(path)
    inputs = tuple(loaded.example_inputs)
    quantized, _ = quantize_model(loaded, make_options(scheme=scheme, group_size=group_size), lambda m: None)
    with torch.no_grad():
        eager = quantized(*inputs)
    proc, outputs = run_on_runtime(pte, inputs, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = torch.from_numpy(np.fromfile(outputs[0], dtype=np.float32)).reshape(eager.shape)
    return summary, sqnr_db(eager.float(), got)


# (group size, K, hidden): K=1024 as measured in the issue; K=480 and K=576 are not multiples
# of 256 (their group sizes 96 and 192 are unsafe and divide them); K=384 at g128 and K=160 at
# g32 give a group count that is not a multiple of the shader's groups per workgroup.
CASES = [
    (32, 1024, 512), (64, 1024, 512), (128, 1024, 512), (256, 1024, 512), (512, 1024, 512),
    (96, 480, 192), (192, 576, 192), (128, 384, 256), (32, 160, 96),
]


@pytest.mark.parametrize("scheme", ["qta8a_qga4w", "qga4w"])
@pytest.mark.parametrize("group_size,k,hidden", CASES, ids=[f"g{g}-K{k}" for g, k, _ in CASES])
def test_prefill_matches_eager_at_every_group_size(tmp_path, scheme, group_size, k, hidden):
    summary, db = runtime_vs_eager(tmp_path, scheme, group_size, k, hidden)
    print(f"{scheme} g{group_size} K={k}: runtime vs eager {db:.1f} dB")
    assert summary["layers"]["fused"] == 2
    assert db >= MIN_RUNTIME_VS_EAGER_DB, f"{scheme} g{group_size} K={k}: {db:.1f} dB"


# Shapes the kernels' reading suggests checking: M not a multiple of 4 (the input quantizer
# loads 4 rows unchecked), one row (the GEMV paths) at a restated size, K = 4 mod 8 (int4
# weights are packed with K padded to 8) with N = 4 mod 8 (the 8-wide output tiles).
ODD = [
    ("qta8a_qga4w", 128, 1024, 512, 1024, 5), ("qta8a_qga4w", 256, 1024, 512, 1024, 1),
    ("qta8a_qga4w", 20, 100, 40, 20, 16), ("qta8a_qga4w", 20, 100, 40, 20, 1),
    ("qga4w", 20, 100, 40, 20, 16), ("qga4w", 20, 100, 40, 20, 1),
]


@pytest.mark.parametrize("scheme,group_size,k,hidden,n,tokens", ODD,
                         ids=[f"{c[0]}-g{c[1]}-K{c[2]}-N{c[4]}-M{c[5]}" for c in ODD])
def test_odd_shapes_match_eager(tmp_path, scheme, group_size, k, hidden, n, tokens):
    summary, db = runtime_vs_eager(tmp_path, scheme, group_size, k, hidden, n, tokens)
    print(f"{scheme} g{group_size} K={k} N={n} M={tokens}: runtime vs eager {db:.1f} dB")
    assert summary["layers"]["fused"] == 2
    assert db >= MIN_RUNTIME_VS_EAGER_DB, f"{db:.1f} dB"
