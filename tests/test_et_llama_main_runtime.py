"""ExecuTorch's own text LLM runner (``llama_main``, what Android's ``LlmModule`` runs) on qlower's files (opt-in).

Set QLOWER_ET_LLAMA_MAIN to ``llama_main`` (ExecuTorch ``examples/models/llama`` built with the Vulkan
backend; its folder on LD_LIBRARY_PATH when it links ``libllama_runner.so``) and VK_ICD_FILENAMES to a
Vulkan driver. A small Llama folder is made whose BOS is not id 0 (``<s>`` is the last id) and whose EOS is
a token the model really generates; it is exported, and llama_main runs the ``.pte`` with the tokenizer
folder qlower wrote beside it, ``--num_bos 1``, greedy. Checked: the BOS it fed (its text equals the golden
text of the prompt after the right BOS, and differs from the text after id 0, which is what the bare
tokenizer.json gives), the generated text equals ``qlower generate --bos``'s, and it stops at the EOS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import qlower
from qlower.llm.generate import generate

from .conftest import ROOT

LLAMA_MAIN = os.environ.get("QLOWER_ET_LLAMA_MAIN")
pytestmark = pytest.mark.skipif(not LLAMA_MAIN, reason="set QLOWER_ET_LLAMA_MAIN to ExecuTorch's llama_main built with Vulkan")

PROMPT = "def export(model, output):"
MAX_SEQ_LEN = 48
EOS_STEP = 3  # the EOS is the model's greedy token at this step (0 = the prefill's)
BPE_VOCAB = 300  # learned tokens (ASCII only: every token decodes to whole characters)
BOS, EOS = "<s>", "</s>"


def bpe_tokenizer_json() -> dict:
    """A byte-level BPE trained on this project's README (tokenizers' own trainer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((ROOT / "README.md").read_text().splitlines(),
                            trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[], show_progress=False))
    return json.loads(tok.to_str())


def with_specials(tok: dict, eos_id: int | None = None) -> dict:
    """``tok`` with BOS as its last id and EOS before it, or at ``eos_id``: the learned token there moves
    to EOS's slot (no other id changes, so a text without that token encodes to the same ids)."""
    tok = json.loads(json.dumps(tok))
    vocab = tok["model"]["vocab"]
    learned = len(vocab)
    bos_id, eos_slot = learned + 1, learned
    if eos_id is not None and eos_id != eos_slot:
        moved = next(t for t, i in vocab.items() if i == eos_id)
        vocab[moved] = eos_slot
    eos_id = eos_slot if eos_id is None else eos_id
    vocab.update({BOS: bos_id, EOS: eos_id})
    tok["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for c, i in ((BOS, bos_id), (EOS, eos_id))]
    return tok


def llama_folder(folder: Path) -> tuple[Path, int, int]:
    """(a save_pretrained Llama folder with the BPE tokenizer, its BOS id, its EOS id).

    The EOS is the float model's greedy token at EOS_STEP after BOS + PROMPT, so generation ends there."""
    import transformers
    from tokenizers import Tokenizer

    base = bpe_tokenizer_json()
    first = with_specials(base)
    vocab = len(first["model"]["vocab"])
    bos_id = vocab - 1
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=bos_id, eos_token_id=vocab - 2)).eval()
    prompt = [bos_id] + Tokenizer.from_str(json.dumps(first)).encode(PROMPT, add_special_tokens=False).ids
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(EOS_STEP + 1):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    eos_id = seq[-1]
    assert eos_id not in seq[:-1] and eos_id != bos_id, f"pick another seed: token {eos_id} repeats"
    final = Tokenizer.from_str(json.dumps(with_specials(base, eos_id)))
    assert final.encode(PROMPT, add_special_tokens=False).ids == prompt[1:]
    model.config.eos_token_id = eos_id
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = bos_id, eos_id
    model.save_pretrained(str(folder))
    transformers.PreTrainedTokenizerFast(tokenizer_object=final, bos_token=BOS, eos_token=EOS).save_pretrained(str(folder))
    return folder, bos_id, eos_id


def llama_main(pte: Path, tokenizer: Path, seq_len: int) -> subprocess.CompletedProcess:
    cmd = [LLAMA_MAIN, "--model_path", str(pte), "--tokenizer_path", str(tokenizer), "--prompt", PROMPT,
           "--seq_len", str(seq_len), "--temperature", "0", "--num_bos", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_llama_main_reads_bos_eos_from_the_written_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, bos_id, eos_id = llama_folder(tmp_path / "llama")
    pte = tmp_path / "out" / "llama.pte"
    pte.parent.mkdir()
    summary = qlower.export(folder, pte, max_seq_len=MAX_SEQ_LEN)
    decode = summary["decode"]
    assert decode["metadata"]["get_bos_id"] == bos_id and decode["metadata"]["get_eos_ids"] == [eos_id]
    written = decode["tokenizer"]
    assert written["kind"] == "hf" and written["problems"] == []
    assert (written["bos"], written["eos"]) == (bos_id, eos_id)
    tokenizer = Path(written["path"])
    assert tokenizer == tmp_path / "out" / "llama.tokenizer"
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == (BOS, EOS)
    added = {t["content"]: t["id"] for t in json.loads((tokenizer / "tokenizer.json").read_text())["added_tokens"]}
    assert added[BOS] == bos_id and added[EOS] == eos_id
    # Given the file alone, the loader finds no "bos"/"begin" in "<s>": BOS 0, as the summary says.
    assert written["file_bos"] == 0

    golden = generate(folder, pte, prompt=PROMPT, bos=True, max_new_tokens=MAX_SEQ_LEN // 2)
    prompt_ids = golden["prompt_ids"]
    assert prompt_ids[0] == bos_id
    assert golden["tokens"][-1] == eos_id and len(golden["tokens"]) == EOS_STEP + 1, golden["tokens"]
    assert golden["text"].endswith(EOS)
    # The prompt after BOS 0 (what the bare tokenizer.json gives) continues differently.
    steps = 6
    text_bos0 = transformers.AutoTokenizer.from_pretrained(str(folder)).decode(
        generate(folder, pte, [0] + prompt_ids[1:], max_new_tokens=steps)["tokens"])
    assert not text_bos0.startswith(golden["text"]) and not golden["text"].startswith(text_bos0)

    proc = llama_main(pte, tokenizer, MAX_SEQ_LEN)
    assert f"num_prompt_tokens {len(prompt_ids)}," in proc.stderr  # the prompt plus one BOS
    assert proc.stdout.startswith(PROMPT + golden["text"] + "\n"), (proc.stdout, golden["text"])
    assert "Reached to the end of generation" in proc.stderr
    assert re.search(rf"Generated Tokens: {EOS_STEP}\b", proc.stderr)

    proc = llama_main(pte, tokenizer / "tokenizer.json", len(prompt_ids) + steps)
    assert proc.stdout.startswith(PROMPT + text_bos0), (proc.stdout, text_bos0)
