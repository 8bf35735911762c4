"""Schemes → quantized models.

Dynamic and weight-only schemes quantize the eager module in place with torchao;
the static scheme runs PT2E (prepare → calibrate → convert) and yields a graph
module. Every linear and embedding layer gets a ``LayerPlan`` saying what it
will become, or why it stays float: a shape the scheme cannot take is reported,
never a crash (``--strict`` makes it an error).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import FLOAT_SCHEMES, GROUPED_SCHEMES, SKIP, ExportOptions
from .errors import CalibrationError, ExportError, StrictError, first_line
from .loader import describe_tensor, random_like, read_input_batches
from .patterns.linear import Q4_N_ALIGN, q4_fusable, q4_n_reason
from .quantized_linear import QuantizedLinear

# The ET-VK int4 embedding shader loads 32 values at a time.
EMBEDDING_DIM_MULTIPLE = 32


@dataclass
class LayerPlan:
    """What quantization decided for one linear or embedding module."""

    name: str
    kind: str  # "linear" | "embedding"
    n: int  # output features (embedding: dim)
    k: int  # input features (embedding: vocab size)
    scheme: str  # the scheme asked for this layer ("skip" when overridden)
    group_size: int | None
    quantized: bool
    reason: str | None = None  # why it stays float

    def to_dict(self) -> dict:
        return asdict(self)


def plan_layers(module: nn.Module, options: ExportOptions) -> list[LayerPlan]:
    plans = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            scheme, group_size = options.layer_choice(name)
            plans.append(_plan_linear(name, child, scheme, group_size))
        elif isinstance(child, nn.Embedding):
            plans.append(_plan_embedding(name, child, options))
    return plans


def _plan_linear(name: str, layer: nn.Linear, scheme: str, group_size: int) -> LayerPlan:
    n, k = layer.out_features, layer.in_features
    grouped = scheme in GROUPED_SCHEMES
    plan = LayerPlan(name, "linear", n, k, scheme, group_size if grouped else None, quantized=False)
    if scheme == SKIP:
        plan.reason = "skipped by a per-layer override"
    elif scheme in FLOAT_SCHEMES:
        plan.reason = f"scheme {scheme} keeps float weights"
    elif grouped and k % group_size != 0:
        plan.reason = f"group size {group_size} does not divide K={k}"
    elif grouped and n % Q4_N_ALIGN != 0:
        # Quantizing it anyway would crash ExecuTorch's own Vulkan lowering.
        plan.reason = q4_n_reason(n)
    else:
        plan.quantized = True
    return plan


def _plan_embedding(name: str, layer: nn.Embedding, options: ExportOptions) -> LayerPlan:
    scheme, group_size = options.layer_choice(name)
    dim = layer.embedding_dim
    plan = LayerPlan(name, "embedding", dim, layer.num_embeddings, scheme, group_size, quantized=False)
    if not options.quantize_embeddings:
        plan.reason = "embedding quantization is off (--quantize-embeddings)"
    elif scheme == SKIP or scheme in FLOAT_SCHEMES:
        plan.reason = f"scheme {scheme} keeps float weights"
    elif dim % group_size != 0:
        plan.reason = f"group size {group_size} does not divide the embedding dim {dim}"
    elif dim % EMBEDDING_DIM_MULTIPLE != 0:
        plan.reason = f"embedding dim {dim} is not a multiple of {EMBEDDING_DIM_MULTIPLE}"
    else:
        plan.quantized = True
    return plan


def check_strict(plans: list[LayerPlan], options: ExportOptions) -> None:
    """--strict: any layer that cannot take its scheme (not one skipped on purpose) is an error."""
    if not options.strict or options.scheme in FLOAT_SCHEMES:
        return
    for plan in plans:
        if not plan.quantized and plan.scheme not in (SKIP, *FLOAT_SCHEMES) and "is off" not in (plan.reason or ""):
            raise StrictError(
                f"layer {plan.name!r} cannot take scheme {plan.scheme}: {plan.reason}",
                "pick a group size that divides the layer, add a per-layer override, or drop --strict",
            )


# --- dynamic and weight-only schemes (torchao, eager) -------------------------


def quantize_eager(module: nn.Module, plans: list[LayerPlan]) -> None:
    """Quantize the planned linears (torchao) and embeddings (packed int4) in place."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def make_config(scheme: str, group_size: int):
        if scheme == "qta8a_qga4w":
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))

    groups: dict[tuple[str, int], set[str]] = {}
    for plan in plans:
        if plan.quantized and plan.kind == "linear":
            groups.setdefault((plan.scheme, plan.group_size), set()).add(plan.name)
    for (scheme, group_size), names in sorted(groups.items()):
        quantize_(module, make_config(scheme, group_size), filter_fn=_by_name(names))
        for name in sorted(names):
            replace_module(module, name, QuantizedLinear.from_torchao(module.get_submodule(name), q4_fusable))
    for plan in plans:
        if plan.quantized and plan.kind == "embedding":
            replace_module(module, plan.name, Int4Embedding.from_float(module.get_submodule(plan.name), plan.group_size))


