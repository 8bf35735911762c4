"""Schemes → quantized models.

Dynamic and weight-only schemes quantize the eager module in place with torchao;
the static scheme runs PT2E (prepare → calibrate → convert) and yields a graph
module. Every linear and embedding layer gets a ``LayerPlan`` saying what it
will become, or why it stays float: a shape the scheme cannot take is reported,
never a crash (``--strict`` makes it an error). Under the static scheme every
convolution gets one too: ``q8ta_q8csw`` quantizes Conv2d layers (BatchNorm
folded by PT2E) and ConvTranspose2d layers for the ET-VK q8ta convolutions;
other schemes leave convs float.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import CALIBRATED_ALGORITHMS, FLOAT_SCHEMES, GROUPED_SCHEMES, SKIP, ExportOptions
from .errors import ExportError, StrictError
from . import pack, weight_quant
from .patterns.guards import Q4_N_ALIGN, conv_shape_problem, q4_fusable, q4_n_reason, q4_shape_fusable
from .modules import replace_module
from .calibrate import calibrated, calibration_batches
from .loader import LoadedModel
from .memory import release_memory
from .quantized_linear import QuantizedLinear
from .weight_store import IN_MEMORY

# The ET-VK int4 embedding shader loads 32 values at a time.
EMBEDDING_DIM_MULTIPLE = 32


# The one scheme that quantizes convolutions (and the adds between them).
STATIC_SCHEME = "q8ta_q8csw"
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerPlan:
    """What quantization decided for one linear, embedding or convolution module."""

    name: str
    kind: str  # "linear" | "embedding" | "conv"
    n: int  # output features (embedding: dim; conv: C_out)
    k: int  # input features (embedding: vocab size; conv: C_in)
    scheme: str  # the scheme asked for this layer ("skip" when overridden)
    group_size: int | None
    quantized: bool
    reason: str | None = None  # why it stays float
    kernel: list[int] | None = None  # convs only
    stride: list[int] | None = None
    groups: int | None = None
    algorithm: str | None = None  # int4 layers: how their values were chosen (config.WEIGHT_ALGORITHMS)

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
        elif isinstance(child, _CONV_TYPES):
            plans.append(_plan_conv(name, child, options))
    for plan in plans:
        if plan.quantized and plan.scheme in GROUPED_SCHEMES:
            # An embedding has no inputs to calibrate on: the calibrated algorithms leave it to RTN.
            calibrated = options.weight_algorithm in CALIBRATED_ALGORITHMS
            plan.algorithm = "rtn" if plan.kind == "embedding" and calibrated else options.weight_algorithm
    return plans


def _plan_conv(name: str, layer: nn.Module, options: ExportOptions) -> LayerPlan:
    scheme, _ = options.layer_choice(name)
    transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    plan = LayerPlan(name, "conv", layer.out_channels, layer.in_channels, scheme, None, quantized=False,
                     kernel=list(layer.kernel_size), stride=list(layer.stride), groups=layer.groups)
    if scheme == SKIP:
        plan.reason = "skipped by a per-layer override"
    elif options.scheme != STATIC_SCHEME or scheme != STATIC_SCHEME:
        plan.reason = f"scheme {scheme} keeps convolutions float (only {STATIC_SCHEME} quantizes them)"
    elif layer.padding_mode != "zeros":
        plan.reason = f"padding mode {layer.padding_mode!r} (the q8ta convolutions pad with zeros)"
    else:
        plan.reason = conv_shape_problem(layer.out_channels, layer.in_channels, layer.groups,
                                         dims=len(layer.kernel_size), transposed=transposed, dilation=layer.dilation)
        plan.quantized = plan.reason is None
    return plan


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


def quantization_record(plans: list[LayerPlan], options: ExportOptions) -> bytes | None:
    """JSON bytes: the weight algorithm, its calibration, and each int4 layer's algorithm; None when no layer is int4."""
    import json

    layers = {p.name: p.algorithm for p in plans if p.algorithm is not None}
    if not layers:
        return None
    record = {"version": 1, "scheme": options.scheme, "group_size": options.group_size,
              "weight_algorithm": options.weight_algorithm, "layers": layers}
    if options.weight_algorithm in CALIBRATED_ALGORITHMS:
        record["calibration"] = ({"text": Path(options.calibration_text).name, "tokens": options.calibration_tokens}
                                 if options.calibration_text else {"inputs": Path(options.calibration).name if options.calibration else "model file"})
    return json.dumps(record, separators=(",", ":")).encode()


