"""Adapters that make Hugging Face ``transformers`` models exportable and quantizable.

Nothing here imports ``transformers`` at module level: qlower does not depend
on it, the recipes in ``examples/`` do.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CausalLMLogits", "conv1d_to_linear"]


class CausalLMLogits(nn.Module):
    """``input_ids -> logits`` for a ``*ForCausalLM`` model, without a KV cache.

    ``torch.export`` wants tensors out; an HF model returns a ModelOutput and,
    by default, a cache object.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False, return_dict=True).logits


def conv1d_to_linear(model: nn.Module) -> int:
    """Swap every HF ``Conv1D`` (GPT-2's projections) for an equal ``nn.Linear``.

    ``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``[in, out]``; a linear
    stores ``[out, in]``. Quantizers only take ``nn.Linear``, so without this
    GPT-2 keeps its attention and MLP projections in float. Returns how many
    modules were swapped; the model is changed in place.
    """
    from .modules import replace_module

    swaps = [(name, model.get_submodule(name)) for name in conv1d_layers(model)]
    for name, conv in swaps:
        weight = conv.weight.detach()
        linear = nn.Linear(
            weight.shape[0], weight.shape[1], bias=conv.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias.detach())
        replace_module(model, name, linear)
    return len(swaps)


def conv1d_layers(model: nn.Module) -> list[str]:
    """Names of the HF ``Conv1D`` modules (matched by class name: no transformers import)."""
    return [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D" and hasattr(module, "nf")]
