"""verify: prove a .pte's numbers against the eager model.

Three runs on the same inputs:

(a) the eager float model (loaded from the model file),
(b) the eager quantized model (the same model quantized as export does),
(c) the .pte, executed by :mod:`qlower.golden` (what the file serializes).

Per output, (c) is compared with (a) and (b): SQNR in dB, cosine similarity,
max abs error, over all samples together. Per layer, each linear op of the
.pte (fused ``et_vk`` linears, or ``aten.linear`` for float schemes) is
compared with the same layer of (b). Layers are matched by order: the .pte's
linear ops in execution order against (b)'s ``nn.Linear`` calls (or, for the
PT2E-quantized static scheme, its ``aten.linear`` nodes) in call order; a
pair must have the same output shape, and an eager layer with no same-shaped
counterpart at that point (a layer left on the CPU) is skipped. The first
layer in execution order below the layer threshold is named in the failure:
errors propagate downstream, so that is where the file went wrong.

The scheme and group size are read from the .pte (which fused ops it holds,
and their group size) unless given.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import references
from .errors import VerifyError
from .golden import GoldenExecutor, OpRecord
from .groups import group_rows
from .metrics import SQNR_IDENTICAL_DB, THRESHOLDS, Thresholds, compare, conclude, quality_finding, sqnr_db, thresholds_for
from .patterns.guards import PT2E_CONV_TARGETS
from .verify_sample import file_layers
from .loader import describe_tensor, random_like, read_input_batches
from .provenance import algorithm_options, options_for
from .pte import Pte, read_pte
from .quantized_linear import LINEAR_LAYERS

# --- scheme from the file ------------------------------------------------------------


# --- inputs ---------------------------------------------------------------------------


def make_samples(example_inputs: tuple, samples: int, seed: int, inputs_file: str | Path | None = None) -> list[tuple]:
    """Input batches: from --inputs FILE, else the example inputs then random ones like them."""
    if inputs_file is not None:
        batches = read_input_batches(Path(inputs_file), "inputs", VerifyError, tensor_is_batches=False)
    else:
        gen = torch.Generator().manual_seed(seed)
        batches = [tuple(example_inputs)] + [tuple(random_like(t, gen) for t in example_inputs) for _ in range(max(samples, 1) - 1)]
    for i, batch in enumerate(batches):
        if len(batch) != len(example_inputs):
            raise VerifyError(f"input batch {i} has {len(batch)} tensors, the model takes {len(example_inputs)}", "match the example inputs")
        for j, (got, want) in enumerate(zip(batch, example_inputs)):
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                raise VerifyError(
                    f"input batch {i} tensor {j} is {describe_tensor(got)}, the .pte was exported for {describe_tensor(want)}",
                    "the .pte has static shapes: inputs must match the example inputs' shape and dtype exactly",
                )
    return batches


# --- layer capture --------------------------------------------------------------------


@dataclass
class LayerOutput:
    name: str
    output: torch.Tensor
    op: str = ""
    delegate: int | None = None
    op_index: int | None = None
    # PT2E graphs: (target, args, kwargs) of the layer's node as it ran, so the
    # layer can be run again on another input (see isolated_eager_layer).
    call: tuple | None = None


def _leaves(value) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def run_eager_with_layers(module: nn.Module, inputs: tuple) -> tuple[list[torch.Tensor], list[LayerOutput]]:
    """Outputs and each linear layer's output (PT2E graphs: and each quantized conv's), in call order."""
    captured: list[LayerOutput] = []
    with torch.no_grad():
        if isinstance(module, torch.fx.GraphModule):
            outputs = _LinearRecorder(module, captured).run(*inputs)
        else:
            handles = [
                child.register_forward_hook(lambda m, a, out, name=name: captured.append(LayerOutput(name, out.detach().clone())))
                for name, child in module.named_modules() if isinstance(child, LINEAR_LAYERS)
            ]
            try:
                outputs = module(*inputs)
            finally:
                for h in handles:
                    h.remove()
    return _leaves(outputs), captured


_PT2E_LINEARS = (torch.ops.aten.linear.default, torch.nn.functional.linear)


class _LinearRecorder(torch.fx.Interpreter):
    """Records every aten.linear node of a (PT2E) graph module, and every conv
    whose weight is dequantized (the quantized ones, which become q8ta ops),
    with the arguments it ran with."""

    def __init__(self, module, captured: list[LayerOutput]):
        super().__init__(module)
        self.captured = captured

    def run_node(self, n):
        result = super().run_node(n)
        if n.op == "call_function" and (n.target in _PT2E_LINEARS or (n.target in PT2E_CONV_TARGETS and _dequantized(n.args[1]))):
            stack = n.meta.get("nn_module_stack") or {}
            name = list(stack.values())[-1][0] if stack else n.name
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.captured.append(LayerOutput(str(name), result.detach().clone(), call=(n.target, args, kwargs)))
        return result


def _dequantized(node) -> bool:
    return isinstance(node, torch.fx.Node) and "dequantize" in str(node.target)


# q8ta ops with int8 input and output; args 1-2 the input's, 6-7 the output's qparams.
INT8_LAYER_OPS = frozenset({"et_vk.q8ta_linear.default", "et_vk.q8ta_linear_gemv.default"}) | references.CONV_OPS


def golden_layer(record: OpRecord) -> LayerOutput:
    """A golden layer op's output as float (int8 q8ta outputs dequantized)."""
    out = record.output
    if record.name in INT8_LAYER_OPS:
        out = references.dequantize_per_tensor(out, record.args[6], record.args[7])
    return LayerOutput("", out.detach().float(), record.name, record.delegate, record.index)


