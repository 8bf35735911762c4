"""``qlower verify --sample N``: a few fused layers of a big file, each checked alone, one layer in memory.

A whole-model verify holds the float model, its quantized copy and every
constant of the file at once: for a 1B–8B decoder that is the memory wall the
streaming export avoids. This mode checks the part of the file that quantization
and packing produced, layer by layer:

1. the file's fused int4 ops (``linear_dq8ca_q4gsw``, ``linear_q4gsw``,
   ``embedding_q4gsw``) in delegate order, read without their constants
   (``read_pte(constants=False)``);
2. the model's quantized layers, from a skeleton without weights (the
   streaming load), paired with the ops in order, shape by shape;
3. for ``N`` of them, evenly spread, first and last included: the layer's
   weight streamed from the checkpoint and quantized by export's own
   ``quantize_layer``; the op's constants read from the file alone; both run
   on the same random input (the golden reference for the op, the quantized
   eager layer), and compared by SQNR against the scheme's per-layer bar.

Each layer's float weight, its quantized form and the op's constants are the
only large tensors alive, and only while that layer is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import VerifyError
from .pte import Pte, int4_linear, qualified_op_name

# fused op -> (position of the packed weight, of its scales) in the op's arguments
FUSED_INT4 = {
    "et_vk.linear_dq8ca_q4gsw.default": (3, 5),
    "et_vk.linear_q4gsw.default": (1, 2),
    "et_vk.embedding_q4gsw.default": (0, 1),
}
TOKENS = 8  # rows of the random input each layer is checked on


def file_layers(pte: Pte) -> list[dict[str, Any]]:
    """The file's fused int4 ops, in delegate order: name, kind, N, K, and where their arguments are."""
    found = []
    for delegate in pte.vulkan_delegates:
        graph = delegate.graph
        ops = delegate.ops
        users = _users(ops)
        for index, op in enumerate(ops):
            name, args, parts = qualified_op_name(op.name), op.args, None
            if name in RUNTIME_LINEARS:
                name, args, parts = _as_stock_linear(delegate, op, int4_linear(delegate, op)[0])
            if name not in FUSED_INT4:
                continue
            w_at, _ = FUSED_INT4[name]
            weight = graph.values[args[w_at]].value
            rows, half = (int(d) for d in weight.dims)
            kind = "embedding" if name.startswith("et_vk.embedding") else "linear"
            if kind == "linear" and parts is None:
                parts = merged_parts(delegate, op, users)
            # packed int4: two values a byte along K (an embedding's K is its dim, its N the vocab)
            found.append(dict(op=name, kind=kind, n=rows, k=half * 2, delegate=delegate, index=index, args=args,
                              parts=parts))
    return found


# qlower's runtime linears (export --runtime qlower).
RUNTIME_LINEARS = ("qlower.linear_q4gsw.default", "qlower.linear_q4gsw_split.default")