def _by_name(names: set[str]) -> Callable[[nn.Module, str], bool]:
    return lambda _module, fqn: fqn in names


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (a dotted path) is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


class Int4Embedding(nn.Module):
    """Group-wise symmetric int4 embedding, as ``quantized_decomposed.embedding_4bit``.

    ``packed`` is uint8 [vocab, dim/2] with the even element in the high nibble
    and the odd one in the low nibble, each stored as value + 8 (the layout that
    op expects; the Vulkan lowering repacks it for its shader). ``scales`` is
    [vocab, dim / group_size].
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group_size: int):
        super().__init__()
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, layer: nn.Embedding, group_size: int) -> "Int4Embedding":
        w = layer.weight.detach().float()
        vocab, dim = w.shape
        groups = w.reshape(vocab, dim // group_size, group_size)
        scales = groups.abs().amax(dim=-1).clamp(min=1e-9) / 7.5
        q = torch.clamp(torch.round(groups / scales.unsqueeze(-1)), -8, 7).to(torch.int8).reshape(vocab, dim)
        u = (q + 8).to(torch.uint8)
        packed = (u[:, ::2] << 4) | u[:, 1::2]
        return cls(packed, scales.to(torch.float32), group_size)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.packed, self.scales, None, -8, 7, indices, dtype=torch.float32
        )


# --- static scheme (PT2E) ------------------------------------------------------


def quantize_static(module: nn.Module, example_inputs: tuple, plans: list[LayerPlan], calibration: list[tuple]) -> nn.Module:
    """PT2E static int8: per-tensor activations, per-channel symmetric weights, linears only."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class LinearQuantizer(XNNPACKQuantizer):
        # XNNPACK's transform turns every add/mul scalar into a float tensor so that
        # those ops could be quantized; only linears are, and on integer tensors
        # (position ids: arange + 0) the float constant makes index tensors float.
        def transform_for_annotation(self, model):
            return model

    quantizer = LinearQuantizer()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    for plan in plans:
        if plan.kind == "linear" and plan.quantized:
            quantizer.set_module_name(plan.name, config)
    try:
        graph = torch.export.export(module, example_inputs, strict=False).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in calibration:
                prepared(*batch)
        return convert_pt2e(prepared)
    except Exception as exc:
        raise ExportError(f"static quantization failed: {type(exc).__name__}: {first_line(exc)}",
                          "QLOWER_DEBUG=1 shows the traceback; try --scheme qta8a_qga4w") from exc


def calibration_batches(example_inputs: tuple, options: ExportOptions, from_model: list[tuple] | None, warn: Callable[[str], None]) -> list[tuple]:
    """Calibration batches: --calibration FILE, the model file's own, or random ones (with a warning)."""
    if options.calibration:
        batches = read_input_batches(Path(options.calibration), "calibration", CalibrationError, tensor_is_batches=True)
    elif from_model:
        batches = from_model
    else:
        warn(
            f"no calibration data: calibrating on {options.calibration_batches} random batches shaped like the example inputs; "
            "accuracy will suffer — pass --calibration FILE with real inputs"
        )
        gen = torch.Generator().manual_seed(options.seed)
        return [tuple(random_like(t, gen) for t in example_inputs) for _ in range(options.calibration_batches)]
    for i, batch in enumerate(batches):
        _check_batch(i, batch, example_inputs)
    return batches


def _check_batch(i: int, batch: tuple, example: tuple) -> None:
    if len(batch) != len(example) or not all(isinstance(t, torch.Tensor) for t in batch):
        raise CalibrationError(f"calibration batch {i} has {len(batch)} inputs, the model takes {len(example)} tensors", "match the example inputs")
    for j, (got, want) in enumerate(zip(batch, example)):
        if got.dtype != want.dtype or got.shape[1:] != want.shape[1:] or got.dim() != want.dim():
            raise CalibrationError(
                f"calibration batch {i} input {j} is {describe_tensor(got)}, expected {describe_tensor(want)}",
                "calibration inputs must match the example inputs' dtype and shape (the batch dim may differ)",
            )