# Fused ops whose first argument is the float input of the eager nn.Linear.
FLOAT_INPUT_LINEAR_OPS = frozenset({"et_vk.linear_dq8ca_q4gsw.default", "et_vk.linear_q4gsw.default"})


def isolated_eager_layer(module: nn.Module, name: str, record: OpRecord, call: tuple | None = None) -> torch.Tensor | None:
    """The eager quantized layer run on the golden run's own input to that layer.

    Comparing layers in isolation keeps upstream differences out: a per-token
    rounding tie that lands differently in float (summation order) flips one
    int8 activation and the difference then grows layer by layer (measured:
    133 dB at the first layer, 42 dB five layers later in a 2-block decoder),
    which would hide, or mimic, a damaged weight. In isolation both sides
    quantize the same input, so only a difference in the layer itself shows.
    A PT2E graph's layer is run again from its recorded ``call`` (its
    dequantized weights and bias as the graph computed them) on the golden
    op's int8 input dequantized, as the graph's own dequantize node would.
    None where the input cannot be fed to the eager module (an ``aten.linear``
    whose input the graph quantized before it, a float input to a PT2E layer).
    """
    if isinstance(module, torch.fx.GraphModule):
        if call is None or record.name not in INT8_LAYER_OPS:
            return None
        target, args, kwargs = call
        x = references.dequantize_per_tensor(record.args[0], record.args[1], record.args[2])
        with torch.no_grad():
            return target(x, *args[1:], **kwargs).detach()
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        return None
    # A float layer (skipped, or a float scheme) is fed like a fused one; an
    # unfused quantized one would quantize its already quantized input again.
    float_layer = record.name == "aten.linear.default" and type(layer) is nn.Linear
    if record.name not in FLOAT_INPUT_LINEAR_OPS and not float_layer:
        return None
    with torch.no_grad():
        return layer(record.args[0].float()).detach()


def eager_counterpart(record: OpRecord, eager: torch.Tensor) -> torch.Tensor:
    """The eager layer output as the fused op produces it (fused relu, int8 requantization)."""
    eager = eager.float()
    if record.name in INT8_LAYER_OPS:
        position = references.ACTIVATION_ARG[record.name]
        activation = record.args[position] if len(record.args) > position else "none"
        q = references.requantize(eager, record.args[6], record.args[7], activation or "none")
        eager = references.dequantize_per_tensor(q, record.args[6], record.args[7])
    return eager


