"""``qlower eval``: what quantization costs on real text, as perplexity.

The user's text is tokenized whole (the model folder's tokenizer, no special
tokens added; or token ids given as such) and cut into consecutive windows of
``tokens`` tokens from its start. Each window starts fresh at position 0 and
every token after its first is scored: ``tokens - 1`` predictions a window.
Three scorers see the same windows:

* ``float``: the float model on the whole window in one forward, no cache;
* ``quantized``: the model quantized by export's own function
  (:func:`qlower.quantize.quantize_model`, options as the file says), fed as
  the file is fed: one token a call through its KV cache for a KV-cache file
  (so every linear runs as the runtime's one-row GEMV does), the whole window
  for a prefill-only file;
* ``file``: the serialized program, by the golden executor fed as ExecuTorch's
  LLM runner feeds it (``forward(tokens[1, 1], input_pos[1])`` a token at a
  time, the cache reset before each window), or with ``runner`` on the real
  runtime (tools/llm_step_runner, one process a window, teacher forcing).

Perplexity is ``exp`` of the mean negative log-likelihood over every scored
token of every window (natural log, float64 sums), the quantity transformers'
``loss`` gives for one window.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..config import GROUPED_SCHEMES
from ..errors import QlowerError, VerifyError
from ..pte import Pte, read_pte

DEFAULT_TOKENS = 256  # tokens a window
DEFAULT_WINDOWS = 16  # windows at most
PARTS = ("float", "quantized", "file")

Scorer = Callable[[list[int]], torch.Tensor]  # window → logits [T - 1, vocab] predicting tokens 1..T-1


class EvalError(QlowerError):
    """The text, the windows or the file cannot be scored."""


# --- text and windows ------------------------------------------------------------------------


def read_token_ids(path: str | Path) -> list[int]:
    """Whitespace-separated non-negative token ids."""
    text = _read_text(path)
    try:
        ids = [int(word) for word in text.split()]
    except ValueError:
        raise EvalError(f"{path} is not whitespace-separated token ids", "write integers such as '3 17 42', or pass --text with a tokenizer") from None
    if any(i < 0 for i in ids):
        raise EvalError(f"{path} holds a negative token id", "token ids are 0 or more")
    return ids


def tokenize(tokenizer, path: str | Path) -> list[int]:
    """The whole text by ``tokenizer``, without special tokens (no BOS/EOS inserted).

    The text is longer than the model's context on purpose (it is cut into windows after): transformers'
    warning about that is silenced."""
    from transformers.utils import logging as hf_logging

    text = _read_text(path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    finally:
        hf_logging.set_verbosity(level)


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"text file not found: {path}", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"cannot read {path}: {exc}", "pass a UTF-8 text file") from exc


def window_starts(n_ids: int, tokens: int, windows: int, spread: bool = False) -> list[int]:
    """Start offsets of whole windows of ``tokens`` ids: the first ``windows`` (0: all), or with ``spread``
    that many spaced evenly over all the text's whole windows, first and last included."""
    available = n_ids // tokens
    if available == 0:
        raise EvalError(f"the text has {n_ids} tokens, fewer than one window of {tokens}",
                        "pass a longer text, or fewer --tokens")
    count = available if windows <= 0 else min(windows, available)
    if spread and count < available:
        picks = [0] if count == 1 else [round(i * (available - 1) / (count - 1)) for i in range(count)]
    else:
        picks = list(range(count))
    return [p * tokens for p in picks]


def window_nll(logits: torch.Tensor, window: list[int]) -> float:
    """Sum of −log p(token) over tokens 1..T-1 of ``window``; ``logits`` [T-1, vocab] predict them."""
    targets = torch.tensor(window[1:], dtype=torch.long)
    if logits.shape[0] != len(targets):
        raise VerifyError(f"{logits.shape[0]} logit rows for {len(targets)} scored tokens", "this is a bug in qlower eval")
    return float(F.cross_entropy(logits.double(), targets, reduction="sum"))


# --- the file ------------------------------------------------------------------------------------


@dataclass
class FileInfo:
    """What eval needs to know of a .pte's forward method."""

    decode: bool  # a KV-cache decoder: forward(tokens[1, T], input_pos[1]) -> logits of the last position
    metadata: dict[str, Any]
    max_tokens: int | None  # the most tokens a window may have (the cache length, or the prefill's bound)
    static_tokens: int | None  # a prefill-only file with a static shape takes exactly this many
    all_positions: bool  # a prefill-only file returns logits of every position

    @property
    def vocab(self) -> int | None:
        value = self.metadata.get("get_vocab_size")
        return int(value) if value else None