def _as_stock_linear(delegate, op, stock: str) -> tuple[str, list[int], list[int] | None]:
    """A qlower runtime linear as the stock op it computes its layer with: (its name, the operand ids in that op's
    order, -1 for the per-token qparams it computes itself), and the widths of the layers it computes at once
    (a merged Q/K/V's parts, or gate and up under ``epilogue="silu_mul"``; None for one layer).
    ``stock``: that op's short name (:func:`qlower.pte.int4_linear`)."""
    x, w, sums, scales, gs, bias = op.args[:6]
    graph = delegate.graph
    if stock == "linear_dq8ca_q4gsw":
        name, args = "et_vk.linear_dq8ca_q4gsw.default", [x, -1, -1, w, sums, scales, gs, bias, op.args[-1]]
    else:
        name, args = "et_vk.linear_q4gsw.default", [x, w, scales, gs, bias, op.args[-1]]
    n = int(graph.values[w].value.dims[0])
    if qualified_op_name(op.name) == "qlower.linear_q4gsw_split.default":
        parts = [int(v) for v in graph.values[op.args[7]].value.items]
    else:
        epilogue = graph.values[op.args[8]].value
        parts = [n // 2, n // 2] if getattr(epilogue, "string_val", "none") == "silu_mul" else None
    return name, args, parts


def merged_parts(delegate, op, users: dict[int, list]) -> list[int] | None:
    """The output widths of the layers a linear computes at once (export's merged Q/K/V,
    ``fuse.merge_sibling_projections``): its output viewed as heads, then sliced along them; None otherwise."""
    readers = users.get(op.args[-1], [])
    if len(readers) != 1 or readers[0].short_name != "view_copy":
        return None
    view = readers[0]
    slices = users.get(view.args[-1], [])
    if len(slices) < 2 or any(u.short_name != "slice_copy.Tensor" for u in slices):
        return None
    head_dim = int(delegate.graph.values[view.args[-1]].value.dims[-1])
    spans = sorted((_scalar(delegate, u.args[2]), _scalar(delegate, u.args[3])) for u in slices)
    return [(end - start) * head_dim for start, end in spans]


def _users(ops) -> dict[int, list]:
    """Value id → the ops that read it (an op's last argument is its output)."""
    users: dict[int, list] = {}
    for op in ops:
        for vid in op.args[:-1]:
            users.setdefault(vid, []).append(op)
    return users


def _constant(pte: Pte, delegate, vid: int) -> torch.Tensor:
    from .golden import VK_DTYPES, _tensor_from_bytes, vk_constant_bytes

    value = delegate.graph.values[vid].value
    if type(value).__name__ != "VkTensor" or value.constant_id < 0:
        raise VerifyError(f"argument {vid} of a fused op in Vulkan delegate {delegate.index} is not a constant",
                          "the .pte is corrupted or was not produced by qlower")
    data = vk_constant_bytes(pte, delegate.index, delegate.graph, value.constant_id)
    return _tensor_from_bytes(data, VK_DTYPES[value.datatype.name], value.dims)


def _scalar(delegate, vid: int):
    """An Int or Bool argument's value; None for an absent one (Null)."""
    value = delegate.graph.values[vid].value
    kind = type(value).__name__
    return {"Int": lambda: value.int_val, "Bool": lambda: value.bool_val, "Null": lambda: None}[kind]()


def _optional_constant(pte: Pte, delegate, vid: int) -> torch.Tensor | None:
    return None if type(delegate.graph.values[vid].value).__name__ == "Null" else _constant(pte, delegate, vid)


def _shape_key(kind: str, rows: int, k: int) -> tuple[str, int, int]:
    """(kind, rows, K as packed: rounded up to 8 values) — a file's op and a model's layer alike."""
    return kind, rows, -(-k // 8) * 8


def pair_layers(ops: list[dict], plans: list) -> list[tuple[dict, Any]]:
    """Each fused op with the model layer it came from.

    The file's ops come in execution order, the model's layers in the order they are
    registered, which may differ (Phi-3 registers ``o_proj`` before ``qkv_proj``): ops are
    matched within each kind and shape, in order, so only layers of the same shape rely on
    the two orders agreeing."""
    quantized = [p for p in plans if p.quantized and p.kind in ("linear", "embedding")]
    mismatch = VerifyError(f"the file's fused int4 layers do not pair with the {len(quantized)} layers the model quantizes",
                           "pass the export's --scheme, --group-size and --quantize-embeddings (or --config), or verify without --sample")
    by_shape: dict[tuple, list] = {}
    for plan in quantized:  # plans: an embedding's n is its dim, its k the vocab
        by_shape.setdefault(_plan_key(plan), []).append(plan)
    pairs = []
    for op in ops:
        # Sibling layers stored as one op (export's merged Q/K/V): each part with its layer, by its columns.
        start = 0
        for width in op.get("parts") or [op["n"]]:
            layers = by_shape.get(_shape_key(op["kind"], width, op["k"]))
            if not layers:
                raise VerifyError(f"the file's {op['op'].split('.')[1]} {width}x{op['k']} matches no layer of the model left to pair",
                                  "the file was not exported from this model with these options; verify without --sample")
            part = op if width == op["n"] else dict(op, n=width, columns=(start, start + width))
            pairs.append((part, layers.pop(0)))
            start += width
    if len(pairs) != len(quantized):
        raise mismatch
    return pairs


def _plan_key(plan) -> tuple[str, int, int]:
    rows, k = (plan.k, plan.n) if plan.kind == "embedding" else (plan.n, plan.k)
    return _shape_key(plan.kind, rows, k)


def spread(count: int, total: int) -> list[int]:
    """``count`` indices of ``range(total)``, evenly spread, the first and the last included."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def verify_sample(model_path: str | Path, pte: Pte, pte_path: str | Path, count: int, *, options, entry: str | None = None,
                  checkpoint: str | Path | None = None, seed: int = 0, min_sqnr_layer: float,
                  on_layer: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Check ``count`` fused layers of ``pte`` (read from ``pte_path`` with ``constants=False``) alone
    against the same layers of the model; the report."""
    from .llm.load import load_any
    from .quantize import plan_model
    from .metrics import compare

    ops = file_layers(pte)
    if not ops:
        raise VerifyError("the file has no fused int4 layer to sample", "verify it without --sample")
    loaded, _, _ = load_any(model_path, options, entry=entry, checkpoint=checkpoint, stream=True)
    if loaded.weights is None:
        raise VerifyError("--sample needs weights it can read a layer at a time: a Hugging Face folder or --checkpoint x.safetensors",
                          "verify a model file without --sample")
    from .stream import checkpoint_names

    transposed, plans = plan_model(loaded.module, options)
    pairs = pair_layers(ops, plans)
    names = checkpoint_names(loaded.module, loaded.weights)
    layers, failures = [], []
    gen = torch.Generator().manual_seed(seed)
    for i in spread(count, len(pairs)):
        op, plan = pairs[i]
        result = _check(pte, op, plan, _streamed_layer(loaded, plan.name, transposed, names), gen)
        result.update(compare(result.pop("reference"), result.pop("test")))
        result.update(index=i, passed=result["sqnr_db"] >= min_sqnr_layer)
        layers.append(result)
        if not result["passed"]:
            failures.append(f"layer {plan.name} ({result['op']}): {result['sqnr_db']:.1f} dB < {min_sqnr_layer:.1f} dB")
        if on_layer is not None:
            on_layer(result)
    return {"kind": "sample", "model": str(model_path), "pte": str(pte_path), "scheme": options.scheme,
            "fused_layers": len(pairs), "sampled": len(layers), "layers": layers, "min_sqnr_layer": min_sqnr_layer,
            "defects": failures, "quality": None, "passed": not failures, "failures": failures}


def _check(pte: Pte, op: dict, plan, layer: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    from . import references
    from .quantize import quantize_layer
    from .quantized_linear import per_token_qparams_args

    eager = quantize_layer(layer, plan, layer.rows)
    delegate, args = op["delegate"], op["args"]
    if plan.kind == "embedding":
        indices = torch.randint(0, op["n"], (1, TOKENS), generator=gen)
        # Only the looked-up rows of the table are dequantized (rows are independent).
        rows, local = indices.unique(return_inverse=True)
        reference = references.embedding_q4gsw(_constant(pte, delegate, args[0])[rows], _constant(pte, delegate, args[1])[rows],
                                               _scalar(delegate, args[2]), local, _scalar(delegate, args[4]))
        test = eager(indices)
    else:
        x = torch.randn(1, TOKENS, plan.k, generator=gen)
        w_at, s_at = FUSED_INT4[op["op"]]
        weight, scales = _constant(pte, delegate, args[w_at]), _constant(pte, delegate, args[s_at])
        dynamic = op["op"].endswith("dq8ca_q4gsw.default")
        bias_id = args[w_at + (4 if dynamic else 3)]
        bias = _optional_constant(pte, delegate, bias_id)
        sums = _constant(pte, delegate, args[4]) if dynamic else None
        group_size = _scalar(delegate, args[6] if dynamic else args[3])
        x_scale, x_zp = torch.ops.torchao.choose_qparams_affine(*per_token_qparams_args(x, x)) if dynamic else (None, None)

        first = op.get("columns", (0, plan.n))[0]  # a part of a merged op: its columns

        def reference_rows(n0: int, n1: int) -> torch.Tensor:  # the packed [.., N] layouts sliced by output column
            n0, n1 = first + n0, first + n1
            b = bias[n0:n1] if bias is not None else None
            if dynamic:
                return references.linear_dq8ca_q4gsw(x, x_scale, x_zp, weight[n0:n1], sums[:, n0:n1], scales[:, n0:n1], group_size, b)
            return references.linear_q4gsw(x, weight[n0:n1], scales[:, n0:n1], group_size, b)

        # Outputs are computed a block of rows at a time: an LM head's weight is never whole in float.
        reference = _by_rows(plan.n, reference_rows)
        test = _by_rows(plan.n, lambda n0, n1: _rows_of(eager, n0, n1)(x))
    return {"name": plan.name, "op": op["op"].split(".")[1], "n": plan.n, "k": plan.k,
            "reference": reference.detach().to(torch.float32), "test": test.detach().to(torch.float32)}


ROWS_AT_ONCE = 4096  # output rows (a multiple of the packed layouts' column padding, 8)


def _by_rows(n: int, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    return torch.cat([fn(n0, min(n, n0 + ROWS_AT_ONCE)) for n0 in range(0, n, ROWS_AT_ONCE)], dim=-1)


def _rows_of(layer, n0: int, n1: int) -> nn.Module:
    """Output rows [n0, n1) of a quantized linear, as a linear of its own."""
    from .quantized_linear import QuantizedLinear

    bias = layer.bias[n0:n1] if layer.bias is not None else None
    return QuantizedLinear(layer.weight[n0:n1], layer.weight_scale[n0:n1], layer.weight_zero_point[n0:n1], layer.block_size,
                           layer.weight_bits, layer.dtype, bias, layer.dynamic_activations, layer.opaque,
                           in_features=layer.in_features)


def _streamed_layer(loaded, name: str, transposed: set[str], names: dict[str, str]) -> nn.Module:
    """A skeleton layer with its checkpoint tensors (``names``: ``stream.checkpoint_names``): small
    ones read, a 2-D weight by rows (``layer.rows``)."""
    from .stream import RowReader

    weights = loaded.weights
    skeleton = loaded.module.get_submodule(name)
    layer = nn.Module()
    layer.rows = None
    for attr, param in skeleton.named_parameters(recurse=False):
        key = names.get(f"{name}.{attr}")
        if key is None:
            raise VerifyError(f"the checkpoint has no tensor for {name}.{attr}", "pass the checkpoint the file was exported from")
        if attr == "weight" and name not in transposed and param.dim() == 2:
            layer.weight = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
            layer.rows = RowReader(weights, key)
        else:
            value = weights.read(key)
            value = value.t() if attr == "weight" and name in transposed else value
            setattr(layer, attr, nn.Parameter(value.contiguous(), requires_grad=False))
    if "bias" not in layer._parameters:
        layer.bias = None
    return layer