def split_stacked(golden: list[LayerOutput], records: list[OpRecord], parts: dict[tuple[int, int], list[int]]
                  ) -> tuple[list[LayerOutput], list[OpRecord]]:
    """A fused linear that computes several eager layers at once (export's merged Q/K/V:
    ``fuse.merge_sibling_projections``) as one golden layer per part, its output columns in order.

    ``parts``: (delegate blob, op index) → the widths the file gives the op's parts
    (:func:`qlower.verify_sample.file_layers`). The parts share the op's record (and so its input)."""
    out_layers, out_records = [], []
    for g, record in zip(golden, records):
        start = 0
        for width in parts.get((record.blob, record.index)) or [g.output.shape[-1]]:
            out_layers.append(LayerOutput(g.name, g.output[..., start:start + width], g.op, g.delegate, g.op_index))
            out_records.append(record)
            start += width
    return out_layers, out_records


def match_layers(golden: list[LayerOutput], eager: list[LayerOutput]) -> list[tuple[int, int | None]]:
    """(golden index, eager index or None): in order, same output shape."""
    pairs, j = [], 0
    for i, g in enumerate(golden):
        k = j
        while k < len(eager) and not _same_shape(g.output, eager[k].output):
            k += 1
        if k < len(eager):
            pairs.append((i, k))
            j = k + 1
        else:
            pairs.append((i, None))
    return pairs


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and a.shape[-1:] == b.shape[-1:]


# --- verify -------------------------------------------------------------------------------


@dataclass
class Models:
    """The eager models and inputs a verification compares against."""

    float_model: nn.Module
    quantized_model: nn.Module
    example_inputs: tuple
    scheme: str
    group_size: int | None


def load_models(model_path: str | Path, pte: Pte, *, scheme: str | None = None, group_size: int | None = None,
                config: str | Path | None = None, entry: str | None = None, checkpoint: str | Path | None = None,
                calibration: str | None = None, quantize_embeddings: bool | None = None, seed: int = 0,
                warn: Callable[[str], None] = lambda message: None, algorithm: dict[str, Any] | None = None) -> Models:
    """(a) and (b): the float model, and a copy quantized by export's own quantize stage."""
    from .config import GROUPED_SCHEMES
    from .llm.load import load_any
    from .quantize import quantize_model

    options = options_for(pte, scheme=scheme, group_size=group_size, config=config, calibration=calibration,
                          quantize_embeddings=quantize_embeddings, seed=seed, algorithm=algorithm)
    torch.manual_seed(options.seed)  # as export's load stage, for models that do not seed themselves
    loaded, _, _ = load_any(model_path, options, entry=entry, checkpoint=checkpoint)
    float_model = copy.deepcopy(loaded.module)
    quantized, _ = quantize_model(loaded, options, warn)
    return Models(float_model, quantized, loaded.example_inputs, options.scheme,
                  options.group_size if options.scheme in GROUPED_SCHEMES else None)


