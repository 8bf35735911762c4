"""qlower inspect: everything in a .pte as one report, and CI expectations over it.

``inspect_pte(path)`` returns a JSON-ready dict: the program (methods, inputs and
outputs, the execution plan, segments, named data), every delegate, and for each
Vulkan delegate its decoded VkGraph (op chain with readable arguments, fused
nodes with their parameters, constants and their users, a GPU memory estimate,
storage and layout overrides). ``expect=[...]`` adds pass/fail results.

Expectations are ``KEY OP INTEGER`` with OP one of ``== != >= <= > <``::

    partitions            Vulkan delegate calls in the execution plans
    delegates             delegate calls of any backend; delegates.<BackendId>
    fused                 fused (et_vk.*) nodes in the Vulkan graphs; fused.<op>,
                          e.g. fused.linear_dq8ca_q4gsw
    vk_ops                all Vulkan graph nodes; vk_ops.<op>, e.g. vk_ops.relu
    cpu_ops               CPU kernel calls (the fallbacks); cpu_ops.<operator>,
                          e.g. cpu_ops.aten::mul.Scalar
    methods               methods in the program
    size                  file size in bytes
    gpu_memory            estimated GPU memory in bytes
    runtime_problems      predicted "abort at load" problems on the ET-VK runtime
"""

from __future__ import annotations

import functools
import importlib.util
import math
import operator
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError
from .vkops import OP_NAMESPACE, SCHEMAS, required_runtime
from .groups import group_rows
from .pte import (FUSED_OP_ARGS, read_quantization_record, INLINE_CONSTANT, VULKAN_BACKEND, Delegate, Pte, is_fused_op, qualified_op_name, read_pte,
                  short_op_name, size_breakdown)

# --- expectations ------------------------------------------------------------

OPERATORS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
# Keys that take a ".<name>" suffix, and plain keys.
FAMILY_KEYS = ("delegates", "fused", "vk_ops", "cpu_ops")
PLAIN_KEYS = ("partitions", "methods", "size", "gpu_memory", "runtime_problems")
_EXPECTATION = re.compile(r"^\s*([A-Za-z_][\w.:]*)\s*(==|!=|>=|<=|>|<)\s*(\d+)\s*$")


@dataclass(frozen=True)
class Expectation:
    key: str
    op: str
    value: int

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def parse_expectation(text: str) -> Expectation:
    """``'fused.linear_dq8ca_q4gsw>=4'`` → Expectation; ConfigError naming the grammar otherwise."""
    m = _EXPECTATION.match(text)
    if not m:
        raise ConfigError(
            f"cannot parse expectation {text!r}",
            "write KEY OP INTEGER, e.g. 'partitions==1' or 'fused.linear_q4gsw>=4' (OP is one of == != >= <= > <)",
        )
    key, op, value = m.groups()
    family, dot, name = key.partition(".")
    if not (key in PLAIN_KEYS or key in FAMILY_KEYS or (family in FAMILY_KEYS and dot and name)):
        raise ConfigError(
            f"unknown expectation key {key!r}",
            f"keys: {', '.join(PLAIN_KEYS)}, and {', '.join(FAMILY_KEYS)} with or without a .<name> suffix",
        )
    return Expectation(key, op, int(value))


def expectation_value(report: dict[str, Any], key: str) -> int | None:
    """The report's number for ``key``; None when it cannot be known (runtime check unavailable)."""
    s = report["summary"]
    family, _, name = key.partition(".")
    if key == "partitions":
        return s["vulkan_partitions"]
    if key == "methods":
        return len(report["methods"])
    if key == "size":
        return report["size"]
    if key == "gpu_memory":
        return s["gpu_memory_bytes"]
    if key == "runtime_problems":
        problems = report["runtime_problems"]
        return None if problems is None else len(problems)
    table = {"delegates": s["delegate_calls"], "fused": s["fused_ops"], "vk_ops": s["vk_ops"], "cpu_ops": s["cpu_ops"]}[family]
    return table.get(name, 0) if name else sum(table.values())


