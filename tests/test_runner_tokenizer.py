"""The tokenizer written beside a KV-cache .pte for ExecuTorch's LLM runner (qlower/llm/runner_tokenizer.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from qlower.llm.runner_tokenizer import et_json_problems, guess_bos_eos, llama_main_command, prepends_bos, runner_tokenizer


def bpe_json(**extra) -> dict:
    vocab = {"a": 0, "b": 1, "ab": 2, "<unk>": 3, "<s>": 4, "</s>": 5}
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]},
           "added_tokens": [{"id": i, "content": c, "special": True} for c, i in (("<unk>", 3), ("<s>", 4), ("</s>", 5))],
           "pre_tokenizer": {"type": "ByteLevel"}, "normalizer": None, "decoder": {"type": "ByteLevel"}}
    tok.update(extra)
    return tok


def write(folder: Path, tok: dict, config: dict | None = None) -> list[Path]:
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    files = [folder / "tokenizer.json"]
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        files.append(folder / "tokenizer_config.json")
    return files


def test_folder_config_names_the_files_bos_and_eos(tmp_path):
    # An AddedToken object where the loader wants a string, and an EOS that is not the file's.
    config = {"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "<unk>", "add_bos_token": True}
    sources = write(tmp_path / "model", bpe_json(), config)
    out = tmp_path / "m.pte"
    tok = runner_tokenizer(sources, {"get_bos_id": 4, "get_eos_ids": [5, 3]}, out)
    assert tok.path == tmp_path / "m.tokenizer" and tok.kind == "hf" and tok.problems == []
    assert (tok.bos, tok.eos, tok.num_bos) == (4, 5, 1)
    written = json.loads(tok.files[tok.path / "tokenizer_config.json"])
    assert (written["bos_token"], written["eos_token"]) == ("<s>", "</s>") and written["add_bos_token"] is True
    assert llama_main_command(out, tok, []) == ["llama_main", "--model_path", str(out), "--tokenizer_path",
                                                f"{tmp_path / 'm.tokenizer'}/", "--num_bos", "1"]


def test_bos_missing_from_added_tokens_is_added_and_legacy_merges_become_pairs(tmp_path):
    tok_json = bpe_json()
    tok_json["model"]["merges"] = ["a b"]
    tok_json["added_tokens"] = [t for t in tok_json["added_tokens"] if t["content"] != "<s>"]
    sources = write(tmp_path / "model", tok_json)
    tok = runner_tokenizer(sources, {"get_bos_id": 4, "get_eos_ids": [5]}, tmp_path / "m.pte")
    written = json.loads(tok.files[tok.path / "tokenizer.json"])
    assert written["model"]["merges"] == [["a", "b"]]
    assert {t["content"]: t["id"] for t in written["added_tokens"]}["<s>"] == 4
    assert tok.num_bos == 0  # neither add_bos_token nor a template prepends BOS


def test_model_without_bos_gets_its_eos_for_both(tmp_path):
    sources = write(tmp_path / "model", bpe_json())
    tok = runner_tokenizer(sources, {"get_eos_ids": [5]}, tmp_path / "m.pte")
    config = json.loads(tok.files[tok.path / "tokenizer_config.json"])
    assert (config["bos_token"], config["eos_token"]) == ("</s>", "</s>") and (tok.bos, tok.eos, tok.num_bos) == (5, 5, 0)


def test_unreadable_tokenizer_json_is_reported(tmp_path):
    tok = bpe_json(pre_tokenizer=None, normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend"}]},
                   decoder={"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Strip"}]})
    tok["model"]["type"] = "Unigram"
    problems = et_json_problems(tok)
    assert len(problems) == 4, problems
    assert any("Unigram" in p for p in problems) and any("Prepend" in p for p in problems)
    assert any("Strip" in p for p in problems) and any("pre_tokenizer" in p for p in problems)
    assert et_json_problems(bpe_json()) == []


def test_sentencepiece_is_preferred_when_the_json_is_unreadable(tmp_path):
    sources = write(tmp_path / "model", bpe_json(pre_tokenizer=None))
    (tmp_path / "model" / "tokenizer.model").write_bytes(b"\x0a\x0b\x00\x01sentencepiece")
    tok = runner_tokenizer(sources + [tmp_path / "model" / "tokenizer.model"], {"get_bos_id": 4}, tmp_path / "m.pte")
    assert tok.kind == "sentencepiece" and tok.path == tmp_path / "m.tokenizer.model"
    assert set(tok.files) == {tmp_path / "m.tokenizer.model", tmp_path / "m.tokenizer" / "tokenizer.json",
                              tmp_path / "m.tokenizer" / "tokenizer_config.json"}
    assert tok.file_path == tmp_path / "m.tokenizer" / "tokenizer.json"


def test_tiktoken_bos_is_checked_against_the_file(tmp_path):
    ranks = 7
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(bytes([65 + i])) + f" {i}\n".encode() for i in range(ranks)))
    tok = runner_tokenizer([path], {"get_bos_id": ranks}, tmp_path / "m.pte")
    assert tok.kind == "tiktoken" and (tok.bos, tok.eos) == (ranks, ranks + 1) and tok.problems == []
    assert runner_tokenizer([path], {"get_bos_id": 1}, tmp_path / "m.pte").problems


def test_file_guess_and_bos_template():
    llama3 = {"added_tokens": [{"id": 10, "content": "<|begin_of_text|>"}, {"id": 11, "content": "<|end_of_text|>"},
                               {"id": 12, "content": "<|start_header_id|>"}, {"id": 13, "content": "<|end_header_id|>"}]}
    assert guess_bos_eos(llama3) == (10, 11)
    assert guess_bos_eos(bpe_json()) == (0, 0)  # "<s>" names neither: id 0
    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [4]}}}
    assert prepends_bos({"post_processor": template}, {}, 4)
    assert not prepends_bos({"post_processor": template}, {"add_bos_token": False}, 4)
    assert prepends_bos({"post_processor": {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}}, {}, 4)