def verify(model_path: str | Path, pte_path: str | Path | bytes, *, scheme: str | None = None,
           group_size: int | None = None, config: str | Path | None = None, entry: str | None = None,
           checkpoint: str | Path | None = None, calibration: str | None = None, inputs: str | Path | None = None,
           seed: int = 0, samples: int = 1, min_sqnr_float: float | None = None,
           min_sqnr_quantized: float | None = None, min_sqnr_layer: float | None = None,
           sample: int | None = None, on_layer: Callable[[dict], None] | None = None,
           warn: Callable[[str], None] = lambda message: None, weight_algorithm: str | None = None,
           calibration_text: str | Path | None = None, calibration_tokens: int | None = None) -> dict[str, Any]:
    """Verify ``pte_path`` against the model in ``model_path``; returns the report.

    ``report["defects"]`` lists the outputs and layers below the vs-quantized and
    layer bars (the file does not compute what the quantized model computes);
    ``report["quality"]`` is what quantization costs against float (see
    :mod:`qlower.metrics`). ``report["passed"]`` is False on a defect, or below
    ``min_sqnr_float`` when it is given; ``report["failures"]`` says why, first cause first.
    ``sample=N`` checks N fused int4 layers alone, one in memory at a time
    (:mod:`qlower.verify_sample`; ``on_layer`` hears of each), instead of
    running the whole model. The int4 weight algorithm (and its calibration) defaults to the file's record.
    """
    if sample:
        from .verify_sample import verify_sample

        pte = read_pte(pte_path, constants=False)
        algorithm = algorithm_options(pte, model_path, weight_algorithm, calibration_text, calibration_tokens)
        options = options_for(pte, scheme=scheme, group_size=group_size, config=config, calibration=calibration, seed=seed,
                              algorithm=algorithm)
        return verify_sample(model_path, pte, pte_path, sample, options=options, entry=entry, checkpoint=checkpoint, seed=seed,
                             min_sqnr_layer=min_sqnr_layer if min_sqnr_layer is not None else THRESHOLDS[options.scheme].layer,
                             on_layer=on_layer)
    pte = read_pte(pte_path)
    if is_decode_file(pte):
        return verify_decode(model_path, pte, str(pte_path) if not isinstance(pte_path, (bytes, bytearray)) else "<bytes>",
                             config=config, entry=entry, checkpoint=checkpoint, seed=seed, steps=max(samples, DECODE_STEPS),
                             min_sqnr_float=min_sqnr_float, min_sqnr_quantized=min_sqnr_quantized, warn=warn,
                             weight_algorithm=weight_algorithm, calibration_text=calibration_text,
                             calibration_tokens=calibration_tokens)
    algorithm = algorithm_options(pte, model_path, weight_algorithm, calibration_text, calibration_tokens)
    models = load_models(model_path, pte, scheme=scheme, group_size=group_size, config=config, entry=entry,
                         checkpoint=checkpoint, calibration=calibration, seed=seed, warn=warn, algorithm=algorithm)
    batches = make_samples(models.example_inputs, samples, seed, inputs)
    report = compare_models(pte, models, batches, thresholds_for(models.scheme, min_sqnr_float, min_sqnr_quantized, min_sqnr_layer),
                            enforce_float=min_sqnr_float is not None)
    report["model"] = str(model_path)
    report["pte"] = str(pte_path) if not isinstance(pte_path, (bytes, bytearray)) else "<bytes>"
    return report


DECODE_PROMPT = 8  # prompt tokens of verify's decode check
DECODE_STEPS = 4  # decode steps at least


def is_decode_file(pte: Pte) -> bool:
    return any(m.name == "use_kv_cache" for m in pte.methods)


def verify_decode(model_path, pte: Pte, pte_name: str, *, seed: int = 0, steps: int = DECODE_STEPS,
                  warn: Callable[[str], None] = lambda message: None, **options) -> dict[str, Any]:
    """A KV-cache file: a prefill of random tokens and ``steps`` greedy decode steps, logits compared per step."""
    from .llm.generate import generate, read_decode_file

    vocab = int(read_decode_file(pte).metadata.get("get_vocab_size", 2))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (DECODE_PROMPT,), generator=gen).tolist()
    report = generate(model_path, pte, prompt, max_new_tokens=steps, seed=seed, warn=warn, **options)
    report.update(kind="decode", passed=report["ok"], pte=pte_name)
    return report