def check_strict(plans: list[LayerPlan], options: ExportOptions) -> None:
    """--strict: any layer that cannot take its scheme (not one skipped on purpose) is an error."""
    if not options.strict or options.scheme in FLOAT_SCHEMES:
        return
    for plan in plans:
        if plan.kind == "conv" and options.scheme != STATIC_SCHEME:
            continue  # convolutions are not asked to be quantized by the other schemes
        if not plan.quantized and plan.scheme not in (SKIP, *FLOAT_SCHEMES) and "is off" not in (plan.reason or ""):
            raise StrictError(
                f"layer {plan.name!r} cannot take scheme {plan.scheme}: {plan.reason}",
                "pick a group size that divides the layer, add a per-layer override, or drop --strict",
            )


# --- the one quantize function: export's stage, and the reference of verify, generate and eval ---


def plan_model(module: torch.nn.Module, options: ExportOptions) -> tuple[set[str], list[LayerPlan]]:
    """What the quantize stage will do to ``module`` (a skeleton is enough): GPT-2-style ``Conv1D``
    projections become linears the quantizer takes (in place; their names are returned, their
    checkpoint weights are stored transposed), and each layer gets its plan."""
    from .hf import conv1d_layers, conv1d_to_linear

    transposed = set()
    if options.scheme not in FLOAT_SCHEMES:
        transposed = set(conv1d_layers(module))
        conv1d_to_linear(module)
    return transposed, plan_layers(module, options)


def quantize_model(loaded: LoadedModel, options: ExportOptions, warn: Callable[[str], None],
                   on_layer: Callable | None = None, store=None) -> tuple[torch.nn.Module, list[LayerPlan]]:
    """The model quantized as export does it (in place for the eager schemes), and the per-layer plans.

    verify and generate build their quantized reference with this very function.
    A model loaded as a skeleton (``loaded.weights``: its checkpoint, still on
    disk) is filled here tensor by tensor, each layer quantized as it arrives
    (``stream.fill_weights``); ``on_layer`` then hears of each layer done.
    With a ``store`` (``weight_store.WeightStore``) each quantized layer's large
    tensors move to files as soon as it is quantized, and the rest of the
    model's at the end.
    """
    def stored(module: torch.nn.Module) -> torch.nn.Module:
        return store.adopt(module) if store is not None else module

    transposed, plans = plan_model(loaded.module, options)
    check_strict(plans, options)
    eager = options.scheme not in FLOAT_SCHEMES and options.scheme != "q8ta_q8csw"
    if eager and calibrated(plans):
        _quantize_calibrated(loaded, options, plans, transposed, warn, on_layer, stored, store)
        return stored(loaded.module), plans
    if loaded.weights is not None:
        from .stream import fill_weights

        out = store if store is not None else IN_MEMORY
        layers = {p.name: (lambda layer, rows, plan=p: stored(quantize_layer(layer, plan, rows, out=out))) for p in plans if p.quantized and eager}
        weights, loaded.weights = loaded.weights, None
        fill_weights(loaded.module, weights, layers, transposed, on_layer, unexpected=loaded.unexpected_weights)
        release_memory()
        if eager:
            return stored(loaded.module), plans
    if options.scheme == "q8ta_q8csw":
        from .static_int8 import quantize_static

        batches = calibration_batches(loaded.example_inputs, options, loaded.calibration_inputs, warn)
        return stored(quantize_static(loaded.module, loaded.example_inputs, plans, batches)), plans
    if eager:
        quantize_eager(loaded.module, plans, stored)
    return stored(loaded.module), plans