def evaluate(report: dict[str, Any], expectations: Iterable[Expectation]) -> list[dict[str, Any]]:
    results = []
    for e in expectations:
        actual = expectation_value(report, e.key)
        if actual is None:
            ok, message = False, f"{e}: cannot check, the runtime capability data (qlower.runtime_caps) is not installed"
        else:
            ok = OPERATORS[e.op](actual, e.value)
            message = None if ok else f"expected {e}, got {actual}"
        results.append({"expectation": str(e), "key": e.key, "op": e.op, "value": e.value, "actual": actual, "ok": ok, "message": message})
    return results


# --- the report --------------------------------------------------------------


def inspect_pte(path: str | Path | bytes, expect: Iterable[str | Expectation] = ()) -> dict[str, Any]:
    """Read ``path`` and return the full report; with ``expect``, also the results
    under ``"expectations"`` and ``"ok"`` (False when any expectation fails)."""
    expectations = [e if isinstance(e, Expectation) else parse_expectation(e) for e in expect]
    pte = read_pte(path, constants=False)  # sizes of the weights, not their bytes
    report = build_report(pte, str(path) if not isinstance(path, (bytes, bytearray)) else None)
    report["expectations"] = evaluate(report, expectations)
    report["ok"] = all(r["ok"] for r in report["expectations"])
    return report


def build_report(pte: Pte, name: str | None = None) -> dict[str, Any]:
    program = pte.program
    by_index = {d.index: d for d in pte.delegates}
    methods = []
    for m in pte.methods:
        plan = []
        for step in m.steps:
            if step.kind == "delegate":
                d = by_index.get(step.delegate)
                plan.append({"kind": "delegate", "backend": step.name, "delegate": step.delegate, "blob_bytes": d.blob_size if d else None})
            else:
                plan.append({"kind": "kernel", "operator": step.name})
        methods.append({"name": m.name, "inputs": m.inputs, "outputs": m.outputs, "plan": plan})
    all_steps = [s for m in pte.methods for s in m.steps]
    delegate_calls = Counter(s.name for s in all_steps if s.kind == "delegate")
    cpu_ops = Counter(s.name for s in all_steps if s.kind == "kernel")
    vulkan = [vulkan_report(pte, d) for d in pte.vulkan_delegates]
    fused = Counter()
    vk_ops = Counter()
    for v in vulkan:
        fused.update(v["fused_ops"])
        vk_ops.update(v["op_histogram"])
    named = sorted(pte.named_sizes.items(), key=lambda kv: -kv[1])
    constant_buffer = [len(b.storage) for b in program.constant_buffer or []]
    mutable = pte.pte_file.mutable_data or []
    return {
        "file": name,
        "size": pte.size,
        "program": {
            "version": program.version,
            "program_bytes": pte.program_size,
            "segment_base": pte.segment_base,
            "segments": [{"offset": o, "size": s} for o, s in pte.segments],
            "segment_bytes": sum(s for _, s in pte.segments),
            "named_data": {"count": len(named), "bytes": sum(n for _, n in named), "entries": [{"key": k, "bytes": n} for k, n in named]},
            "constant_buffer": {"count": len(constant_buffer), "bytes": sum(constant_buffer)},
            "mutable_data": {"count": len(mutable), "bytes": sum(len(b.storage) for b in mutable)},
        },
        "methods": methods,
        "delegates": [
            {"index": d.index, "backend": d.backend_id, "blob_bytes": d.blob_size, "location": d.location, "compile_specs": d.compile_specs}
            for d in pte.delegates
        ],
        "summary": {
            "vulkan_partitions": delegate_calls.get(VULKAN_BACKEND, 0),
            "delegate_calls": dict(sorted(delegate_calls.items())),
            "other_delegates": sorted(b for b in delegate_calls if b != VULKAN_BACKEND),
            "cpu_ops": dict(sorted(cpu_ops.items())),
            "cpu_op_calls": sum(cpu_ops.values()),
            "fused_ops": dict(sorted(fused.items())),
            "vk_ops": dict(sorted(vk_ops.items())),
            "size": size_breakdown(pte),
            "gpu_memory_bytes": sum(v["memory"]["total_bytes"] for v in vulkan),
        },
        "vulkan": vulkan,
        "quantization": read_quantization_record(pte.named_bytes, pte.named_sizes),
        "decode": decode_section(methods, vulkan),
        **_runtime_section(pte),
    }