def verify_after_export(job, *, samples: int = 1, seed: int | None = None, inputs: str | Path | None = None,
                        min_sqnr_float: float | None = None, min_sqnr_quantized: float | None = None,
                        min_sqnr_layer: float | None = None) -> dict[str, Any]:
    """Verify the .pte an ``ExportJob`` just produced, reusing its quantized model.

    Only the float model is loaded again (dynamic schemes quantize the loaded
    module in place).
    """
    from .config import GROUPED_SCHEMES
    from .llm.load import load_any

    if job.made.pte_bytes is None or job.made.quantized is None:
        raise VerifyError("the export did not finish, there is nothing to verify", "run the export first")
    options = job.request.options
    pte = read_pte(job.made.pte_bytes)
    if job.made.kv_cache:
        return verify_decode(job.request.model_path, pte, str(job.request.output) if job.request.output is not None else "<bytes>",
                             options=job.request.options, entry=job.request.entry, checkpoint=job.request.checkpoint, seed=options.seed, steps=max(samples, DECODE_STEPS),
                             min_sqnr_float=min_sqnr_float, min_sqnr_quantized=min_sqnr_quantized, warn=job.request.warn)
    torch.manual_seed(options.seed)
    loaded, _, _ = load_any(job.request.model_path, options, entry=job.request.entry, checkpoint=job.request.checkpoint)
    models = Models(loaded.module, job.made.quantized, loaded.example_inputs, options.scheme,
                    options.group_size if options.scheme in GROUPED_SCHEMES else None)
    batches = make_samples(models.example_inputs, samples, options.seed if seed is None else seed, inputs)
    report = compare_models(pte, models, batches, thresholds_for(options.scheme, min_sqnr_float, min_sqnr_quantized, min_sqnr_layer),
                            enforce_float=min_sqnr_float is not None)
    report["model"] = str(job.request.model_path)
    report["pte"] = str(job.request.output) if job.request.output is not None else "<bytes>"
    return report


def compare_models(pte: Pte, models: Models, batches: list[tuple], thresholds: Thresholds,
                   enforce_float: bool = False) -> dict[str, Any]:
    """The file's outputs and layers against the eager models: ``defects`` (below the vs-quantized
    or layer bar) and the ``quality`` finding (the worst output vs float; it fails ``passed`` only
    with ``enforce_float``, i.e. a bar the user set)."""
    golden_out: list[list[torch.Tensor]] = []
    float_out: list[list[torch.Tensor]] = []
    quant_out: list[list[torch.Tensor]] = []
    # Per layer (matched by position), the concatenation over samples.
    layer_golden: list[list[torch.Tensor]] = []
    layer_eager: list[list[torch.Tensor]] = []
    layer_info: list[dict[str, Any]] = []
    merged = {(op["delegate"].index, op["index"]): op["parts"] for op in file_layers(pte) if op["parts"]}
    for batch in batches:
        records: list[OpRecord] = []
        executor = GoldenExecutor(pte, on_op=lambda r: records.append(r) if r.name in references.LAYER_OPS else None)
        with torch.no_grad():
            golden = executor.run(batch)
            fl = _leaves(models.float_model(*batch))
        q, eager_layers = run_eager_with_layers(models.quantized_model, batch)
        if not (len(golden) == len(fl) == len(q)):
            raise VerifyError(f"the .pte has {len(golden)} outputs, the eager model {len(fl)}",
                              "verify the .pte against the model file it was exported from")
        golden_out.append(golden)
        float_out.append(fl)
        quant_out.append(q)
        golden_layers, records = split_stacked([golden_layer(r) for r in records], records, merged)
        pairs = match_layers(golden_layers, eager_layers)
        if not layer_info:
            for (i, k), g in zip(pairs, golden_layers):
                layer_info.append({
                    "index": i,
                    "name": eager_layers[k].name if k is not None else None,
                    "op": g.op,
                    "delegate_call": g.delegate,
                    "op_index": g.op_index,
                    "shape": list(g.output.shape),
                })
                layer_golden.append([])
                layer_eager.append([])
        for (i, k), g, record in zip(pairs, golden_layers, records):
            if i < len(layer_golden) and k is not None:
                layer_golden[i].append(g.output)
                eager = isolated_eager_layer(models.quantized_model, eager_layers[k].name, record, eager_layers[k].call)
                layer_eager[i].append(eager_counterpart(record, eager if eager is not None else eager_layers[k].output))

    outputs = []
    defects = []
    for o in range(len(golden_out[0])):
        test = torch.cat([s[o].detach().float().flatten() for s in golden_out])
        vs_float = compare(torch.cat([s[o].detach().float().flatten() for s in float_out]), test)
        vs_quant = compare(torch.cat([s[o].detach().float().flatten() for s in quant_out]), test)
        outputs.append({"index": o, "shape": list(golden_out[0][o].shape), "vs_float": vs_float, "vs_quantized": vs_quant})
        if vs_quant["sqnr_db"] < thresholds.vs_quantized:
            defects.append(f"output {o}: {vs_quant['sqnr_db']:.1f} dB vs the quantized eager model (threshold {thresholds.vs_quantized:g} dB)")
    layer_failures = []
    for info, g, e in zip(layer_info, layer_golden, layer_eager):
        if info["name"] is None or not g:
            info["sqnr_db"] = None
            continue
        info["sqnr_db"] = round(sqnr_db(torch.cat([t.flatten() for t in e]), torch.cat([t.flatten() for t in g])), 2)
        if info["sqnr_db"] < thresholds.layer:
            layer_failures.append(
                f"layer {info['name']} ({info['op'].removesuffix('.default')}, delegate call {info['delegate_call']} op {info['op_index']}): "
                f"{info['sqnr_db']:.1f} dB vs the quantized eager model (threshold {thresholds.layer:g} dB)"
            )
    # The first bad layer in execution order is the cause; later ones inherit its error.
    defects = layer_failures[:1] + defects + layer_failures[1:]
    quality = quality_finding(min((o["vs_float"]["sqnr_db"] for o in outputs), default=None), thresholds.vs_float, enforce_float)
    return conclude({
        "scheme": models.scheme,
        "group_size": models.group_size,
        "samples": len(batches),
        "thresholds": asdict(thresholds),
        "outputs": outputs,
        "layers": layer_info,
        "layer_groups": layer_groups(layer_info),
        "unmatched_layers": sum(1 for info in layer_info if info["name"] is None),
        "defects": defects,
        "quality": quality,
    })


