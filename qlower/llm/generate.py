"""``qlower generate``: greedy decoding with the golden executor, next to the eager models.

Three decoders generate from the same prompt:

* the ``.pte`` run by the golden executor (the serialized graph op by op, the
  KV cache kept in the file's cache constants across calls, fed exactly as
  ExecuTorch's LLM runner feeds it: the prompt in one call, then one token a
  call with its position);
* the eager model quantized as export quantizes it, decoding with its own KV
  cache (:class:`~qlower.llm.kv_cache.KVCacheLM`);
* the float model, recomputing the whole sequence at every step (no cache:
  the reference a cache bug cannot hide from).

Tokens are each decoder's own greedy choices. Per step, the logits are
compared on the same inputs (the golden executor's tokens fed to the eager
models), so a step's SQNR measures the file, not a divergence earlier on.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ExportOptions, make_options
from ..errors import VerifyError
from ..metrics import conclude, quality_finding, sqnr_db, thresholds_for
from ..golden import GoldenExecutor
from ..pte import Pte, read_pte


@dataclass
class DecodeFile:
    """A KV-cache .pte and its runner metadata."""

    pte: Pte
    metadata: dict[str, Any]

    @property
    def max_seq_len(self) -> int:
        return int(self.metadata.get("get_max_seq_len", 0))


def read_decode_file(source) -> DecodeFile:
    pte = source if isinstance(source, Pte) else read_pte(source)
    golden = GoldenExecutor(pte)
    names = golden.method_names()
    if "forward" not in names or "use_kv_cache" not in names:
        raise VerifyError("the .pte is not a KV-cache decoder (no use_kv_cache method)",
                          "export it with --kv-cache (default for a Hugging Face folder)")
    return DecodeFile(pte, read_metadata(golden))


def read_metadata(golden: GoldenExecutor) -> dict[str, Any]:
    """Every method without inputs is a constant: its value(s)."""
    meta = {}
    for plan in golden.pte.program.execution_plan:
        if plan.name != "forward" and not plan.inputs:
            values = golden.run((), method=plan.name)
            meta[plan.name] = values[0] if len(values) == 1 and not plan.name.endswith("_ids") else list(values)
    return meta


class GoldenDecoder:
    """The file's forward method, called as ExecuTorch's LLM runner calls it."""

    def __init__(self, pte: Pte):
        self.golden = GoldenExecutor(pte)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        with torch.no_grad():
            return self.golden.run((tokens, torch.tensor([pos], dtype=torch.long)))[0][0].float()

    def reset(self) -> None:
        self.golden.reset()


def greedy(step: Callable[[torch.Tensor, int], torch.Tensor], prompt: list[int], new_tokens: int,
           stop: set[int] = frozenset()) -> tuple[list[int], list[torch.Tensor]]:
    """(generated tokens, logits of each call): the prompt in one call, then one token a call."""
    tokens, logits = [], []
    out = step(torch.tensor([prompt], dtype=torch.long), 0)
    pos = len(prompt)
    for _ in range(new_tokens):
        logits.append(out)
        token = int(out.argmax())
        tokens.append(token)
        if token in stop or len(tokens) == new_tokens:
            break
        out = step(torch.tensor([[token]], dtype=torch.long), pos)
        pos += 1
    return tokens, logits


def teacher_forced(step: Callable[[torch.Tensor, int], torch.Tensor], prompt: list[int], fed: list[int]) -> list[torch.Tensor]:
    """Logits of each call when ``fed`` (all but the last generated token) follows the prompt."""
    logits = [step(torch.tensor([prompt], dtype=torch.long), 0)]
    for i, token in enumerate(fed):
        logits.append(step(torch.tensor([[token]], dtype=torch.long), len(prompt) + i))
    return logits


def generate(model_path: str | Path, pte_path, prompt_ids: list[int] | None = None, *, prompt: str | None = None,
             max_new_tokens: int = 8, config: str | Path | None = None, entry: str | None = None,
             checkpoint: str | Path | None = None, seed: int = 0, min_sqnr_float: float | None = None,
             min_sqnr_quantized: float | None = None, options: ExportOptions | None = None, bos: bool = False,
             warn: Callable[[str], None] = lambda message: None, weight_algorithm: str | None = None,
             calibration_text: str | Path | None = None, calibration_tokens: int | None = None) -> dict[str, Any]:
    """Greedy decoding of the file beside the eager models.

    ``report["defects"]``: steps whose logits are below the vs-quantized bar (the file does not
    decode as the quantized model does); ``report["quality"]``: the worst step vs float (see
    :mod:`qlower.metrics`). ``report["ok"]`` is False on a defect, or below ``min_sqnr_float`` when given.

    A text ``prompt`` is encoded as ExecuTorch's LLM runner encodes it: the tokenizer adds no
    special tokens; ``bos`` prepends the file's ``get_bos_id`` (the runner's ``--num_bos 1``).
    The int4 weight algorithm (and its calibration) defaults to the file's record.

    The eager models are quantized with ``options`` (an export's own), else as
    read from the file (scheme, group size, embeddings, weight algorithm and its calibration, unless given) and ``config``.
    """
    from ..provenance import algorithm_options, infer_scheme
    from .hf_folder import load_tokenizer
    from .load import load_any

    decode = read_decode_file(pte_path)
    if options is None:
        scheme, group_size, embeddings = infer_scheme(decode.pte)
        options = make_options(config, scheme=None if config else scheme, group_size=None if config else group_size,
                               quantize_embeddings=None if config else (embeddings or None), seed=seed,
                               **algorithm_options(decode.pte, model_path, weight_algorithm, calibration_text, calibration_tokens))
    options = dataclasses.replace(options, kv_cache=True, max_seq_len=decode.max_seq_len or options.max_seq_len)
    torch.manual_seed(options.seed)
    loaded, folder, _ = load_any(model_path, options, entry=entry, checkpoint=checkpoint)
    tokenizer = load_tokenizer(folder, "pass --prompt-ids instead") if prompt is not None else None
    if prompt is not None:
        if tokenizer is None:
            raise VerifyError("--prompt needs a tokenizer; the model has none", "pass --prompt-ids 1,2,3")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if bos:
        if decode.metadata.get("get_bos_id") is None:
            raise VerifyError("--bos: the file has no get_bos_id", "put the BOS id first in --prompt-ids, or export with --metadata '{\"get_bos_id\": 1}'")
        prompt_ids = [int(decode.metadata["get_bos_id"])] + list(prompt_ids or [])
    if not prompt_ids:
        raise VerifyError("the prompt is empty", "pass --prompt-ids 1,2,3 (or --prompt TEXT with a tokenizer)")
    vocab = int(decode.metadata.get("get_vocab_size", 0)) or None
    if vocab is not None and any(not 0 <= t < vocab for t in prompt_ids):
        raise VerifyError(f"prompt token ids must be in 0..{vocab - 1}", "the file's vocabulary is smaller")
    if decode.max_seq_len and len(prompt_ids) + max_new_tokens > decode.max_seq_len:
        raise VerifyError(f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens exceed the file's max_seq_len {decode.max_seq_len}",
                          "use a shorter prompt or fewer --max-new-tokens, or export with a larger --max-seq-len")
    float_lm, quant_lm = _eager_decoders(loaded, folder, options, warn)
    stop = set(decode.metadata.get("get_eos_ids", []) or [])

    golden = GoldenDecoder(decode.pte)
    tokens, golden_logits = greedy(golden, prompt_ids, max_new_tokens, stop)

    def quant_step(t, pos):
        with torch.no_grad():
            return quant_lm(t, torch.tensor([pos]))[0].float()

    def float_step(t, pos):  # no cache: the whole sequence so far
        nonlocal float_seq
        float_seq = float_seq[:pos] + t[0].tolist()
        with torch.no_grad():
            return float_lm.full_logits(torch.tensor([float_seq]))[0, -1].float()

    float_seq: list[int] = []
    eager_tokens, _ = greedy(quant_step, prompt_ids, max_new_tokens, stop)
    quant_lm.attention.reset()
    float_tokens, _ = greedy(float_step, prompt_ids, max_new_tokens, stop)
    quant_forced = teacher_forced(quant_step, prompt_ids, tokens[:-1])
    quant_lm.attention.reset()
    with torch.no_grad():
        float_all = float_lm.full_logits(torch.tensor([prompt_ids + tokens[:-1]]))[0].float()
    float_forced = [float_all[len(prompt_ids) - 1 + i] for i in range(len(tokens))]

    thresholds = thresholds_for(options.scheme, min_sqnr_float, min_sqnr_quantized)
    steps, defects = [], []
    for i, (g, q, f) in enumerate(zip(golden_logits, quant_forced, float_forced)):
        step = {"pos": len(prompt_ids) - 1 + i, "sqnr_vs_quantized": sqnr_db(q, g), "sqnr_vs_float": sqnr_db(f, g)}
        steps.append(step)
        if step["sqnr_vs_quantized"] < thresholds.vs_quantized:
            defects.append(f"step {i} logits {step['sqnr_vs_quantized']:.1f} dB vs quantized eager < {thresholds.vs_quantized:g} dB")
    quality = quality_finding(min((s["sqnr_vs_float"] for s in steps), default=None), thresholds.vs_float,
                              enforced=min_sqnr_float is not None)
    report = {
        "model": str(model_path),
        "pte": str(pte_path) if isinstance(pte_path, (str, Path)) else "<bytes>",
        "scheme": options.scheme,
        "prompt_ids": list(prompt_ids),
        "tokens": tokens,
        "eager_tokens": eager_tokens,
        "float_tokens": float_tokens,
        "agree": _leading_equal(tokens, eager_tokens),
        "agree_float": _leading_equal(tokens, float_tokens),
        "steps": steps,
        "thresholds": {"vs_quantized": thresholds.vs_quantized, "vs_float": thresholds.vs_float},
        "defects": defects,
        "quality": quality,
        "metadata": decode.metadata,
    }
    conclude(report, ok_key="ok", what="step")
    if tokenizer is not None:
        report["prompt"] = prompt
        report["text"] = tokenizer.decode(tokens)
        report["eager_text"] = tokenizer.decode(eager_tokens)
        report["float_text"] = tokenizer.decode(float_tokens)
    return report


def _eager_decoders(loaded, folder, options, warn):
    """(float decoder without quantization, decoder quantized as export does)."""
    from ..quantize import quantize_model
    from .kv_cache import KVCacheLM
    from .load import decoder_for

    float_module = copy.deepcopy(loaded.module)
    quantized, _ = quantize_model(loaded, options, warn)
    quant_lm, _ = decoder_for(quantized, loaded, folder, options, warn)
    float_lm = KVCacheLM(float_module, quant_lm.max_seq_len, shapes=quant_lm.attention.shapes)
    return float_lm, quant_lm


def _leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