def _quantize_calibrated(loaded: LoadedModel, options: ExportOptions, plans: list[LayerPlan], transposed: set[str],
                         warn: Callable[[str], None], on_layer: Callable | None, stored: Callable, store=None) -> None:
    """GPTQ and the like: the model quantized block by block on its calibration inputs (qlower.calibrate),
    streamed from its checkpoint a block at a time when it was loaded as a skeleton. With a ``store``, a
    quantized block's weights leave the resident set whenever calibration is done reading them."""
    from .calibrate import calibration_inputs, quantize_calibrated

    by_name = {p.name: p for p in plans}
    module = loaded.module
    batches = calibration_inputs(loaded, options, warn)
    if options.gptq_device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--gptq-device cuda: torch sees no CUDA GPU", "use --gptq-device auto (the CPU when there is no GPU) or cpu")
    device = weight_quant.gptq_device(options.gptq_device)
    out = store if store is not None else IN_MEMORY

    def quantize(name: str, hessian) -> None:
        replace_module(module, name, stored(quantize_layer(module.get_submodule(name), by_name[name], None, hessian, device, out)))

    fill = None
    if loaded.weights is not None:
        from .errors import ModelLoadError
        from .stream import ReadCount, SafetensorsWeights, check_fits, checkpoint_bytes, checkpoint_names, fill_weights

        weights, loaded.weights = loaded.weights, None
        problem = check_fits(module, weights, transposed)
        if problem:
            raise ModelLoadError(f"the checkpoint does not fit the model: {problem}", "check that the checkpoint belongs to this model")
        # Tied weights (an LM head sharing the embedding's tensor) are filled at different times here:
        # each name of a tied parameter gets its own entry for the one tensor.
        weights = SafetensorsWeights({**{name: weights.entries[key] for name, key in checkpoint_names(module, weights).items()},
                                      **weights.entries})
        count = ReadCount(checkpoint_bytes(module, weights))  # progress over all the block-by-block fills

        def fill(accept, hessians) -> None:
            layers = {n: (lambda layer, rows, plan=by_name[n], h=h: stored(quantize_layer(layer, plan, rows, h, device, out)))
                      for n, h in hessians.items()}
            fill_weights(module, weights, layers, transposed, on_layer, unexpected=loaded.unexpected_weights, only=accept,
                         count=count)
            if not any(h is not None for h in hessians.values()):  # once a block, not after each group of linears
                release_memory()

    quantize_calibrated(module, plans, batches, quantize, fill, warn,
                        release=store.release_pages if store is not None else None, hessian_device=device)
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise ExportError(f"the checkpoint left {left[0]} unset", "check that the checkpoint belongs to this model")
    release_memory()


# --- dynamic and weight-only schemes (torchao, eager) -------------------------


def quantize_eager(module: nn.Module, plans: list[LayerPlan],
                   keep: Callable[[nn.Module], nn.Module] = lambda layer: layer) -> None:
    """Quantize the planned linears (torchao) and embeddings (packed int4) in place, one layer at a time;
    ``keep`` gets each quantized layer as it is made (the weight store's ``adopt``)."""
    for plan in plans:
        if plan.quantized:
            replace_module(module, plan.name, keep(quantize_layer(module.get_submodule(plan.name), plan)))


# Float rows converted and quantized at once: bounds the temporaries of a large layer
# (a 128256 x 4096 LM head is 2 GB in float32). Rows are independent (groups run
# along a row), so quantizing in chunks gives the same bits as all at once.
CHUNK_BYTES = 64 << 20


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, cols * 4))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


# rows(start, end) -> the weight's rows [start, end) in its own dtype (read from a checkpoint as needed)
Rows = Callable[[int, int], torch.Tensor]


