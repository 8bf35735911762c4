"""The tokenizer written beside a KV-cache ``.pte``, laid out as ExecuTorch's LLM runner loads it.

Facts this module is built on (ExecuTorch ``extension/llm/runner/llm_runner_helper.cpp``
``load_tokenizer`` and meta-pytorch/tokenizers ``src/hf_tokenizer.cpp``, the versions the
prebuilt runtime uses):

* ``load_tokenizer(path)`` tries, in order, the Hugging Face JSON loader, TikToken,
  SentencePiece and llama2.c, and keeps the first that loads. TikToken "loads" a folder
  (an empty vocabulary): a folder the JSON loader refuses becomes garbage text, exit 0.
* The JSON loader reads ``tokenizer_config.json`` only when the path is a folder holding
  ``tokenizer.json`` (and that config). Its ``bos_token``/``eos_token`` must be plain
  strings naming entries of ``added_tokens``; a missing one fails the load, an
  ``AddedToken`` object there throws out of the loader.
* Given a file, BOS and EOS are guessed from the special tokens' names ("bos"/"begin",
  "eos"/"end", narrowed by "text"); no match leaves id 0.
* It reads BPE only (``model.merges`` as pairs; the older ``"a b"`` strings are skipped
  silently), pre-tokenizers Split/Digits/ByteLevel/Sequence (one is required),
  normalizers Replace/Sequence/NFC and decoders ByteLevel/Replace/ByteFallback/Fuse/
  Sequence; other types throw out of the loader. The ``post_processor`` (where a
  tokenizer prepends BOS) is not read: the runner's ``--num_bos`` does that.
* The runner stops on the file's ``get_eos_ids`` when the file has them, else on the
  tokenizer's EOS; BOS and the sampler's vocabulary come from the tokenizer only.

Layout written beside ``<stem>.pte``: ``<stem>.tokenizer/`` (``tokenizer.json`` with
merges as pairs and BOS/EOS among the added tokens, ``tokenizer_config.json`` whose
BOS/EOS are the file's ``get_bos_id``/``get_eos_ids``) when the model folder has a
``tokenizer.json``; ``<stem>.tokenizer.model`` (SentencePiece or TikToken, a file: the
loaders read those from the file itself) when it has a ``tokenizer.model``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What ExecuTorch's JSON tokenizer loader understands (tokenizers 00d86aa).
ET_MODELS = {"BPE"}
ET_PRE_TOKENIZERS = {"Split", "Digits", "ByteLevel", "Sequence"}
ET_NORMALIZERS = {"Replace", "Sequence", "NFC"}
ET_DECODERS = {"ByteLevel", "Replace", "ByteFallback", "Fuse", "Sequence"}
# llama_main gives a TikToken file Llama 3's special tokens after the ranks: BOS first, EOS second.
TIKTOKEN_BOS_OFFSET, TIKTOKEN_EOS_OFFSET = 0, 1
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]*={0,2} \d+$")


@dataclass
class RunnerTokenizer:
    """What to write beside the .pte and how the runner should be told about it."""

    path: Path  # the runner's --tokenizer_path
    kind: str  # "hf" (a folder), "sentencepiece" or "tiktoken" (a file)
    bos: int | None  # the BOS the runner's tokenizer will use (None: the loader's own)
    eos: int | None
    num_bos: int  # --num_bos: 1 when the model's own tokenizer prepends BOS
    files: dict[Path, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    file_path: Path | None = None  # for loaders that take a file only (Android's LlmModule)
    file_bos: int | None = None  # the BOS such a loader guesses from that file

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "bos": self.bos, "eos": self.eos, "num_bos": self.num_bos,
                "file_path": str(self.file_path) if self.file_path else None, "file_bos": self.file_bos,
                "problems": list(self.problems)}


def runner_tokenizer(sources: list[Path], metadata: dict[str, Any], output: Path) -> RunnerTokenizer | None:
    """The tokenizer files for ``output`` (a .pte) from a model folder's ``sources``, or None without one."""
    by_name = {p.name: p for p in sources}
    hf = _hf_tokenizer(by_name, metadata, output) if "tokenizer.json" in by_name else None
    model = _model_file(by_name["tokenizer.model"], metadata, output) if "tokenizer.model" in by_name else None
    if hf is not None and model is not None:
        chosen = hf if not hf.problems or model.problems else model
        other = model if chosen is hf else hf
        chosen.files.update(other.files)
        if chosen is model:
            chosen.file_path, chosen.file_bos = hf.file_path, hf.file_bos
        return chosen
    return hf or model