# Fields of a verified layer that differ from layer to layer and do not keep layers apart.
LAYER_POSITION_FIELDS = ("index", "delegate_call", "op_index", "sqnr_db")


def layer_groups(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers that differ only by their index (same op, same shape) as one group, with the
    least and the median SQNR of its members (None when none was matched)."""
    groups = group_rows(layers, ignore=LAYER_POSITION_FIELDS)
    for g in groups:
        values = sorted(layers[i]["sqnr_db"] for i in g["rows"] if layers[i].get("sqnr_db") is not None)
        g["sqnr_min_db"] = values[0] if values else None
        g["sqnr_median_db"] = _median(values) if values else None
    return groups


def _median(values: list[float]) -> float:
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else round((values[mid - 1] + values[mid]) / 2, 2)


# --- plot -----------------------------------------------------------------------------------


def plot_layers(report: dict[str, Any], path: str | Path) -> None:
    """Per-layer SQNR (vs the quantized eager model) as a bar chart PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VerifyError("--plot needs matplotlib, which is not installed", "pip install matplotlib") from None
    layers = [layer for layer in report["layers"] if layer.get("sqnr_db") is not None]
    if not layers:
        raise VerifyError("the .pte has no layer that could be matched to the eager model; nothing to plot", "see the report's layers")
    names = [layer["name"] for layer in layers]
    values = [layer["sqnr_db"] for layer in layers]
    threshold = report["thresholds"]["layer"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.5))
    colors = ["tab:red" if v < threshold else "tab:blue" for v in values]
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:g} dB")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("SQNR vs quantized eager (dB)")
    ax.set_title(f"{Path(str(report.get('pte', ''))).name} ({report['scheme']}): per-layer SQNR")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise VerifyError(f"cannot write {path}: {exc.strerror}", "choose a writable path for --plot") from exc
    finally:
        plt.close(fig)


# --- text report ------------------------------------------------------------------------------