def quantize_layer(layer: nn.Module, plan: LayerPlan, rows: Rows | None = None, hessian=None,
                   device: torch.device | None = None, out=IN_MEMORY) -> nn.Module:
    """The quantized replacement of one planned linear or embedding (eager schemes).

    Export's quantize stage calls this for every layer, whether the model was
    loaded whole or streamed from safetensors (:mod:`qlower.stream`); the
    layer's weight may be in any float dtype (bf16 straight from a checkpoint),
    it is converted to float32 a chunk of rows at a time. ``rows``, when given,
    reads the weight's rows (``layer.weight`` then only gives its shape): a
    large weight is never whole in memory. ``plan.algorithm`` picks how the
    int4 values are chosen (:mod:`qlower.weight_quant`); ``gptq`` needs the
    layer's ``hessian`` (``weight_quant.Hessians``: ``2/T XᵀX`` of its calibration inputs, :mod:`qlower.calibrate`);
    ``auto`` its held-out part too, and ``plan.algorithm`` becomes what it picked (``rtn+gptq`` when the
    row chunks of a large layer picked differently). ``device``: where GPTQ runs. ``out``: where the packed
    int4 values are written a chunk of rows at a time (a ``weight_store.WeightStore``: straight to a file).
    """
    if plan.kind == "embedding":
        return Int4Embedding.from_float(layer, plan.group_size, rows, plan.algorithm, out)
    picks: list[str] = []
    quantized = quantize_linear(layer, plan.scheme, plan.group_size, rows, plan.algorithm, hessian, picks.append, device, out)
    if plan.algorithm == "auto":
        plan.algorithm = "+".join(sorted(set(picks)))
    return quantized


def _weight_rows(layer: nn.Module, rows: Rows | None) -> Rows:
    weight = layer.weight.detach()
    return rows or (lambda start, end: weight[start:end])


def _int4_chunk_quantizer(scheme: str, group_size: int, algorithm: str, hessian=None,
                          chose: Callable[[str], None] = lambda algorithm: None, device: torch.device | None = None):
    """chunk(w float32 [rows, K]) -> (int8 values, scales, zero points, torchao-style attributes).

    ``hessian``: a :class:`weight_quant.Hessians` (or the fitted Hessian alone) for gptq and auto.
    ``auto`` tries rtn, hqq and gptq (fitted without the held-out windows) on each chunk and keeps the
    one whose layer output error on the held-out calibration windows (``hessian.held_out``) is smallest,
    rtn unless another beats it by AUTO_MIN_GAIN; where gptq wins, its values are then fitted again on
    every window (``hessian.whole``), as a model chosen on held-out data is refitted on all of it.
    ``chose`` hears of each chunk's pick. ``device``: where GPTQ runs (same bits anywhere).
    """
    dynamic = scheme == "qta8a_qga4w"
    if algorithm in ("gptq", "auto") and hessian is None:
        raise ExportError(f"{algorithm} needs the layer's calibration Hessian", "this is a bug: quantize through quantize_model")
    hessians = hessian if isinstance(hessian, weight_quant.Hessians) or hessian is None else weight_quant.Hessians(hessian)
    if algorithm == "gptq":
        return _gptq_chunk(dynamic, group_size, hessians, "fit", device)
    if algorithm != "auto":
        return _torchao_chunk(dynamic, group_size, algorithm)
    if hessians.held_out is None:
        raise ExportError("auto needs the layer's held-out calibration Hessian", "this is a bug: quantize through quantize_model")
    candidates = {"rtn": _torchao_chunk(dynamic, group_size, "rtn"), "hqq": _torchao_chunk(dynamic, group_size, "hqq"),
                  "gptq": _gptq_chunk(dynamic, group_size, hessians, "fit", device)}
    refit = _gptq_chunk(dynamic, group_size, hessians, "whole", device)  # factored on first use

    def chunk(w: torch.Tensor):
        best, best_error, rtn_error = None, None, None
        for name, quantize_chunk in candidates.items():
            result = quantize_chunk(w)
            q, scale = result[0], result[1].reshape(w.shape[0], -1)
            error = float(weight_quant.output_error(w, weight_quant.dequantize(q, scale, group_size), hessians.held_out).sum())
            if name == "rtn":
                best, best_error, rtn_error = (name, result), error, error
            elif error < best_error and error < (1.0 - AUTO_MIN_GAIN) * rtn_error:
                best, best_error = (name, result), error
        chose(best[0])
        if best[0] == "gptq" and AUTO_REFIT_GPTQ:
            return refit(w)
        return best[1]
    return chunk