def _hf_tokenizer(by_name: dict[str, Path], metadata: dict[str, Any], output: Path) -> RunnerTokenizer:
    folder = output.with_name(f"{output.stem}.tokenizer")
    tok = json.loads(by_name["tokenizer.json"].read_text(encoding="utf-8"))
    config: dict[str, Any] = {}
    if "tokenizer_config.json" in by_name:
        config = json.loads(by_name["tokenizer_config.json"].read_text(encoding="utf-8"))
    problems = et_json_problems(tok)
    _merges_as_pairs(tok)
    contents = _id_to_content(tok)

    def content(value) -> str | None:
        return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None

    bos_id = metadata.get("get_bos_id")
    eos_ids = list(metadata.get("get_eos_ids") or [])
    bos = contents.get(int(bos_id)) if bos_id is not None else content(config.get("bos_token"))
    if bos_id is not None and bos is None:
        problems.append(f"the file's get_bos_id {bos_id} is not in the tokenizer's vocabulary")
    eos = next((contents[int(e)] for e in eos_ids if int(e) in contents), None) or content(config.get("eos_token"))
    if eos_ids and not any(int(e) in contents for e in eos_ids):
        problems.append(f"none of the file's get_eos_ids {eos_ids} is in the tokenizer's vocabulary")
    # The loader needs both names; a model with one token for both (GPT-2) or none for BOS gets the other.
    bos, eos = bos or eos, eos or bos
    ids = {c: i for i, c in contents.items()}
    files: dict[Path, bytes] = {}
    guessed = guess_bos_eos(tok)  # before BOS/EOS are added: what the model's own file gives
    if bos is not None:
        for name in dict.fromkeys((bos, eos)):
            if name in ids:
                _ensure_added(tok, name, ids[name])
        config = dict(config, bos_token=bos, eos_token=eos)
        files[folder / "tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
        read = (ids.get(bos), ids.get(eos))
    else:  # no name for either: without a config the loader guesses (a config naming none would fail the load)
        read = guessed
    files[folder / "tokenizer.json"] = json.dumps(tok, indent=2, ensure_ascii=False).encode()
    return RunnerTokenizer(
        path=folder, kind="hf", bos=read[0], eos=read[1],
        num_bos=int(bos_id is not None and prepends_bos(tok, config, int(bos_id))), files=files, problems=problems,
        file_path=folder / "tokenizer.json", file_bos=guess_bos_eos(tok)[0])


def _model_file(source: Path, metadata: dict[str, Any], output: Path) -> RunnerTokenizer:
    data = source.read_bytes()
    target = output.with_name(f"{output.stem}.tokenizer.model")
    bos_id, eos_ids = metadata.get("get_bos_id"), list(metadata.get("get_eos_ids") or [])
    problems: list[str] = []
    first = data.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first):
        ranks = sum(1 for line in data.splitlines() if line.strip())
        bos, eos = ranks + TIKTOKEN_BOS_OFFSET, ranks + TIKTOKEN_EOS_OFFSET
        if bos_id is not None and int(bos_id) != bos:
            problems.append(f"llama_main gives this TikToken file BOS {bos} (Llama 3's special tokens after {ranks} ranks), "
                            f"the file's get_bos_id is {bos_id}")
        return RunnerTokenizer(target, "tiktoken", bos, eos, num_bos=int(bos_id is not None), files={target: data},
                               problems=problems)
    # SentencePiece: BOS/EOS are the model's own (read by the loader from the file).
    return RunnerTokenizer(target, "sentencepiece", None, None, num_bos=int(bos_id is not None), files={target: data},
                           problems=problems)


