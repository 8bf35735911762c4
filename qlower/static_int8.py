"""The static int8 scheme (``q8ta``): PT2E per-tensor activations and per-channel symmetric weights.

Apart from the rest of the quantize stage because it needs torchao's PT2E flow and ExecuTorch's XNNPACK
annotators, which the int4 schemes do not.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchao.quantization.pt2e.quantizer import Quantizer

from .errors import ExportError, first_line
from .patterns.guards import PT2E_CONV_TARGETS


def quantize_static(module: nn.Module, example_inputs: tuple, plans: list, calibration: list[tuple]) -> nn.Module:
    """PT2E static int8: per-tensor activations, per-channel symmetric weights.

    The planned linears and convolutions are annotated (a conv's relu or
    ReLU6 inside its output quantization; BatchNorm is folded into the conv by
    ``prepare_pt2e``), and so is every add whose inputs are both int8 (residual
    connections), so that activations stay int8 from op to op.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = StaticInt8Quantizer(
        linears={p.name for p in plans if p.kind == "linear" and p.quantized},
        convs={p.name for p in plans if p.kind == "conv" and p.quantized},
    )
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


class StaticInt8Quantizer(Quantizer):
    """The planned layers with XNNPACK's static int8 config and annotators.

    XNNPACK's own ``annotate`` would take every op it knows (and turn add/mul
    scalars into float tensors, which made integer position ids float); this
    one annotates only: the planned linears (``linear_relu``, ``linear``), the
    planned convs and transposed convs followed by a clamp (relu: XNNPACK's
    ``conv_relu``/``conv_transpose_relu``; hardtanh/ReLU6: here) or not
    (``conv``/``conv_transpose``: weights per output channel, which is axis 1
    of a transposed conv's weight), and adds whose two inputs are
    int8 (``add_relu``, ``add``). Ops that only move or pool values (view,
    flatten, max pool, mean) then share their input's quantization
    (XNNPACK's ``propagate_annotation``).
    """

    def __init__(self, linears: set[str], convs: set[str]):
        super().__init__()
        self.linears, self.convs = linears, convs

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import OP_TO_ANNOTATOR, propagate_annotation

        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
        linear_filter = _module_filter(self.linears, {torch.ops.aten.linear.default})
        conv_filter = _module_filter(self.convs, PT2E_CONV_TARGETS)
        OP_TO_ANNOTATOR["linear_relu"](model, config, linear_filter)
        OP_TO_ANNOTATOR["linear"](model, config, linear_filter)
        OP_TO_ANNOTATOR["conv_relu"](model, config, conv_filter)
        OP_TO_ANNOTATOR["conv_transpose_relu"](model, config, conv_filter)
        _annotate_conv_hardtanh(model, config, conv_filter)
        OP_TO_ANNOTATOR["conv"](model, config, conv_filter)
        OP_TO_ANNOTATOR["conv_transpose"](model, config, conv_filter)
        OP_TO_ANNOTATOR["add_relu"](model, config, _int8_inputs)
        OP_TO_ANNOTATOR["add"](model, config, _int8_inputs)
        propagate_annotation(model)
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass


_HARDTANH_OPS = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}
_CONV_TRANSPOSE_TARGETS = {torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input,
                           torch.ops.aten.conv_transpose3d.input}


def _innermost_module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len("L['self']."):] if path.startswith("L['self'].") else path


def _module_filter(names: set[str], anchors: set) -> Callable[[torch.fx.Node], bool]:
    """Anchor nodes pass when traced from one of ``names``; any other node of a pattern passes."""
    return lambda n: n.target not in anchors or _innermost_module(n) in names


def _int8_inputs(node: torch.fx.Node) -> bool:
    """An add's inputs are both outputs of quantized ops (or of ops that share their quantization)."""
    if node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
        return True
    return len(node.args) >= 2 and all(_quantized_output(a) for a in node.args[:2])


def _quantized_output(node) -> bool:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import _is_share_obs_or_fq_op
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    for _ in range(16):  # through a few shape ops
        if not isinstance(node, torch.fx.Node):
            return False
        annotation = node.meta.get(Q_ANNOTATION_KEY)
        if annotation is not None and annotation.output_qspec is not None:
            return True
        if node.op != "call_function" or not _is_share_obs_or_fq_op(node.target) or not node.args:
            return False
        node = node.args[0]
    return False


def _annotate_conv_hardtanh(model: torch.fx.GraphModule, config, filter_fn) -> None:
    """conv → hardtanh (ReLU6): quantize after the clamp, as XNNPACK's conv_relu does after relu.

    Whether the clamp then folds into the fused conv is the fuse stage's
    call (``patterns.conv.clamp_problem``); it is reported if not.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import (
        _is_annotated,
        _mark_nodes_as_annotated,
        change_quantization_config,
        get_bias_qspec,
        get_input_act_qspec,
        get_output_act_qspec,
        get_weight_qspec,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    for clamp in model.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in _HARDTANH_OPS:
            continue
        conv = clamp.args[0]
        if not isinstance(conv, torch.fx.Node) or conv.target not in PT2E_CONV_TARGETS or len(conv.users) != 1:
            continue
        x, weight = conv.args[0], conv.args[1]
        bias = conv.args[2] if len(conv.args) > 2 and isinstance(conv.args[2], torch.fx.Node) else None
        partition = [clamp, conv, weight] + ([bias] if bias is not None else [])
        if _is_annotated(partition) or not all(filter_fn(n) for n in partition):
            continue
        weight_qspec = get_weight_qspec(config)
        if conv.target in _CONV_TRANSPOSE_TARGETS:  # [IC, OC, KH, KW]: output channels on axis 1
            weight_qspec = change_quantization_config(weight_qspec, ch_axis=1)
        qspecs = {x: get_input_act_qspec(config), weight: weight_qspec}
        if bias is not None:
            qspecs[bias] = get_bias_qspec(config)
        conv.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config), _annotated=True)
        _mark_nodes_as_annotated(partition)