# auto keeps another algorithm's values only where their held-out layer output error is below RTN's by this share.
AUTO_MIN_GAIN = 0.0
# auto refits the layers where gptq won on every calibration window (the held-out ones too).
AUTO_REFIT_GPTQ = True


def _gptq_chunk(dynamic: bool, group_size: int, hessians: weight_quant.Hessians, part: str,
                device: torch.device | None = None):
    """GPTQ of a chunk of rows with one part of the layer's Hessians (factored once per input group, on first use)."""
    settings = weight_quant.DEFAULT_GPTQ

    def chunk(w: torch.Tensor):
        prepared = hessians.prepared(part, settings, device)
        q, scales = weight_quant.gptq(w, None, group_size, settings, prepared, device)
        attrs = dict(block_size=(1, group_size), weight_bits=4, dtype=torch.float32, dynamic_activations=dynamic)
        return q, scales, torch.zeros_like(scales, dtype=torch.int8), attrs
    return chunk


def _torchao_chunk(dynamic: bool, group_size: int, algorithm: str):
    """torchao's own round-to-nearest (``rtn``) or HQQ scale-only (``hqq``)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    choose = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if algorithm == "hqq" else IntxChooseQParamsAlgorithm.AFFINE
    if dynamic:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
                                                       intx_choose_qparams_algorithm=choose)
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size), intx_choose_qparams_algorithm=choose)

    def chunk(w: torch.Tensor):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(w, requires_grad=False)
        quantize_(layer, config)
        t = layer.weight
        attrs = dict(block_size=t.block_size, weight_bits=int(str(t.target_dtype).removeprefix("torch.int")), dtype=t.dtype,
                     dynamic_activations=t.activation_quantization is not None)
        return t.qdata, t.scale, t.zero_point, attrs
    return chunk


def quantize_linear(layer: nn.Linear, scheme: str, group_size: int, rows: Rows | None = None,
                    algorithm: str = "rtn", hessian=None, chose: Callable[[str], None] = lambda algorithm: None,
                    device: torch.device | None = None, out=IN_MEMORY) -> QuantizedLinear:
    """Group-wise symmetric int4 quantization of ``layer`` as a :class:`QuantizedLinear` (torchao's
    round-to-nearest or HQQ, GPTQ from the layer's ``hessian``, or auto's pick among them: ``chose``
    hears of it, for each chunk of rows). The packed values are written into ``out.empty(...)`` a chunk
    of rows at a time (``out.written`` hears of each)."""
    quantize_chunk = _int4_chunk_quantizer(scheme, group_size, algorithm, hessian, chose, device)
    read = _weight_rows(layer, rows)
    n, k = layer.weight.shape
    dynamic = scheme == "qta8a_qga4w"
    # A layer that fuses is packed (and its group sums taken) a chunk of rows at a time, into
    # its final buffer: its int8 values are never whole in memory.
    packed = out.empty((n, pack.packed_int4_width(k)), torch.uint8) if q4_shape_fusable(n, k, group_size) else None
    values, scales, zeros, sums = [], [], [], []
    for start, end in _row_chunks(n, k):
        qdata, scale, zero, attrs = quantize_chunk(read(start, end).to(torch.float32).contiguous())
        scales.append(scale)
        zeros.append(zero)
        if packed is not None and q4_fusable(qdata, attrs["block_size"], rows=n):
            packed[start:end] = pack.pack_int4(qdata)
            out.written(packed[start:end])
            if dynamic:
                sums.append(pack.row_group_sums(qdata, group_size))
            values.append(None)
        else:
            values.append(qdata)
        del qdata
    bias = layer.bias
    if bias is not None and bias.dtype != torch.float32:
        bias = nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
    cat = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts)  # noqa: E731
    if all(v is None for v in values):  # fused: packed, with the fused op's group sums
        return QuantizedLinear(packed, cat(scales), cat(zeros), bias=bias, opaque=True, in_features=k,
                               weight_sums=pack.pack_group_sums(cat(sums)) if dynamic else None, **attrs)
    # Not fusable (or a chunk outside the int4 range): the int8 values, the explicit torchao chain.
    unpacked = [packed[s:e] if v is None else v for v, (s, e) in zip(values, _row_chunks(n, k))]
    unpacked = [pack.unpack_int4(v, k) if v.dtype == torch.uint8 else v for v in unpacked]
    return QuantizedLinear(cat(unpacked), cat(scales), cat(zeros), bias=bias, opaque=False, **attrs)


@torch.library.custom_op("qlower::embedding_int4", mutates_args=())
def embedding_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of a group-wise symmetric int4 table, dequantized to float32.

    ``packed``: uint8 [vocab, dim / 2] as ``pack.pack_int4`` lays out a linear's weight (even
    element in the low nibble); ``scales``: [vocab, dim / group_size]. The fuse stage makes it
    ET-VK's ``embedding_q4gsw`` (``is_linear_weight``), which reads that layout as it is.
    """
    flat = indices.reshape(-1)
    rows = pack.unpack_int4(packed[flat], packed.shape[1] * 2)
    values = rows.reshape(flat.numel(), -1, group_size).to(torch.float32) * scales[flat].unsqueeze(-1)
    return values.reshape(*indices.shape, -1)


