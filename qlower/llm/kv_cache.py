"""A static KV cache around any causal decoder: ``forward(tokens[1, T], input_pos[1]) → logits[1, vocab]``.

The contract is ExecuTorch's LLM runner's (``extension/llm/runner``): ``tokens``
int64 ``[1, T]`` with T in 1..max_seq_len (a whole prompt in one call, then one
token per call), ``input_pos`` int64 ``[1]`` the position of ``tokens[:, 0]``,
and the logits of the last position only.

Attention is routed into one place, :class:`CacheAttention`, whichever way the
model computes it:

* Hugging Face ``transformers`` models: a registered attention function
  (``AttentionInterface``), which receives ``q, k, v`` after RoPE and before
  grouped-query heads are repeated, with ``module.layer_idx``;
* model files: every ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``
  call, counted in call order (layer 0 first).

Each layer's keys and values are written into a ``[1, max_seq_len, kv_heads,
head_dim]`` buffer with ``llama::update_cache`` and attended with
``llama::custom_sdpa`` — the pair ET-VK's ``causal_sdpa`` pattern fuses into
``sdpa_with_kv_cache``, whose cache then lives inside the Vulkan delegate
between calls. ET-VK's SDPA always scales by ``1/sqrt(head_dim)``, so a model
with another scale (Gemma's ``query_pre_attn_scalar``) has its queries
pre-multiplied by the ratio.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError

ATTN_IMPLEMENTATION = "qlower_kv_cache"
_ACTIVE: list["CacheAttention"] = []  # the cache attention of the forward being run


def load_llm_custom_ops() -> None:
    """Register ``llama::update_cache`` / ``custom_sdpa`` / ``sdpa_with_kv_cache`` (CPU kernels included)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


@dataclass(frozen=True)
class LayerCacheShape:
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