def decode_section(methods: list[dict[str, Any]], vulkan: list[dict[str, Any]]) -> dict[str, Any] | None:
    """An LLM file's runner metadata (its constant methods) and the KV caches inside the Vulkan graphs."""
    names = {m["name"] for m in methods}
    if "use_kv_cache" not in names:
        return None
    metadata = {}
    for m in methods:
        if not m["inputs"] and m["name"] != "forward":
            values = [o.get("value") for o in m["outputs"]]
            metadata[m["name"]] = values if m["name"].endswith("_ids") or len(values) != 1 else values[0]
    caches = []
    for v in vulkan:
        for op in v["ops"]:
            if op["short_name"] not in ("sdpa_with_kv_cache", "qlower.sdpa_with_kv_cache"):
                continue
            for arg in op["args"]:
                if arg["name"] in ("key_cache", "value_cache") and arg.get("kind") == "tensor":
                    n = math.prod(arg["shape"]) * DTYPE_BYTES.get(arg["dtype"], 4)
                    caches.append({"layer": len(caches) // 2, "kind": "K" if arg["name"] == "key_cache" else "V",
                                   "shape": arg["shape"], "dtype": arg["dtype"], "bytes": n, "node_id": op["node_id"]})
    return {"metadata": metadata, "kv_cache": caches, "kv_cache_bytes": sum(c["bytes"] for c in caches),
            "kv_cache_layers": len(caches) // 2}


# --- the Vulkan graph --------------------------------------------------------

DTYPE_NAMES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT32": "int32", "FLOAT16": "float16", "FLOAT32": "float32", "FLOAT64": "float64", "INT64": "int64"}
DTYPE_BYTES = {"bool": 1, "uint8": 1, "int8": 1, "int32": 4, "float16": 2, "float32": 4, "float64": 8, "int64": 8}
SHORT_DTYPE = {"bool": "bool", "uint8": "u8", "int8": "i8", "int32": "i32", "float16": "f16", "float32": "f32", "float64": "f64", "int64": "i64"}
STORAGE_NAMES = {"BUFFER": "buffer", "TEXTURE_3D": "texture3d", "TEXTURE_2D": "texture2d", "DEFAULT_STORAGE": "default"}
LAYOUT_NAMES = {"TENSOR_WIDTH_PACKED": "width_packed", "TENSOR_HEIGHT_PACKED": "height_packed", "TENSOR_CHANNELS_PACKED": "channels_packed", "DEFAULT_LAYOUT": "default"}
# Which dim a texture packs four elements along (the memory estimate pads it to 4).
PACKED_DIM = {"width_packed": -1, "height_packed": -2, "channels_packed": -3}
# The storage the runtime uses when neither the tensor nor the graph names one.
RUNTIME_DEFAULT_STORAGE = "texture3d"
RUNTIME_DEFAULT_LAYOUT = "width_packed"


def _enum_name(value: Any, names: dict[str, str]) -> str:
    raw = getattr(value, "name", str(value))
    return names.get(raw, raw.lower())


@functools.cache
def schema_arg_names(qualified: str) -> tuple[str, ...] | None:
    """Argument names of ``ns.op.overload`` from its registered schema (None when unknown)."""
    namespace, _, rest = qualified.partition(".")
    base, _, overload = rest.partition(".")
    try:
        import torch

        if namespace in OP_SCHEMA_NAMESPACES:
            return _known_arg_names().get(qualified if overload else f"{qualified}.default")
        if namespace == OP_NAMESPACE:  # qlower's runtime ops
            schema = next((s for s in SCHEMAS if s.startswith(base + "(")), None)
            return None if schema is None else tuple(a.name for a in torch._C.parse_schema(f"{namespace}::{schema}").arguments)
        packet = getattr(getattr(torch.ops, namespace), base)
        return tuple(a.name for a in getattr(packet, overload or "default")._schema.arguments)
    except Exception:  # an op this torch does not know: show positions instead of names
        return None


# Importing the libraries that register these namespaces (ExecuTorch's et_vk custom_ops_lib, its
# llama custom ops, torchao, exir's dim-order ops) imports exir and torchao: seconds that reading
# a file does not need. Their schemas are kept in data/op_schemas.txt (tests check it against the
# installed libraries; `python -m qlower.inspect` rewrites it).
OP_SCHEMA_NAMESPACES = ("et_vk", "llama", "torchao", "dim_order_ops", "quantized_decomposed")
OP_SCHEMAS_FILE = "op_schemas.txt"


@functools.cache
def _known_arg_names() -> dict[str, tuple[str, ...]]:
    """``ns.op.overload`` → argument names, from data/op_schemas.txt."""
    from importlib import resources

    import torch

    names = {}
    for line in resources.files("qlower").joinpath("data", OP_SCHEMAS_FILE).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            schema = torch._C.parse_schema(line)
            names[f"{schema.name.replace('::', '.')}.{schema.overload_name or 'default'}"] = tuple(a.name for a in schema.arguments)
    return names


def registered_schemas() -> list[str]:
    """The schemas of OP_SCHEMA_NAMESPACES that the imported libraries registered, sorted."""
    import torch

    return sorted({str(s) for s in torch._C._jit_get_all_schemas() if s.name.split("::")[0] in OP_SCHEMA_NAMESPACES})


def write_op_schemas() -> Path:
    """Rewrite data/op_schemas.txt from the installed libraries."""
    from .console import import_heavy_libraries
    from .llm.kv_cache import load_llm_custom_ops

    import_heavy_libraries()
    load_llm_custom_ops()
    path = Path(__file__).parent / "data" / OP_SCHEMAS_FILE
    path.write_text("# Operator schemas inspect labels arguments with; generated by `python -m qlower.inspect`.\n"
                    + "\n".join(registered_schemas()) + "\n")
    return path


class _Graph:
    """Readable views of one VkGraph's values."""

    def __init__(self, delegate: Delegate, fp16: bool):
        self.graph = delegate.graph
        self.fp16 = fp16
        self.default_storage = _enum_name(self.graph.storage_type_override, STORAGE_NAMES)
        self.default_layout = _enum_name(self.graph.memory_layout_override, LAYOUT_NAMES)

    def kind(self, vid: int) -> str:
        return type(self.graph.values[vid].value).__name__

    def tensor(self, vid: int):
        v = self.graph.values[vid].value
        return v if type(v).__name__ == "VkTensor" else None

    def storage(self, t) -> str:
        s = _enum_name(t.storage_type, STORAGE_NAMES)
        if s == "default":
            s = self.default_storage if self.default_storage != "default" else RUNTIME_DEFAULT_STORAGE
        return s

    def layout(self, t) -> str:
        s = _enum_name(t.memory_layout, LAYOUT_NAMES)
        if s == "default":
            s = self.default_layout if self.default_layout != "default" else RUNTIME_DEFAULT_LAYOUT
        return s

    def dtype(self, t) -> str:
        return _enum_name(t.datatype, DTYPE_NAMES)

    def gpu_bytes(self, t) -> int:
        """Bytes of a non-constant tensor on the GPU: texture packed dims padded to 4,
        fp32 stored as fp16 when the delegate forces it."""
        dims = list(t.dims) or [1]
        if self.storage(t).startswith("texture"):
            packed = PACKED_DIM.get(self.layout(t))
            if packed is not None and len(dims) >= -packed:
                dims[packed] = -(-dims[packed] // 4) * 4
        dtype = self.dtype(t)
        size = 2 if self.fp16 and dtype == "float32" else DTYPE_BYTES.get(dtype, 4)
        return math.prod(dims) * size

    def describe(self, vid: int, nested: bool = False) -> dict[str, Any]:
        """One value as JSON: tensors with dtype, shape, storage, layout; scalars and lists by value."""
        v = self.graph.values[vid].value
        kind = type(v).__name__
        if kind == "ValueList" and nested:  # lists of lists by id only: a corrupt graph may nest a list in itself
            return {"id": vid, "kind": "list", "items": [{"id": i, "kind": "ref"} for i in v.items]}
        if kind == "VkTensor":
            d = {"id": vid, "kind": "tensor", "dtype": self.dtype(v), "shape": list(v.dims)}
            if v.constant_id >= 0:
                d["constant"] = v.constant_id
            else:
                d.update(storage=self.storage(v), layout=self.layout(v), mem_obj=v.mem_obj_id)
            return d
        if kind == "ValueList":
            return {"id": vid, "kind": "list", "items": [self.describe(i, nested=True) for i in v.items]}
        if kind == "Null":
            return {"id": vid, "kind": "none"}
        if kind == "SymInt":
            return {"id": vid, "kind": "symint", "value": v.value}
        field_name = {"Int": "int_val", "Double": "double_val", "Bool": "bool_val", "String": "string_val"}.get(kind)
        if field_name:
            return {"id": vid, "kind": kind.lower(), "value": _finite(getattr(v, field_name))}
        if kind in ("IntList", "DoubleList", "BoolList"):
            return {"id": vid, "kind": kind.lower(), "value": [_finite(i) for i in v.items]}
        return {"id": vid, "kind": kind.lower()}


def _finite(value: Any) -> Any:
    """Non-finite doubles (attention masks hold -inf) as "inf"/"-inf"/"nan": strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def short_value(d: dict[str, Any]) -> str:
    """A described value as text: ``f32[4, 256] texture3d/width_packed``, ``const#3 u8[512, 128]``, ``128``."""
    kind = d["kind"]
    if kind == "tensor":
        shape = f"{SHORT_DTYPE.get(d['dtype'], d['dtype'])}[{', '.join(map(str, d['shape']))}]"
        if "constant" in d:
            return f"const#{d['constant']} {shape}"
        return f"{shape} {d['storage']}/{d['layout']}"
    if kind == "list":
        return "(" + ", ".join(short_value(i) for i in d["items"]) + ")"
    if kind == "none":
        return "None"
    if kind == "ref":
        return f"v{d['id']}"
    if kind == "string":
        return repr(d["value"])
    return str(d.get("value", kind))


def vulkan_report(pte: Pte, delegate: Delegate) -> dict[str, Any]:
    g = _Graph(delegate, fp16=delegate.compile_specs.get("force_fp16") in ("1", "true", "True"))
    graph = g.graph
    ops = []
    users: dict[int, list[str]] = defaultdict(list)
    fused: dict[str, list[dict[str, Any]]] = defaultdict(list)
    histogram: Counter = Counter()
    for call in graph.chain:
        args = list(call.args)
        qualified = qualified_op_name(call.name)
        short = short_op_name(qualified)
        histogram[short] += 1
        names = schema_arg_names(qualified)
        inputs, outputs = args[:-1], args[-1:]
        if names and len(names) == len(args) - 1:
            labels = list(names)
        else:  # unknown schema, or an op returning several values
            labels = [f"arg{i}" for i in range(len(inputs))]
        described = [{"name": n, **g.describe(v)} for n, v in zip(labels, inputs)]
        is_fused = is_fused_op(qualified)
        ops.append({
            "node_id": call.node_id,
            "op": qualified,
            "short_name": short,
            "fused": is_fused,
            "args": described,
            "outputs": [g.describe(v) for v in outputs],
        })
        for label, vid in zip(labels, inputs):
            users[vid].append(f"{short}#{call.node_id}.{label}")
        if is_fused:
            fused[short].append(_fused_params(g, short, call.node_id, dict(zip(labels, inputs)), outputs))
    constants, constant_bytes = _constants(pte, g, users)
    memory = _memory(g, constant_bytes)
    tensor_rows = []
    placement: Counter = Counter()
    for vid, value in enumerate(graph.values):
        t = g.tensor(vid)
        if t is None:
            continue
        row = g.describe(vid)
        row["users"] = users.get(vid, [])
        tensor_rows.append(row)
        if t.constant_id < 0:
            placement[f"{g.storage(t)}/{g.layout(t)}"] += 1
    fused_ops = {k: len(v) for k, v in sorted(fused.items())}
    return {
        "delegate": delegate.index,
        "blob_bytes": delegate.blob_size,
        "header": delegate.vk_header,
        "compile_specs": delegate.compile_specs,
        "values": len(graph.values),
        "inputs": [g.describe(i) for i in graph.input_ids],
        "outputs": [g.describe(i) for i in graph.output_ids],
        "fused_ops": fused_ops,
        "fused": {k: v for k, v in sorted(fused.items())},
        "fused_groups": fused_groups(fused),
        "op_histogram": dict(sorted(histogram.items())),
        "non_fused_ops": {k: n for k, n in sorted(histogram.items()) if k not in fused_ops},
        "ops": ops,
        "tensors": tensor_rows,
        "constants": constants,
        "memory": memory,
        "overrides": {
            "storage_type": g.default_storage,
            "memory_layout": g.default_layout,
            "tensor_placement": dict(sorted(placement.items())),
        },
    }


def fused_groups(fused: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Fused nodes with equal parameters (op, N, K, group size, bytes, ...) as one entry with their node ids."""
    rows = [{"op": op, **p} for op, nodes in sorted(fused.items()) for p in nodes]
    groups = group_rows(rows, name_key=None, ignore=("node_id",))
    for g in groups:
        g["node_ids"] = [rows[i]["node_id"] for i in g.pop("rows")]
    return groups


def _fused_params(g: _Graph, short: str, node_id: int, args: dict[str, int], outputs: list[int]) -> dict[str, Any]:
    """N, K, group size, packed weight bytes, scale dtype, activation of one fused node."""
    weights = g.tensor(args.get("weights", args.get("weight", -1))) if ("weights" in args or "weight" in args) else None
    scales = g.tensor(args["weight_scales"]) if "weight_scales" in args else None
    out = g.tensor(outputs[0]) if outputs else None
    x_id = next((args[k] for k in ("x", "self", "input") if k in args), None)
    x = g.tensor(x_id) if x_id is not None else None
    params: dict[str, Any] = {"node_id": node_id}
    if short not in FUSED_OP_ARGS:  # et_vk ops that are not quantized linears/embeddings (rms_norm, sdpa, ...)
        if x is not None:
            params["input"] = short_value(g.describe(x_id))
        return params
    if weights is not None:
        params["weight_dtype"] = g.dtype(weights)
        params["weight_shape"] = list(weights.dims)
        params["packed_weight_bytes"] = _constant_length(g, weights)
    if "weight" in args and weights is not None and len(weights.dims) == 2:  # embedding: [vocab, dim/2]
        params["n"] = weights.dims[0]
        params["k"] = out.dims[-1] if out is not None and out.dims else weights.dims[1] * 2
    elif short.startswith("q8ta_conv2d"):  # NCHW: N = C_out, K = C_in
        params["n"] = out.dims[-3] if out is not None and len(out.dims) >= 3 else None
        params["k"] = x.dims[-3] if x is not None and len(x.dims) >= 3 else None
    else:
        params["n"] = out.dims[-1] if out is not None and out.dims else (weights.dims[0] if weights is not None and weights.dims else None)
        params["k"] = x.dims[-1] if x is not None and x.dims else None
    group = args.get("group_size")
    params["group_size"] = g.describe(group).get("value") if group is not None else None
    if scales is not None:
        params["scale_dtype"] = g.dtype(scales)
        params["scale_bytes"] = _constant_length(g, scales)
    if "bias" in args:
        params["bias"] = g.kind(args["bias"]) != "Null"
    activation = args.get("activation")
    params["activation"] = g.describe(activation).get("value") if activation is not None else None
    if x is not None:
        params["input"] = short_value(g.describe(x_id))
    return params


def _constant_length(g: _Graph, t) -> int:
    if t.constant_id >= 0:
        return g.graph.constants[t.constant_id].length
    return g.gpu_bytes(t)


def _constants(pte: Pte, g: _Graph, users: dict[int, list[str]]) -> tuple[list[dict[str, Any]], int]:
    tensors_of: dict[int, list[int]] = defaultdict(list)
    for vid, value in enumerate(g.graph.values):
        t = g.tensor(vid)
        if t is not None and t.constant_id >= 0:
            tensors_of[t.constant_id].append(vid)
    rows, total = [], 0
    for cid, c in enumerate(g.graph.constants):
        key = c.named_key or None
        if c.offset != INLINE_CONSTANT:
            where = "blob"
        elif key is not None and key in pte.named_sizes:
            where = "named_data"
        else:
            where = "external"  # in a .ptd beside the .pte, or missing
        vids = tensors_of.get(cid, [])
        first = g.describe(vids[0]) if vids else None
        rows.append({
            "id": cid,
            "key": key,
            "bytes": c.length,
            "location": where,
            "dtype": first["dtype"] if first else None,
            "shape": first["shape"] if first else None,
            "values": vids,
            "users": [u for v in vids for u in users.get(v, [])],
        })
        total += c.length
    return rows, total


def _memory(g: _Graph, constant_bytes: int) -> dict[str, Any]:
    """Constants as stored plus the shared memory objects (each as big as its largest
    tensor) plus tensors with their own memory. An estimate: prepacking may re-lay
    constants, and staging buffers are not counted."""
    shared: dict[int, int] = {}
    own = 0
    for vid, value in enumerate(g.graph.values):
        t = g.tensor(vid)
        if t is None or t.constant_id >= 0:
            continue
        size = g.gpu_bytes(t)
        if t.mem_obj_id >= 0:
            shared[t.mem_obj_id] = max(shared.get(t.mem_obj_id, 0), size)
        else:
            own += size
    shared_total = sum(shared.values())
    return {
        "constants_bytes": constant_bytes,
        "shared_objects": {str(k): v for k, v in sorted(shared.items())},
        "shared_bytes": shared_total,
        "own_tensor_bytes": own,
        "total_bytes": constant_bytes + shared_total + own,
    }


# --- runtime compatibility ---------------------------------------------------


def runtime_problems(pte: Pte) -> list[dict[str, Any]] | None:
    """What would make the stock ET-VK runtime abort while loading each Vulkan graph
    (missing operators, missing shader variants), from ``qlower.runtime_caps``;
    None when that module is not installed."""
    runtime_caps = _runtime_caps()
    if runtime_caps is None:
        return None
    problems = []
    for d in pte.vulkan_delegates:
        for p in runtime_caps.load_problems(d.graph):
            problems.append({"delegate": d.index, "node_id": p.node_id, "op": p.op, "message": p.message})
    return problems


def _runtime_caps():
    """``qlower.runtime_caps`` when installed; its ``load_problems(VkGraph)`` returns
    objects with ``node_id``, ``op`` and ``message``."""
    if importlib.util.find_spec("qlower.runtime_caps") is None:
        return None
    from . import runtime_caps

    return runtime_caps


def _runtime_section(pte: Pte) -> dict[str, Any]:
    """The runtime the file needs (``stock``, or ``qlower``: linked with qlower's op library) and what the stock
    runtime would abort on while loading it."""
    problems = runtime_problems(pte)
    needs = required_runtime(op.name for d in pte.vulkan_delegates for op in d.ops)
    return {"runtime": needs, "runtime_check": "unavailable" if problems is None else "qlower.runtime_caps",
            "runtime_problems": problems}


if __name__ == "__main__":
    print(f"wrote {write_op_schemas()}")
