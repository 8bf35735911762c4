"""KV-cache decoders on the real ExecuTorch Vulkan runtime, stepped as ExecuTorch's LLM runner steps them (opt-in).

Set QLOWER_ET_STEP_RUNNER to ``llm_step_runner`` (tools/llm_step_runner: ExecuTorch's Module API with the
Vulkan backend) and VK_ICD_FILENAMES to a Vulkan driver. Each bundled decoder and transformers recipe, and
a few more families, is exported with ``--kv-cache``; the runtime prefills 8 tokens in one call and decodes
16 greedy steps; every call's logits are compared with qlower's golden executor and the quantized eager
model fed the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import qlower
from qlower.config import make_options
from qlower.llm.generate import GoldenDecoder, teacher_forced
from qlower.llm.load import decoder_for, load_any
from qlower.pipeline import quantize_model
from qlower.pte import read_pte
from qlower.verify import THRESHOLDS, sqnr_db

from .conftest import EXAMPLES, MODELS

STEP_RUNNER = os.environ.get("QLOWER_ET_STEP_RUNNER")
pytestmark = pytest.mark.skipif(not STEP_RUNNER, reason="set QLOWER_ET_STEP_RUNNER to llm_step_runner built with Vulkan")

PROMPT = [3, 17, 42, 99, 5, 8, 120, 7]
STEPS = 16
MAX_SEQ_LEN = 32
DECODERS = {
    "llama": EXAMPLES / "llama.py",
    "hf_llama": EXAMPLES / "hf_llama.py",
    "hf_qwen2": EXAMPLES / "hf_qwen2.py",
    "hf_gpt2": EXAMPLES / "hf_gpt2.py",
}


def hf_family_folder(family: str, root: Path) -> Path:
    from .test_llm import FAMILIES

    folder = root / family
    torch.manual_seed(0)
    FAMILIES[family]().save_pretrained(str(folder))
    return folder


def step(pte: Path, workdir: Path, feed: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    out = workdir / "logits.bin"
    cmd = [STEP_RUNNER, "--model", str(pte), "--prompt", ",".join(map(str, PROMPT)), "--steps", str(STEPS), "--out", str(out)]
    if feed:
        cmd += ["--feed", ",".join(map(str, feed))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    logits = torch.from_numpy(np.fromfile(out, dtype=np.float32)).reshape(STEPS + 1, doc["vocab"])
    return doc["tokens"], logits


def check_decoder(model: Path, tmp_path: Path, scheme: str = "qta8a_qga4w") -> None:
    pte = tmp_path / "decoder.pte"
    summary = qlower.export(model, pte, scheme=scheme, kv_cache=True, max_seq_len=MAX_SEQ_LEN)
    assert summary["vulkan_partitions"] == 1 and summary["cpu_ops"] == {}
    tokens, runtime = step(pte, tmp_path)
    fed = tokens[:-1]
    golden = torch.stack(teacher_forced(GoldenDecoder(read_pte(pte)), PROMPT, fed))
    options = make_options(scheme=scheme, kv_cache=True, max_seq_len=MAX_SEQ_LEN)
    torch.manual_seed(0)
    loaded, folder, _ = load_any(model, options)
    quantized, _ = quantize_model(loaded, options, lambda m: None)
    lm, _ = decoder_for(quantized, loaded, folder, options, lambda m: None)
    with torch.no_grad():
        eager = torch.stack(teacher_forced(lambda t, pos: lm(t, torch.tensor([pos]))[0], PROMPT, fed))
    bar = THRESHOLDS[scheme].vs_quantized
    for i in range(STEPS + 1):
        assert torch.isfinite(runtime[i]).all()
        assert sqnr_db(golden[i], runtime[i]) >= bar, f"call {i}: runtime vs golden {sqnr_db(golden[i], runtime[i]):.1f} dB"
        assert sqnr_db(eager[i].float(), runtime[i]) >= bar, f"call {i}: runtime vs eager {sqnr_db(eager[i].float(), runtime[i]):.1f} dB"
    assert tokens[0] == int(golden[0].argmax())


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_bundled_decoder_steps_on_runtime(name, tmp_path):
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    check_decoder(DECODERS[name], tmp_path)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3"])
def test_hf_family_steps_on_runtime(family, tmp_path):
    pytest.importorskip("transformers")
    check_decoder(hf_family_folder(family, tmp_path), tmp_path)


def test_fp32_decoder_is_exact_on_runtime(tmp_path):
    check_decoder(MODELS["llama"], tmp_path, scheme="fp32")