@embedding_int4.register_fake
def _(packed, scales, group_size, indices):
    return packed.new_empty((*indices.shape, packed.shape[1] * 2), dtype=torch.float32)


class Int4Embedding(nn.Module):
    """Group-wise symmetric int4 embedding: one ``qlower::embedding_int4`` call.

    Values are ``round(w / s)`` clamped to [-8, 7] with ``s = max|w| / 7.5`` per
    group (``quantized_decomposed.embedding_4bit``'s quantization), packed as the
    fused linears pack theirs (``packed`` uint8 [vocab, dim / 2]); ``scales`` is
    [vocab, dim / group_size].
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group_size: int):
        super().__init__()
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, layer: nn.Embedding, group_size: int, rows: Rows | None = None, algorithm: str = "rtn",
                   out=IN_MEMORY) -> "Int4Embedding":
        read = _weight_rows(layer, rows)
        vocab, dim = layer.weight.shape
        packed = out.empty((vocab, dim // 2), torch.uint8)
        scales = out.empty((vocab, dim // group_size), torch.float32)
        for start, end in _row_chunks(vocab, dim):  # rows are independent: chunks bound the float temporaries
            packed[start:end], scales[start:end] = cls.quantize_rows(read(start, end).to(torch.float32).contiguous(), group_size, algorithm)
            out.written(packed[start:end])
            out.written(scales[start:end])
        return cls(packed, scales, group_size)

    @staticmethod
    def quantize_rows(w: torch.Tensor, group_size: int, algorithm: str = "rtn") -> tuple[torch.Tensor, torch.Tensor]:
        """``algorithm`` "hqq": HQQ's scales (an embedding has no inputs to calibrate GPTQ on: it takes RTN)."""
        if algorithm == "hqq":
            q, scales = weight_quant.hqq(w, group_size)
            return pack.pack_int4(q), scales
        rows, dim = w.shape
        groups = w.reshape(rows, dim // group_size, group_size)
        scales = groups.abs().amax(dim=-1).clamp(min=1e-9) / 7.5
        # Rounded as torchao rounds a linear's weight (times the reciprocal): a tied LM head and its
        # embedding get the same bytes, which the file stores once.
        q = torch.clamp(torch.round(groups * (1.0 / scales.unsqueeze(-1))), -8, 7).to(torch.int8).reshape(rows, dim)
        return pack.pack_int4(q), scales.to(torch.float32)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.qlower.embedding_int4(self.packed, self.scales, self.group_size, indices)
