"""From a loaded causal LM to the KV-cache decoder that is exported, and the runner metadata it carries."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import DEFAULT_MAX_SEQ_LEN, ExportOptions, parse_metadata
from ..errors import ModelLoadError
from ..metrics import sqnr_db
from .kv_cache import KVCacheLM

# The float model behind a KV cache must reproduce its own (uncached) logits this
# closely: float32 summation-order noise is ~140 dB, a position or mask the cache
# cannot hold is below 20 dB.
SELF_CHECK_MIN_SQNR_DB = 80.0
# The same check on a quantized model (a model file streamed from its checkpoint is never whole in
# float): per-token int8 rounding ties may land differently in a chunked prefill and move the logits
# (~24 dB at 16 layers, see DESIGN.md section 8); positions taken from the chunk are below 20 dB.
SELF_CHECK_QUANTIZED_MIN_SQNR_DB = 20.0


def max_seq_len_for(options: ExportOptions, max_positions: int | None) -> int:
    if options.max_seq_len is not None:
        if max_positions is not None and options.max_seq_len > max_positions:
            raise ModelLoadError(f"--max-seq-len {options.max_seq_len} exceeds the model's {max_positions} positions",
                                 f"use --max-seq-len {max_positions} or less")
        return options.max_seq_len
    return min(max_positions or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)


def check_sliding_window(config, max_seq_len: int) -> None:
    """Sliding-window layers attend to the last W positions only; the cache attends to all."""
    if config is None:
        return
    text = getattr(config, "get_text_config", lambda: config)()
    window = getattr(text, "sliding_window", None)
    if not window:
        return
    layer_types = getattr(text, "layer_types", None) or []
    sliding = "sliding_attention" in layer_types if layer_types else getattr(text, "use_sliding_window", True)
    if sliding and max_seq_len > window:
        raise ModelLoadError(f"the model's sliding-window attention (window {window}) differs from full attention past {window} positions",
                             f"use --max-seq-len {window} or less")


def make_decoder(model: nn.Module, options: ExportOptions, max_positions: int | None, config=None) -> KVCacheLM:
    """Wrap ``model`` with a static KV cache of ``--max-seq-len`` positions."""
    max_seq_len = max_seq_len_for(options, max_positions)
    check_sliding_window(config, max_seq_len)
    return KVCacheLM(model, max_seq_len)


def check_cache_matches(model: nn.Module, prompt: int = 3, steps: int = 2, min_sqnr: float = SELF_CHECK_MIN_SQNR_DB) -> None:
    """The float ``model`` behind a small KV cache, prefill + decode, must give its own uncached logits.

    Catches what a family does that a position-indexed causal cache cannot
    hold (positions computed from the chunk, attention that is not causal
    self-attention) before anything is quantized or exported. Run on the
    float model: quantized, a per-token rounding tie that lands differently in
    a chunked prefill legitimately moves deep models' logits.
    """
    lm = KVCacheLM(model, prompt + steps)
    vocab = _vocab_size(lm)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, prompt + steps), generator=gen)
    with torch.no_grad():
        full = lm.full_logits(tokens)
        cached = [lm(tokens[:, :prompt], torch.tensor([0]))]
        for pos in range(prompt, prompt + steps):
            cached.append(lm(tokens[:, pos:pos + 1], torch.tensor([pos])))
    want = full[0, prompt - 1:]
    got = torch.cat(cached)
    agreement = sqnr_db(want, got)
    if agreement < min_sqnr:
        raise ModelLoadError(f"with a KV cache the model's logits differ from its own forward ({agreement:.1f} dB SQNR)",
                             "its attention or positions depend on the whole sequence being present; export without --kv-cache")


def _vocab_size(lm: KVCacheLM) -> int:
    from .kv_cache import shape_only

    def run():
        with torch.no_grad():
            return lm.full_logits(torch.zeros(1, 1, dtype=torch.long))

    return int(shape_only(run, fallback=run).shape[-1])


def runner_metadata(lm: KVCacheLM, options: ExportOptions, token_ids: dict[str, Any] | None,
                    from_model: dict[str, Any] | None, warn: Callable[[str], None]) -> dict[str, Any]:
    """The constant methods of the file: derived values, then the model file's, then ``--metadata``."""
    meta: dict[str, Any] = {
        "get_max_seq_len": lm.max_seq_len,
        "get_max_context_len": lm.max_seq_len,
        "get_vocab_size": _vocab_size(lm),
        "get_n_layers": lm.attention.n_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    token_ids = token_ids or {}
    if token_ids.get("bos") is not None:
        meta["get_bos_id"] = int(token_ids["bos"])
    if token_ids.get("eos"):
        meta["get_eos_ids"] = [int(e) for e in token_ids["eos"]]
    meta.update(from_model or {})
    if options.metadata:
        meta.update(parse_metadata(options.metadata))
    missing = [k for k in ("get_bos_id", "get_eos_ids") if k not in meta]
    if missing:
        warn(f"no {' or '.join(missing)} for the runner: the model does not say; pass --metadata '{{\"get_bos_id\": 1, \"get_eos_ids\": [2]}}'")
    return meta