def et_json_problems(tok: dict[str, Any]) -> list[str]:
    """Why ExecuTorch's JSON tokenizer loader would refuse (or throw on) this tokenizer.json; [] if it loads it."""
    problems = []
    model = tok.get("model") or {}
    if model.get("type", "BPE") not in ET_MODELS or "merges" not in model or "vocab" not in model:
        problems.append(f"its model is {model.get('type', 'unknown')}; ExecuTorch's loader reads BPE only")
    if "added_tokens" not in tok:
        problems.append("it has no added_tokens list")
    pre = tok.get("pre_tokenizer")
    if pre is None:
        problems.append("it has no pre_tokenizer (ExecuTorch's loader needs one)")
    for kind, value, known in (("pre_tokenizer", pre, ET_PRE_TOKENIZERS), ("normalizer", tok.get("normalizer"), ET_NORMALIZERS),
                               ("decoder", tok.get("decoder"), ET_DECODERS)):
        for name in sorted(_types(value) - known):
            problems.append(f"its {kind} {name} is not supported by ExecuTorch's loader")
    return problems


def guess_bos_eos(tok: dict[str, Any]) -> tuple[int, int]:
    """(BOS, EOS) that ExecuTorch's JSON loader guesses when given the tokenizer.json file alone."""
    specials = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}

    def pick(words: tuple[str, str]) -> int | None:
        found = [c for c in specials if words[0] in c or words[1] in c]
        if len(found) > 1:
            found = [c for c in found if "text" in c]
        return specials[found[0]] if len(found) == 1 else None

    bos, eos = pick(("bos", "begin")), pick(("eos", "end"))
    bos, eos = (bos if bos is not None else eos), (eos if eos is not None else bos)
    return (bos or 0), (eos or 0)


def prepends_bos(tok: dict[str, Any], config: dict[str, Any], bos_id: int) -> bool:
    """Whether the model's own tokenizer starts an encoded text with BOS (so the runner needs --num_bos 1)."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    post = tok.get("post_processor") or {}
    processors = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in processors:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0].get("SpecialToken", {}).get("id")
            ids = (p.get("special_tokens", {}).get(first) or {}).get("ids", [])
            return bos_id in ids
    return False


def _types(value) -> set[str]:
    if not isinstance(value, dict):
        return set()
    found = {value["type"]} if "type" in value else set()
    for key in ("pretokenizers", "normalizers", "decoders"):
        for inner in value.get(key) or []:
            found |= _types(inner)
    return found


def _merges_as_pairs(tok: dict[str, Any]) -> None:
    model = tok.get("model") or {}
    merges = model.get("merges")
    if isinstance(merges, list) and any(isinstance(m, str) for m in merges):
        model["merges"] = [m.split(" ") if isinstance(m, str) else m for m in merges]


def _id_to_content(tok: dict[str, Any]) -> dict[int, str]:
    contents = {int(i): t for t, i in ((tok.get("model") or {}).get("vocab") or {}).items()} \
        if isinstance((tok.get("model") or {}).get("vocab"), dict) else {}
    contents.update({int(t["id"]): t["content"] for t in tok.get("added_tokens", [])})
    return contents


def _ensure_added(tok: dict[str, Any], content: str, token_id: int) -> None:
    """BOS/EOS must be added tokens for the loader to find them by name."""
    added = tok.setdefault("added_tokens", [])
    if not any(t.get("content") == content for t in added):
        added.append({"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})


def llama_main_command(pte: Path, tokenizer: RunnerTokenizer, data_files: list[Path]) -> list[str]:
    """ExecuTorch's ``llama_main`` command line for the written files (the prompt and length left to add)."""
    cmd = ["llama_main", "--model_path", str(pte), "--tokenizer_path", str(tokenizer.path) + ("/" if tokenizer.kind == "hf" else "")]
    if data_files:
        cmd += ["--data_paths", ",".join(str(p) for p in data_files)]
    return cmd + ["--num_bos", str(tokenizer.num_bos)]