def render_report(report: dict[str, Any], show_layers: bool = False, all_layers: bool = False) -> None:
    """The report as Rich tables on stdout."""
    from rich.table import Table

    from . import console

    t = report["thresholds"]
    title = f"verify {report.get('pte', '')} ({report['scheme']}" + (f", group size {report['group_size']}" if report.get("group_size") else "") + f", {report['samples']} sample(s))"
    table = Table(title=title, title_justify="left")
    for column in ("output", "shape", "SQNR vs float", "cos vs float", "max err vs float", "SQNR vs quantized", "max err vs quantized"):
        table.add_column(column, justify="right" if column != "output" else "left")
    for o in report["outputs"]:
        f, q = o["vs_float"], o["vs_quantized"]
        table.add_row(str(o["index"]), "×".join(map(str, o["shape"])),
                      _db(f["sqnr_db"], t["vs_float"]), f"{f['cosine']:.6f}", f"{f['max_abs_error']:.3g}",
                      _db(q["sqnr_db"], t["vs_quantized"]), f"{q['max_abs_error']:.3g}")
    console.out.print(table)
    console.out.print(f"thresholds: ≥ {t['vs_float']:g} dB vs float, ≥ {t['vs_quantized']:g} dB vs quantized eager, ≥ {t['layer']:g} dB per layer")
    if show_layers and all_layers:
        layers = Table(title="layers (vs the same layer of the quantized eager model)", title_justify="left")
        for column in ("#", "layer", "op", "at", "shape", "SQNR"):
            layers.add_column(column, justify="right" if column in ("#", "SQNR") else "left")
        for layer in report["layers"]:
            sqnr = "unmatched" if layer["sqnr_db"] is None else _db(layer["sqnr_db"], t["layer"])
            layers.add_row(str(layer["index"]), layer["name"] or "—", layer["op"].removesuffix(".default"),
                           f"call {layer['delegate_call']} op {layer['op_index']}", "×".join(map(str, layer["shape"])), sqnr)
        console.out.print(layers)
    elif show_layers:
        layers = Table(title="layers (vs the same layer of the quantized eager model)", title_justify="left")
        for column in ("layer", "op", "shape", "count", "SQNR min", "SQNR median"):
            layers.add_column(column, justify="right" if column in ("count", "SQNR min", "SQNR median") else "left")
        for g in report["layer_groups"]:
            if g["sqnr_min_db"] is None:
                low = median = "unmatched"
            else:
                low, median = _db(g["sqnr_min_db"], t["layer"]), _db(g["sqnr_median_db"], t["layer"])
            layers.add_row(g["name"] or "—", g["op"].removesuffix(".default"), "×".join(map(str, g["shape"])),
                           f"×{g['count']}", low, median)
        console.out.print(layers)
        if any(g["count"] > 1 for g in report["layer_groups"]):
            console.out.print("layers that differ only by their index share a row (least and median SQNR); --all-layers shows each")
    elif report["unmatched_layers"]:
        console.out.print(f"{report['unmatched_layers']} layer(s) of the .pte had no eager counterpart (see --layers)")
    _render_outcome(report)


def _render_outcome(report: dict[str, Any]) -> None:
    from . import console

    if report["passed"]:
        quality = report.get("quality")
        note = (f" (a quality finding, not a defect: worst output {quality['sqnr_vs_float_db']:.1f} dB vs float, below {quality['threshold_db']:g} dB)"
                if quality and quality["below"] else "")
        console.out.print(f"[green]passed[/]{note}")
    else:
        for failure in report["failures"]:
            console.out.print(f"[red]FAIL[/] {failure}")


def render_sample(report: dict[str, Any]) -> None:
    """verify --sample: the sampled layers as a Rich table on stdout."""
    from rich.table import Table

    from . import console

    table = Table(title=f"verify {report['pte']} ({report['scheme']}): {report['sampled']} of {report['fused_layers']} fused layers, "
                        "each alone vs the same layer quantized from the checkpoint", title_justify="left")
    for column in ("#", "layer", "op", "N", "K", "SQNR", "max err"):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right")
    for layer in report["layers"]:
        table.add_row(str(layer["index"]), layer["name"], layer["op"], str(layer["n"]), str(layer["k"]),
                      _db(layer["sqnr_db"], report["min_sqnr_layer"]), f"{layer['max_abs_error']:.3g}")
    console.out.print(table)
    console.out.print(f"threshold: ≥ {report['min_sqnr_layer']:g} dB per layer")
    _render_outcome(report)


def _db(value: float, threshold: float) -> str:
    text = "identical" if value >= SQNR_IDENTICAL_DB else f"{value:.1f} dB"
    return text if value >= threshold else f"[red]{text}[/]"