class CacheAttention(nn.Module):
    """Per-layer K/V caches and the attention that reads them."""

    def __init__(self, shapes: list[LayerCacheShape], max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.shapes = shapes
        for i, s in enumerate(shapes):
            size = (1, max_seq_len, s.kv_heads, s.head_dim)
            self.register_buffer(f"k_cache_{i}", torch.zeros(size, dtype=s.dtype), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(size, dtype=s.dtype), persistent=False)
        self.start_pos: Any = 0
        self._calls = 0

    @property
    def n_layers(self) -> int:
        return len(self.shapes)

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()

    def attend(self, layer: int | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """``q [1, Hq, T, D]``, ``k, v [1, Hkv, T, D]`` → ``[1, T, Hq, D]`` over the cache."""
        if layer is None:
            layer = self._calls
        self._calls += 1
        if layer >= self.n_layers:
            raise ModelLoadError(f"attention layer {layer} has no KV cache (the model has {self.n_layers} attention calls)",
                                 "the decoder must run each attention layer once per forward")
        k_cache, v_cache = getattr(self, f"k_cache_{layer}"), getattr(self, f"v_cache_{layer}")
        head_dim = q.shape[-1]
        if scale is not None and not math.isclose(scale, 1.0 / math.sqrt(head_dim), rel_tol=1e-6):
            q = q * (scale * math.sqrt(head_dim))
        q, k, v = (t.transpose(1, 2).to(k_cache.dtype) for t in (q, k, v))
        torch.ops.llama.update_cache(k, k_cache, self.start_pos)
        torch.ops.llama.update_cache(v, v_cache, self.start_pos)
        return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, self.start_pos, None, 0, True)

    @contextlib.contextmanager
    def active(self, start_pos) -> Iterator["CacheAttention"]:
        self.start_pos, self._calls = start_pos, 0
        try:
            with attention_to(self):
                yield self
        finally:
            self.start_pos = 0


# --- how attention reaches CacheAttention ----------------------------------------------


_original_sdpa = F.scaled_dot_product_attention


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` while a cache is active: causal self-attention goes to the cache."""
    if not _ACTIVE:
        return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None or not is_causal:
        raise ModelLoadError("the model calls scaled_dot_product_attention without is_causal=True (or with a mask); "
                             "a KV cache needs plain causal self-attention",
                             "call F.scaled_dot_product_attention(q, k, v, is_causal=True), or export without --kv-cache")
    out = _ACTIVE[-1].attend(None, query, key, value, scale)
    return out.transpose(1, 2)  # back to SDPA's [B, H, T, D]


@contextlib.contextmanager
def attention_to(target) -> Iterator[Any]:
    """Within the block, a transformers model's attention and every causal SDPA call go to ``target.attend``."""
    _ACTIVE.append(target)
    try:
        with _sdpa_routed():
            yield target
    finally:
        _ACTIVE.pop()


@contextlib.contextmanager
def _sdpa_routed() -> Iterator[None]:
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _routed_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function (``AttentionInterface``) that attends over the KV cache."""
    if not _ACTIVE:  # the wrapped model called on its own: plain SDPA, no cache
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ModelLoadError("attention logit soft-capping has no ET-VK kernel", "this family cannot be exported with --kv-cache")
    out = _ACTIVE[-1].attend(getattr(module, "layer_idx", None), query, key, value, scaling)
    return out, None


# --- RoPE as one ET-VK op -------------------------------------------------------------
#
# transformers' decoders rotate q and k with a module-level
# ``apply_rotary_pos_emb(q, k, cos, sin, ...)`` of their modeling file: a dozen
# elementwise ops per layer on the device. ET-VK has the same computation as
# one shader (``et_vk.apply_rotary_emb_hf``). A modeling file whose function is
# numerically the rotate-half RoPE (checked on random inputs, full and partial
# rotary dims) gets it swapped for the op while a cached forward runs.


def _rope_reference(q, k, cos, sin):
    """Rotate-half RoPE over the first ``cos.shape[-1]`` dims of q, k ``[B, H, T, D]``; cos, sin ``[B, T, R]``."""
    def rotate(x):
        r = cos.shape[-1]
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((x_rot * cos.unsqueeze(1) + rotated * sin.unsqueeze(1), x_pass), dim=-1)

    return rotate(q), rotate(k)


def _rope_op(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """``apply_rotary_pos_emb`` through ``et_vk.apply_rotary_emb_hf`` (which takes ``[B, T, H, D]``)."""
    import executorch.backends.vulkan.custom_ops_lib  # noqa: F401  registers torch.ops.et_vk

    if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[0] != 1:
        return _rope_reference(q, k, cos, sin)
    oq, ok = torch.ops.et_vk.apply_rotary_emb_hf(q.transpose(1, 2), k.transpose(1, 2), cos[0], sin[0], 0)
    return oq.transpose(1, 2), ok.transpose(1, 2)


def rope_modules(model: nn.Module) -> list[Any]:
    """The modeling files of ``model`` whose ``apply_rotary_pos_emb`` is rotate-half RoPE."""
    import sys

    found = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is not None and module not in found and _is_rotate_half(fn):
            found.append(module)
    return found


def _is_rotate_half(fn) -> bool:
    """Full rotary dims must match the reference; partial ones must match or be refused by ``fn``
    (a function that cannot take them is never called with them)."""
    gen = torch.Generator().manual_seed(0)
    for rotary in (16, 8):
        q, k = torch.randn(1, 4, 3, 16, generator=gen), torch.randn(1, 2, 3, 16, generator=gen)
        cos, sin = torch.randn(1, 3, rotary, generator=gen), torch.randn(1, 3, rotary, generator=gen)
        try:
            got = fn(q, k, cos, sin)
        except Exception:  # another signature or convention
            if rotary == 16:
                return False
            continue
        want = _rope_reference(q, k, cos, sin)
        if not all(isinstance(g, torch.Tensor) and g.shape == w.shape and torch.allclose(g, w, atol=1e-6)
                   for g, w in zip(got, want)):
            return False
    return True


@contextlib.contextmanager
def _rope_swapped(modules: list[Any]) -> Iterator[None]:
    saved = [(m, m.apply_rotary_pos_emb) for m in modules]
    for m, _ in saved:
        m.apply_rotary_pos_emb = _rope_op
    try:
        yield
    finally:
        for m, fn in saved:
            m.apply_rotary_pos_emb = fn


def _mask(*args, **kwargs):
    """Inside a cached forward the cache is causal by position: no mask; outside, SDPA's own."""
    if _ACTIVE:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_hf_attention() -> None:
    """Make ``attn_implementation="qlower_kv_cache"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
    except ImportError:  # older transformers build their masks inside the attention
        pass


# --- the wrapper --------------------------------------------------------------------------


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation") and hasattr(model, "generation_config")


def full_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A causal LM (transformers', or a module taking tokens [and input_pos]) on the whole sequence
    from position 0, no cache: logits ``[1, T, vocab]``."""
    if is_hf_model(model):
        return model(input_ids=tokens, use_cache=False, return_dict=True).logits
    if "input_pos" in inspect.signature(model.forward).parameters:
        return model(tokens, torch.zeros(1, dtype=torch.long))
    return model(tokens)


class KVCacheLM(nn.Module):
    """``forward(tokens[1, T], input_pos[1]) → logits[1, vocab]`` with a static KV cache.

    ``model`` is a ``*ForCausalLM`` (transformers) or a module whose
    ``forward(tokens)`` (optionally ``forward(tokens, input_pos)``) returns
    logits ``[1, T, vocab]`` and calls causal SDPA once per layer.
    """

    def __init__(self, model: nn.Module, max_seq_len: int, shapes: list[LayerCacheShape] | None = None):
        super().__init__()
        load_llm_custom_ops()
        from ..hf import CausalLMLogits

        self.source_prefix = ""  # where ``model`` sits in the module that was loaded and quantized
        if isinstance(model, CausalLMLogits):  # a recipe's input_ids → logits wrapper: decode the LM inside
            model, self.source_prefix = model.lm, "lm."
        self.model = model
        self.hf = is_hf_model(model)
        if self.hf:
            register_hf_attention()
            model.config._attn_implementation = ATTN_IMPLEMENTATION
            for sub in model.modules():  # sub-configs (text_config) too
                cfg = getattr(sub, "config", None)
                if cfg is not None and hasattr(cfg, "_attn_implementation"):
                    cfg._attn_implementation = ATTN_IMPLEMENTATION
        self.takes_input_pos = not self.hf and "input_pos" in inspect.signature(model.forward).parameters
        self._rope_modules = rope_modules(model) if self.hf else []
        self.attention = CacheAttention(shapes if shapes is not None else probe_cache_shapes(self), max_seq_len)

    @property
    def max_seq_len(self) -> int:
        return self.attention.max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        seq_len = tokens.shape[1]
        torch._check_is_size(start)
        torch._check(start + seq_len <= self.max_seq_len)
        with self.attention.active(start), _rope_swapped(self._rope_modules):
            return self._logits(tokens, input_pos, start, seq_len)

    def _logits(self, tokens, input_pos, start, seq_len) -> torch.Tensor:
        if self.hf:
            positions = (torch.arange(seq_len, dtype=torch.long) + input_pos[0]).unsqueeze(0)
            out = self.model(input_ids=tokens, position_ids=positions, use_cache=False, logits_to_keep=1, return_dict=True)
            logits = out.logits
        elif self.takes_input_pos:
            logits = self.model(tokens, input_pos)
        else:
            logits = self.model(tokens)
        return logits[:, -1, :]

    def source_name(self, fqn: str) -> str:
        """A module name in this wrapper's graph → its name in the loaded model (per-layer report, overrides)."""
        return self.source_prefix + fqn.removeprefix("model.") if fqn.startswith("model.") else fqn

    def describe(self) -> dict[str, Any]:
        """The cache as the summary and inspect show it."""
        shapes = self.attention.shapes
        return {
            "max_seq_len": self.max_seq_len,
            "layers": len(shapes),
            "kv_cache": [{"layer": i, "shape": [1, self.max_seq_len, s.kv_heads, s.head_dim],
                          "dtype": str(s.dtype).removeprefix("torch.")} for i, s in enumerate(shapes)],
            "kv_cache_bytes": self.attention.cache_bytes(),
        }

    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The wrapped model on the whole sequence, no cache: ``[1, T, vocab]``."""
        return full_logits(self.model, tokens)

    def example_inputs(self, seq_len: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(1, seq_len, dtype=torch.long), torch.zeros(1, dtype=torch.long))

    def dynamic_shapes(self):
        seq = torch.export.Dim("seq_len", min=1, max=self.max_seq_len)
        return ({1: seq}, None)


class _Probe:
    """Records each attention call's key shape (stands in for CacheAttention in one eager run)."""

    def __init__(self):
        self.shapes: dict[int, LayerCacheShape] = {}
        self.calls = 0
        self.start_pos = 0

    def attend(self, layer, q, k, v, scale):
        layer = self.calls if layer is None else layer
        self.calls += 1
        self.shapes[layer] = LayerCacheShape(k.shape[1], k.shape[3], q.dtype if q.is_floating_point() else torch.float32)
        # Plain causal attention (prompt from position 0) keeps the probe's run valid.
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return _original_sdpa(q, k, v, is_causal=True, scale=scale).transpose(1, 2)

    def active(self, start_pos):
        return attention_to(self)


def probe_cache_shapes(lm: KVCacheLM) -> list[LayerCacheShape]:
    """Run the model once on two tokens and read each attention layer's K/V shape."""
    probe = _Probe()
    tokens, input_pos = lm.example_inputs(2)

    def run():
        with torch.no_grad(), probe.active(0):
            return lm._logits(tokens, input_pos, 0, 2)

    shape_only(run, fallback=lambda: (probe.shapes.clear(), run()))
    if not probe.shapes:
        raise ModelLoadError("the model has no causal attention that a KV cache can hold",
                             "its attention must be F.scaled_dot_product_attention(..., is_causal=True), or a transformers model")
    if sorted(probe.shapes) != list(range(len(probe.shapes))):
        raise ModelLoadError(f"attention layers {sorted(probe.shapes)} are not numbered 0..n-1", "every layer needs its own KV cache")
    return [probe.shapes[i] for i in range(len(probe.shapes))]


def shape_only(fn, fallback):
    """``fn()`` on fake tensors (shapes and dtypes, no arithmetic): a probe of a large model without
    dequantizing every weight; ``fallback()`` (the real run) when the model does not run fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return fn()
    except Exception:
        return fallback()