def describe_file(pte: Pte) -> FileInfo:
    from ..golden import is_dynamic
    from ..verify import is_decode_file

    plans = {plan.name: plan for plan in pte.program.execution_plan}
    if "forward" not in plans:
        raise EvalError(f"the .pte has no forward method (methods: {', '.join(plans)})",
                        "eval scores files exported by qlower export (or ExecuTorch's export_llama)")
    if is_decode_file(pte):
        from .generate import read_decode_file

        decode = read_decode_file(pte)
        return FileInfo(True, decode.metadata, decode.max_seq_len or None, None, False)
    plan = plans["forward"]
    specs = [plan.values[i].val for i in plan.inputs]
    tensors = [s for s in specs if type(s).__name__ == "Tensor"]
    if len(tensors) != 1 or len(tensors[0].sizes) != 2 or tensors[0].scalar_type.name not in ("LONG", "INT"):
        raise EvalError("the .pte's forward does not take token ids [1, T] alone, and has no KV-cache decode method",
                        "export the language model with --kv-cache (a Hugging Face folder's default)")
    spec = tensors[0]
    bound = int(spec.sizes[1])
    outputs = [plan.values[i].val for i in plan.outputs]
    out = outputs[0] if outputs else None
    all_positions = out is not None and type(out).__name__ == "Tensor" and len(out.sizes) == 3 and int(out.sizes[1]) == bound
    return FileInfo(False, {}, bound, None if is_dynamic(spec) else bound, all_positions)


def check_window(info: FileInfo, tokens: int, scoring_file: bool) -> None:
    if info.decode:
        if info.max_tokens is not None and tokens > info.max_tokens:
            raise EvalError(f"--tokens {tokens} exceeds the file's max sequence length {info.max_tokens}",
                            f"use --tokens {info.max_tokens} or less, or export with a larger --max-seq-len")
        return
    if not scoring_file:
        return
    if not info.all_positions:
        raise EvalError("the .pte has no KV-cache decode method and its forward returns only the last position's logits: "
                        "it cannot be scored token by token", "export it with --kv-cache, or pass --skip file")
    if info.static_tokens is not None and tokens != info.static_tokens:
        raise EvalError(f"the .pte takes exactly {info.static_tokens} tokens a call (static shape), not --tokens {tokens}",
                        f"use --tokens {info.static_tokens}, or export with --kv-cache")
    if info.max_tokens is not None and tokens > info.max_tokens:
        raise EvalError(f"--tokens {tokens} exceeds the {info.max_tokens} tokens the .pte takes a call",
                        f"use --tokens {info.max_tokens} or less")


def golden_scorer(pte: Pte, info: FileInfo) -> Scorer:
    """The file by the golden executor: one token a call through its cache, or the whole window at once."""
    from .generate import GoldenDecoder

    decoder = GoldenDecoder(pte)
    if info.decode:
        def score(window: list[int]) -> torch.Tensor:
            decoder.reset()
            return torch.stack([decoder(torch.tensor([[token]], dtype=torch.long), pos) for pos, token in enumerate(window[:-1])])
        return score

    def score_prefill(window: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return decoder.golden.run((torch.tensor([window], dtype=torch.long),))[0][0, :-1].float()
    return score_prefill


def runner_scorer(runner: str | Path, pte_path: Path, vocab: int | None) -> Scorer:
    """The file on the real runtime: one llm_step_runner process a window, teacher forcing.

    The first token is the prompt (a one-token prefill at position 0), the rest are fed one a call;
    the runner writes every call's logits, of which the first T-1 predict tokens 1..T-1.
    """
    import numpy as np

    def score(window: list[int]) -> torch.Tensor:
        with tempfile.TemporaryDirectory(prefix="qlower-eval-") as tmp:
            out = Path(tmp) / "logits.bin"
            cmd = [str(runner), "--model", str(pte_path), "--prompt", str(window[0]), "--steps", str(len(window) - 1),
                   "--feed", ",".join(map(str, window[1:])), "--out", str(out)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as exc:
                raise EvalError(f"cannot run {runner}: {exc}", "pass --runner the path of llm_step_runner (tools/llm_step_runner)") from exc
            if proc.returncode != 0:
                lines = [line for line in proc.stderr.splitlines() if line.strip()]
                raise EvalError(f"the runner failed (exit {proc.returncode}): {lines[-1] if lines else 'no message'}",
                                "run it alone with LLM_STEP_RUNNER_LOG=1 to see the runtime's log; is VK_ICD_FILENAMES set?")
            try:
                doc = json.loads(proc.stdout)
                n_vocab = int(doc["vocab"])
            except (ValueError, KeyError, TypeError) as exc:
                raise EvalError(f"the runner's output is not its JSON document: {proc.stdout[:200]!r}",
                                "pass --runner the path of llm_step_runner (tools/llm_step_runner)") from exc
            if vocab is not None and n_vocab != vocab:
                raise EvalError(f"the runner reports a vocabulary of {n_vocab}, the file {vocab}", "is --runner the right program?")
            logits = np.fromfile(out, dtype=np.float32).reshape(len(window), n_vocab)
        return torch.from_numpy(logits[:-1].copy())
    return score


# --- the eager models ----------------------------------------------------------------------------


def float_scorer(module: torch.nn.Module) -> Scorer:
    from .kv_cache import full_logits

    def score(window: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return full_logits(module, torch.tensor([window], dtype=torch.long))[0, :-1].float()
    return score


def decoder_scorer(lm) -> Scorer:
    """A :class:`~qlower.llm.kv_cache.KVCacheLM` fed one token a call, its cache reset before each window."""
    def score(window: list[int]) -> torch.Tensor:
        lm.attention.reset()
        with torch.no_grad():
            rows = [lm(torch.tensor([[token]], dtype=torch.long), torch.tensor([pos]))[0] for pos, token in enumerate(window[:-1])]
        return torch.stack(rows).float()
    return score


# --- eval ------------------------------------------------------------------------------------------


def perplexity_of(nll: float, count: int) -> float:
    return math.exp(nll / count)


def score_windows(name: str, scorer: Scorer, windows: list[list[int]],
                  on_progress: Callable[[str, int, int], None]) -> dict[str, Any]:
    """Run one scorer over every window: perplexity, per-window values and their spread, time."""
    per_token = len(windows[0]) - 1
    total = per_token * len(windows)
    on_progress(name, 0, total)
    started = time.perf_counter()
    nlls = []
    for i, window in enumerate(windows):
        nlls.append(window_nll(scorer(window), window))
        on_progress(name, (i + 1) * per_token, total)
    seconds = time.perf_counter() - started
    per_window = [perplexity_of(n, per_token) for n in nlls]
    mean = sum(per_window) / len(per_window)
    return {
        "perplexity": perplexity_of(sum(nlls), total),
        "nll": sum(nlls) / total,
        "scored": total,
        "window_perplexity": per_window,
        "spread": {"min": min(per_window), "max": max(per_window),
                   "std": math.sqrt(sum((p - mean) ** 2 for p in per_window) / len(per_window))},
        "seconds": seconds,
        "ms_per_token": 1000.0 * seconds / total,
    }


def parse_skip(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise EvalError(f"--skip {unknown[0]!r}: not one of {', '.join(PARTS)}", "e.g. --skip float,quantized")
    if set(names) >= set(PARTS):
        raise EvalError("--skip leaves nothing to score", f"skip at most two of {', '.join(PARTS)}")
    return tuple(n for n in PARTS if n in names)


def evaluate(model_path: str | Path, pte_path: str | Path, *, text: str | Path | None = None,
             text_ids: str | Path | None = None, tokens: int = DEFAULT_TOKENS, windows: int = DEFAULT_WINDOWS,
             spread: bool = False, skip: str | Iterable[str] | None = None, runner: str | Path | None = None,
             scheme: str | None = None, group_size: int | None = None, config: str | Path | None = None,
             entry: str | None = None, checkpoint: str | Path | None = None, seed: int = 0,
             weight_algorithm: str | None = None, calibration_text: str | Path | None = None,
             calibration_tokens: int | None = None,
             on_progress: Callable[[str, int, int], None] = lambda part, done, total: None,
             warn: Callable[[str], None] = lambda message: None, **overrides: Any) -> dict[str, Any]:
    """Perplexity of the float model, the quantized eager model and the file on the same windows of text.

    ``overrides`` are further export options (ExportOptions fields) for the quantized model, as export
    takes them; scheme, group size and the int4 weight algorithm (with its calibration) default to what
    the file holds. ``on_progress(part, done, total)``
    hears of scored tokens.
    """
    from ..provenance import algorithm_options, infer_scheme, options_for
    from .hf_folder import is_hf_folder, load_tokenizer, read_hf_folder

    if (text is None) == (text_ids is None):
        raise EvalError("give exactly one of --text and --text-ids", "--text FILE (tokenized by the model folder's tokenizer) or --text-ids FILE")
    if tokens < 2:
        raise EvalError(f"--tokens {tokens}: a window needs at least 2 tokens (the first is not scored)", "use e.g. --tokens 256")
    skipped = parse_skip(skip)
    parts = [p for p in PARTS if p not in skipped]
    if runner is not None and "file" not in parts:
        raise EvalError("--runner runs the file, which --skip file leaves out", "drop one of them")
    pte = read_pte(pte_path)
    info = describe_file(pte)
    check_window(info, tokens, "file" in parts)
    if runner is not None and not info.decode:
        raise EvalError("--runner steps KV-cache files; this .pte has no decode method", "export with --kv-cache, or drop --runner")

    folder = read_hf_folder(model_path) if is_hf_folder(model_path) else None
    if text is not None:
        tokenizer = load_tokenizer(folder, "pass --text-ids FILE (whitespace-separated token ids) instead")
        if tokenizer is None:
            raise EvalError(f"{model_path} has no tokenizer to read --text with",
                            "pass --text-ids FILE (whitespace-separated token ids), or a Hugging Face folder with tokenizer files")
        ids = tokenize(tokenizer, text)
    else:
        ids = read_token_ids(text_ids)
    if info.vocab is not None and any(i >= info.vocab for i in ids):
        raise EvalError(f"the text holds token id {max(ids)}, the file's vocabulary is {info.vocab}",
                        "tokenize with the model's own tokenizer")
    starts = window_starts(len(ids), tokens, windows, spread)
    chunks = [ids[s:s + tokens] for s in starts]

    scheme_name, inferred_group, _ = infer_scheme(pte)
    options = None
    results: dict[str, dict[str, Any]] = {}
    if "float" in parts or "quantized" in parts:
        from .load import load_any

        options = options_for(pte, scheme=scheme, group_size=group_size, config=config, seed=seed, kv_cache=info.decode,
                              max_seq_len=info.max_tokens if info.decode else None,
                              algorithm=algorithm_options(pte, model_path, weight_algorithm, calibration_text, calibration_tokens),
                              **overrides)
        torch.manual_seed(options.seed)  # as export's load stage, for models that do not seed themselves
        loaded, folder, _ = load_any(model_path, options, entry=entry, checkpoint=checkpoint, warn=warn)
        if "float" in parts:
            results["float"] = score_windows("float", float_scorer(loaded.module), chunks, on_progress)
        if "quantized" in parts:
            results["quantized"] = score_windows("quantized", _quantized_scorer(loaded, folder, options, info, warn), chunks, on_progress)
        del loaded  # the eager model's memory, before the file's run
    if "file" in parts:
        scorer = runner_scorer(runner, Path(pte_path), info.vocab) if runner is not None else golden_scorer(pte, info)
        results["file"] = score_windows("file", scorer, chunks, on_progress)

    used_scheme = options.scheme if options is not None else scheme or scheme_name
    used_group = options.group_size if options is not None else group_size or inferred_group
    ppl = {p: results[p]["perplexity"] if p in results else None for p in PARTS}
    delta = {p: (100.0 * (ppl[p] / ppl["float"] - 1.0) if ppl[p] is not None and ppl["float"] is not None else None)
             for p in ("quantized", "file")}
    return {
        "model": str(model_path),
        "pte": str(pte_path),
        "scheme": used_scheme,
        "group_size": used_group if used_scheme in GROUPED_SCHEMES else None,
        "file_kind": "decode" if info.decode else "prefill",
        "perplexity": ppl,
        "delta_pct": delta,
        "windows": len(chunks),
        "tokens": tokens,
        "scored": len(chunks) * (tokens - 1),
        "text_tokens": len(ids),
        "window_starts": starts,
        "spread_windows": spread,
        "skipped": list(skipped),
        "runner": str(runner) if runner is not None else None,
        "file_executor": None if "file" not in parts else ("runtime" if runner is not None else "golden"),
        "parts": results,
    }


def _quantized_scorer(loaded, folder, options, info: FileInfo, warn) -> Scorer:
    """The model quantized by export's own function (in place: the float part has run), fed as the file is."""
    from ..quantize import quantize_model
    from .load import decoder_for

    quantized, _ = quantize_model(loaded, options, warn)
    if not info.decode:
        return float_scorer(quantized)
    lm, _ = decoder_for(quantized, loaded, folder, options, warn)
    return decoder_scorer(lm)
