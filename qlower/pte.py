"""Read a .pte: the program, its execution plan, and each Vulkan delegate's VkGraph.

Decoding uses ExecuTorch's own deserializers (the steps of ``deserialize_pte_binary``
for the program, flatc with the Vulkan schema for the blob). The file is untrusted:
sizes its headers declare are checked against its length, the flatbuffer roots are
checked before decoding, and the decoding runs in a child process with a memory
limit and a deadline. Everything a report needs is derived from ``Pte``; nothing
here writes files.
"""

from __future__ import annotations

import faulthandler
import importlib.resources
import json
import os
import pickle
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PteError, first_line
from .et_modules import load_serialization

VULKAN_BACKEND = "VulkanBackend"
VK_HEADER_LENGTH = 30
VK_MAGIC = b"VH00"
PTE_MAGIC = b"ET"  # the flatbuffer identifier is "ET" + two version digits at byte 4


@dataclass
class VkOp:
    node_id: int
    name: str  # qualified name, e.g. "et_vk.linear_dq8ca_q4gsw.default"
    args: list[int]

    @property
    def qualified_name(self) -> str:
        return qualified_op_name(self.name)

    @property
    def short_name(self) -> str:
        return short_op_name(self.name)


# The Vulkan serializer names an operator by its OpOverload's __name__, which
# leaves out the namespace for some (``sdpa_with_kv_cache.default``,
# ``sym_size.int``); these are the namespaces such names come from.
BARE_NAME_NAMESPACES = {"sdpa_with_kv_cache": "llama", "update_cache": "llama", "custom_sdpa": "llama",
                        "sym_size": "aten", "sym_numel": "aten", "sym_stride": "aten"}
# Fused ops outside et_vk (ET-VK's fusion of update_cache + custom_sdpa).
FUSED_OTHER_OPS = {"llama.sdpa_with_kv_cache.default"}
# qlower's own runtime ops (export --runtime qlower; qlower/vkops): they need an ET-VK runtime linked with
# qlower's op library. Their short names keep the namespace ("qlower.linear_q4gsw"), apart from ET-VK's.
QLOWER_NAMESPACE = "qlower"


def qualified_op_name(name: str) -> str:
    """``sdpa_with_kv_cache.default`` → ``llama.sdpa_with_kv_cache.default``; qualified names unchanged."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in BARE_NAME_NAMESPACES:
        return f"{BARE_NAME_NAMESPACES[parts[0]]}.{name}"
    return name


def short_op_name(name: str) -> str:
    """"et_vk.linear_q4gsw.default" → "linear_q4gsw"; "aten.add.Tensor" → "add.Tensor";
    "sym_size.int" → "sym_size.int"; "llama.sdpa_with_kv_cache.default" → "sdpa_with_kv_cache"."""
    namespace, _, rest = qualified_op_name(name).partition(".")
    base, _, overload = rest.partition(".")
    if namespace == "et_vk":
        return base
    if namespace == QLOWER_NAMESPACE:
        return f"{namespace}.{base}"
    return base if overload in ("", "default") else f"{base}.{overload}"


def is_fused_op(name: str) -> bool:
    qualified = qualified_op_name(name)
    return ((qualified.startswith("et_vk.") and short_op_name(qualified) not in NOT_FUSED_ET_VK)
            or qualified in FUSED_OTHER_OPS or qualified.startswith(QLOWER_NAMESPACE + "."))


@dataclass
class Delegate:
    index: int  # position in program.backend_delegate_data
    backend_id: str
    blob_size: int
    graph: Any = None  # VkGraph for Vulkan delegates
    location: str = "inline"  # where the file keeps the blob: "inline" or "segment"
    compile_specs: dict[str, str] = field(default_factory=dict)
    vk_header: dict[str, int] | None = None  # the Vulkan blob's header fields

    @property
    def ops(self) -> list[VkOp]:
        if self.graph is None:
            return []
        return [VkOp(c.node_id, c.name, list(c.args)) for c in self.graph.chain]


@dataclass
class PlanStep:
    kind: str  # "delegate" | "kernel"
    name: str  # backend id or operator name
    delegate: int | None = None


@dataclass
class Method:
    name: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    steps: list[PlanStep]


# qlower's record of how the int4 weights were chosen (quantize.quantization_record): a small JSON blob in
# the program's named data, which runtimes never read (the delegate asks only for its constants' keys).
QUANTIZATION_RECORD_KEY = "qlower.quantization"


def read_quantization_record(named_bytes, keys) -> dict | None:
    """The record from a .pte's named data (``named_bytes(key)``, ``keys``); None if absent or unreadable."""
    import json

    if QUANTIZATION_RECORD_KEY not in keys:
        return None
    try:
        record = json.loads(named_bytes(QUANTIZATION_RECORD_KEY))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class Pte:
    size: int
    pte_file: Any
    delegates: list[Delegate]
    steps: list[PlanStep]  # the first method's plan
    named_sizes: dict[str, int] = field(default_factory=dict)
    methods: list[Method] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) after the segment base
    program_size: int = 0  # bytes of the program flatbuffer
    segment_base: int = 0  # file offset of the first segment (0: no segments)
    source: Path | None = None  # the file it was read from (named data dropped at decode is read from it when asked)
    named_segments: dict[str, int] = field(default_factory=dict)  # named data key -> its segment

    @property
    def program(self):
        return self.pte_file.program

    @property
    def vulkan_delegates(self) -> list[Delegate]:
        return [d for d in self.delegates if d.backend_id == VULKAN_BACKEND]

    def named_bytes(self, key: str) -> bytes:
        named = self.pte_file.named_data
        if named is None or key not in named.pte_data:
            raise PteError(f"constant {key!r} is missing from the file's named data", "the .pte is corrupted or needs an external data file")
        data = named.buffers[named.pte_data[key].buffer_index]
        if not data and self.named_sizes.get(key) and self.source is not None:  # read_pte(constants=False)
            return self._read_named(key)
        return bytes(data)

    def _read_named(self, key: str) -> bytes:
        """One named constant read from the file alone (its segment)."""
        offset, _ = self.segments[self.named_segments[key]]
        with open(self.source, "rb") as f:
            f.seek(self.segment_base + offset)
            data = f.read(self.named_sizes[key])
        if len(data) != self.named_sizes[key]:
            raise PteError(f"constant {key!r} lies outside {self.source}", "the .pte is truncated")
        return data


# Decoding runs ExecuTorch's flatbuffer readers (and the flatc binary for VkGraphs)
# on bytes we do not trust. They do not verify offsets: a crafted file can make them
# crash, recurse, or expand shared tables without bound. So the decode runs in a
# forked child with an address-space limit and a deadline; the parent gets back the
# decoded objects or one line saying why not.
DECODE_MEMORY_BASE = 1 << 30  # bytes the child may grow by, plus DECODE_MEMORY_PER_BYTE × file size
DECODE_MEMORY_PER_BYTE = 16
DECODE_SECONDS_BASE = 60.0  # plus one second per 8 MiB of file
EH_MAGIC = b"eh00"
EH_LENGTH = 32  # bytes of the extended header at offset 8 (magic, length, program size, segment base, segment data size)


def read_pte(source: str | Path | bytes, constants: bool = True) -> Pte:
    """The decoded file. ``constants=False`` drops the named data's bytes (their sizes stay):
    what the export summary reads of a multi-GB file, without holding its weights."""
    data = _read_bytes(source)
    program_size, segment_base = check_header(data)
    pte = _run_bounded(_decode, data, program_size, segment_base, constants)
    if not isinstance(source, (bytes, bytearray)):
        pte.source = Path(source)
    return pte


def check_header(data: bytes) -> tuple[int, int]:
    """Checks the file header and the sizes it declares against the file; returns
    (program flatbuffer size, segment base offset or 0)."""
    if len(data) == 0:
        raise PteError("the file is empty", "pass a file written by qlower export or ExecuTorch's to_executorch()")
    if len(data) < 8 or data[4:6] != PTE_MAGIC or not data[6:8].isdigit():
        raise PteError("not an ExecuTorch .pte file (bad magic)", "pass a file written by qlower export or ExecuTorch's to_executorch()")
    program_size, segment_base = len(data), 0
    if data[8:12] == EH_MAGIC:
        if len(data) < 8 + EH_LENGTH:
            raise PteError(f"the .pte header is cut off ({len(data)} bytes)", "the file is truncated")
        length = int.from_bytes(data[12:16], "little")
        program_size = int.from_bytes(data[16:24], "little")
        segment_base = int.from_bytes(data[24:32], "little")
        segment_data_size = int.from_bytes(data[32:40], "little") if length >= 32 else 0
        if length < 24:
            raise PteError(f"the .pte extended header declares a length of {length} bytes", "the file is corrupted")
        if not 8 + length <= program_size <= len(data):
            raise PteError(f"the .pte header declares a {program_size}-byte program in a {len(data)}-byte file", "the file is truncated or corrupted")
        if segment_base and not program_size <= segment_base <= len(data):
            raise PteError(f"the .pte header puts segments at byte {segment_base} of a {len(data)}-byte file", "the file is truncated or corrupted")
        if segment_base and segment_base + segment_data_size > len(data):
            raise PteError(f"the .pte header declares {segment_data_size} bytes of segments after byte {segment_base}, but the file has {len(data)} bytes", "the file is truncated")
    check_flatbuffer_root(data[:program_size], "program")
    return program_size, segment_base


def check_flatbuffer_root(buf: bytes, what: str) -> None:
    """The root table's offset, its vtable and its inline size must lie inside ``buf``."""
    n = len(buf)
    if n < 12:
        raise PteError(f"the {what} flatbuffer is cut off ({n} bytes)", "the file is truncated")
    root = int.from_bytes(buf[0:4], "little")
    if root % 4 or not 8 <= root <= n - 4:
        raise PteError(f"the {what} flatbuffer's root offset {root} is outside its {n} bytes", "the file is corrupted")
    vtable = root - int.from_bytes(buf[root:root + 4], "little", signed=True)
    if vtable % 2 or not 0 <= vtable <= n - 4:
        raise PteError(f"the {what} flatbuffer's root vtable offset {vtable} is outside its {n} bytes", "the file is corrupted")
    vsize = int.from_bytes(buf[vtable:vtable + 2], "little")
    tsize = int.from_bytes(buf[vtable + 2:vtable + 4], "little")
    if vsize < 4 or vsize % 2 or vtable + vsize > n or root + tsize > n:
        raise PteError(f"the {what} flatbuffer's root table does not fit in its {n} bytes", "the file is corrupted")
    for i in range(4, vsize, 2):
        field_offset = int.from_bytes(buf[vtable + i:vtable + i + 2], "little")
        if field_offset and field_offset + 1 > tsize:
            raise PteError(f"the {what} flatbuffer's root table has a field outside the table", "the file is corrupted")


def _decode(data: bytes, program_size: int, segment_base: int, constants: bool = True) -> Pte:
    load_serialization()  # without exir's and the Vulkan backend's package __init__
    from executorch.exir._serialize._program import PTEFile, _flatbuffer_to_program, _restore_segments

    try:
        program = _flatbuffer_to_program(data[:program_size])
    except RecursionError:
        raise PteError("cannot decode the .pte: its program flatbuffer refers to itself", "the file is corrupted") from None
    except Exception as exc:
        raise PteError(f"cannot decode the .pte: {type(exc).__name__}: {first_line(exc)}", "the file is truncated or corrupted") from exc
    segments = [(s.offset, s.size) for s in program.segments or []]
    named_segments = {n.key: n.segment_index for n in program.named_data or []}
    locations = {}
    for plan in program.execution_plan:
        for d in plan.delegates:
            locations[id(d)] = "segment" if getattr(d.processed.location, "name", "") == "SEGMENT" else "inline"
    if segment_base:
        try:
            segment_data = data[segment_base:] if constants else _DelegateSegmentsOnly(data, segment_base, program)
            pte_file = _restore_segments(program=program, segment_data=segment_data)
        except Exception as exc:
            raise PteError(f"cannot decode the .pte's segments: {first_line(exc)}", "the file is truncated or corrupted") from exc
    else:
        if segments or program.named_data:
            raise PteError("the .pte refers to segments but its header declares none", "the file is corrupted")
        pte_file = PTEFile(program=program, mutable_data=None, named_data=None)
    program = pte_file.program
    delegates = [Delegate(i, "?", len(blob.data)) for i, blob in enumerate(program.backend_delegate_data)]
    methods = []
    for plan in program.execution_plan:
        for d in plan.delegates:
            index = d.processed.index
            if not 0 <= index < len(delegates):
                raise PteError(f"method {plan.name!r} refers to delegate data #{index} of {len(delegates)}", "the file is corrupted")
            delegates[index].backend_id = d.id
            delegates[index].location = locations.get(id(d), "inline")
            delegates[index].compile_specs = {s.key: _spec_text(s.value) for s in d.compile_specs}
        methods.append(Method(plan.name, [_evalue(plan, i) for i in plan.inputs], [_evalue(plan, i) for i in plan.outputs], _plan_steps(plan)))
    for d in delegates:
        if d.backend_id == VULKAN_BACKEND:
            d.graph, d.vk_header = decode_vk_graph(bytes(program.backend_delegate_data[d.index].data), with_header=True)
    named = pte_file.named_data
    named_sizes = {}
    if named is not None:
        named_sizes = {k: len(named.buffers[v.buffer_index]) for k, v in named.pte_data.items()}
        if not constants:
            named.buffers[:] = [b""] * len(named.buffers)
    steps = methods[0].steps if methods else []
    return Pte(len(data), pte_file, delegates, steps, named_sizes, methods, segments, program_size, segment_base,
               named_segments=named_segments)


def _plan_steps(plan) -> list[PlanStep]:
    steps = []
    for chain in plan.chains:
        for instr in chain.instructions:
            args = instr.instr_args
            kind = type(args).__name__
            if kind == "DelegateCall":
                if not 0 <= args.delegate_index < len(plan.delegates):
                    raise PteError(f"method {plan.name!r} calls delegate #{args.delegate_index} of {len(plan.delegates)}", "the file is corrupted")
                d = plan.delegates[args.delegate_index]
                steps.append(PlanStep("delegate", d.id, d.processed.index))
            elif kind == "KernelCall":
                if not 0 <= args.op_index < len(plan.operators):
                    raise PteError(f"method {plan.name!r} calls operator #{args.op_index} of {len(plan.operators)}", "the file is corrupted")
                op = plan.operators[args.op_index]
                steps.append(PlanStep("kernel", f"{op.name}.{op.overload}" if op.overload else op.name))
    return steps


def _evalue(plan, index: int) -> dict[str, Any]:
    if not 0 <= index < len(plan.values):
        raise PteError(f"method {plan.name!r} has an input or output #{index} of {len(plan.values)} values", "the file is corrupted")
    val = plan.values[index].val
    kind = type(val).__name__
    if kind == "Tensor":
        dtype = getattr(val.scalar_type, "name", str(val.scalar_type))
        out = {"kind": "tensor", "dtype": SCALAR_TYPE_NAMES.get(dtype, dtype.lower()), "shape": list(val.sizes)}
        dynamism = getattr(getattr(val, "shape_dynamism", None), "name", "STATIC")
        if dynamism != "STATIC":
            out["dynamic"] = True  # sizes are upper bounds
        return out
    # Constant values (the metadata methods of an LLM file return them).
    if kind == "Int":
        return {"kind": "int", "value": int(val.int_val)}
    if kind == "Bool":
        return {"kind": "bool", "value": bool(val.bool_val)}
    if kind == "Double":
        return {"kind": "double", "value": float(val.double_val)}
    return {"kind": kind.lower()}


# ExecuTorch ScalarType names → the torch dtype names people know.
SCALAR_TYPE_NAMES = {
    "BYTE": "uint8", "CHAR": "int8", "SHORT": "int16", "INT": "int32", "LONG": "int64",
    "HALF": "float16", "FLOAT": "float32", "DOUBLE": "float64", "BOOL": "bool", "BFLOAT16": "bfloat16",
}


def _spec_text(value: bytes) -> str:
    value = bytes(value)
    if len(value) == 1:
        return str(value[0])
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.hex()


def decode_vk_graph(blob: bytes, with_header: bool = False):
    load_serialization()  # without exir's and the Vulkan backend's package __init__
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import VulkanDelegateHeader

    if len(blob) < VK_HEADER_LENGTH or blob[4:8] != VK_MAGIC:
        raise PteError("Vulkan delegate blob has a bad header", "the .pte is corrupted")
    try:
        header = VulkanDelegateHeader.from_bytes(blob[:VK_HEADER_LENGTH])
    except Exception as exc:
        raise PteError(f"Vulkan delegate header is invalid: {first_line(exc)}", "the .pte is corrupted") from exc
    end = header.flatbuffer_offset + header.flatbuffer_size
    if header.flatbuffer_offset < VK_HEADER_LENGTH or end > len(blob):
        raise PteError(f"Vulkan delegate claims a graph at bytes {header.flatbuffer_offset}..{end} of a {len(blob)}-byte blob", "the .pte is truncated or corrupted")
    if header.bytes_offset + header.bytes_size > len(blob):
        raise PteError(f"Vulkan delegate claims constant bytes up to {header.bytes_offset + header.bytes_size} of a {len(blob)}-byte blob", "the .pte is truncated or corrupted")
    flatbuffer = blob[header.flatbuffer_offset:end]
    check_flatbuffer_root(flatbuffer, "Vulkan graph")
    try:
        graph = _flatbuffer_to_vk_graph(flatbuffer)
    except subprocess.CalledProcessError as exc:
        raise PteError(f"cannot decode the Vulkan graph: flatc rejected it (status {exc.returncode})", "the .pte is corrupted") from exc
    except Exception as exc:
        raise PteError(f"cannot decode the Vulkan graph: {first_line(exc)}", "the .pte is corrupted") from exc
    check_vk_graph(graph, header.bytes_size)
    if not with_header:
        return graph
    fields = ("flatbuffer_offset", "flatbuffer_size", "bytes_offset", "bytes_size")
    return graph, {f: getattr(header, f) for f in fields}


INLINE_CONSTANT = (1 << 64) - 1  # VkBytes.offset of a constant kept in named data


def check_vk_graph(graph, inline_bytes: int) -> None:
    """Every id the graph uses must name one of its values or constants."""
    load_serialization()  # without exir's and the Vulkan backend's package __init__
    from executorch.backends.vulkan.serialization import vulkan_graph_schema as vk

    def bad(what: str) -> PteError:
        return PteError(f"the Vulkan graph {what}", "the .pte is corrupted")

    n_values, n_constants = len(graph.values), len(graph.constants)
    for vid in (*graph.input_ids, *graph.output_ids):
        if not 0 <= vid < n_values:
            raise bad(f"names input/output value {vid} of {n_values}")
    for call in graph.chain:
        if not isinstance(call.name, str):
            raise bad(f"has an operator without a name (node {call.node_id})")
        for vid in call.args:
            if not 0 <= vid < n_values:
                raise bad(f"passes value {vid} of {n_values} to {call.name} (node {call.node_id})")
    for vid, value in enumerate(graph.values):
        v = value.value
        if isinstance(v, vk.VkTensor):
            if not -1 <= v.constant_id < n_constants:
                raise bad(f"tensor {vid} uses constant {v.constant_id} of {n_constants}")
            if any(d < 0 for d in v.dims):
                raise bad(f"tensor {vid} has a negative dimension {list(v.dims)}")
        elif isinstance(v, vk.ValueList):
            if any(not 0 <= i < n_values for i in v.items):
                raise bad(f"list {vid} names a value outside the graph")
    for cid, c in enumerate(graph.constants):
        if c.offset != INLINE_CONSTANT and c.offset + c.length > inline_bytes:
            raise bad(f"constant {cid} lies outside the blob's {inline_bytes} constant bytes")


# flatc writes non-finite doubles as bare inf/nan, which json rejects; ExecuTorch's
# own flatbuffer_to_vk_graph therefore fails on any graph holding -inf (attention masks).
_NON_FINITE = re.compile(r'(?<=[\[:,\s])(-?)(inf|nan)(?=[\s,\]}])')


def _flatbuffer_to_vk_graph(flatbuffer: bytes):
    load_serialization()  # without exir's and the Vulkan backend's package __init__
    import executorch.backends.vulkan.serialization as serialization_package
    from executorch.backends.vulkan.serialization.vulkan_graph_schema import VkGraph
    from executorch.exir._serialize._dataclass import _json_to_dataclass
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    with tempfile.TemporaryDirectory() as d:
        schema_path = os.path.join(d, "schema.fbs")
        Path(schema_path).write_bytes(importlib.resources.files(serialization_package).joinpath("schema.fbs").read_bytes())
        bin_path = os.path.join(d, "schema.bin")
        Path(bin_path).write_bytes(flatbuffer)
        _flatc_decompile(d, schema_path, bin_path, ["--raw-binary"])
        text = Path(d, "schema.json").read_text()
    text = _NON_FINITE.sub(lambda m: ("-" if m.group(1) else "") + ("Infinity" if m.group(2) == "inf" else "NaN"), text)
    return _json_to_dataclass(json.loads(text), VkGraph)


def _read_bytes(source: str | Path | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    path = Path(source)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PteError(f"file not found: {path}", "check the path") from None
    except OSError as exc:
        raise PteError(f"cannot read {path}: {exc.strerror}", "check the path and permissions") from exc
    if stat.S_ISDIR(st.st_mode):
        raise PteError(f"{path} is a directory, not a .pte file", "pass the path of a .pte file")
    if not stat.S_ISREG(st.st_mode):
        # a device or a pipe has no size to check against and may never end
        raise PteError(f"{path} is not a regular file", "pass the path of a .pte file")
    try:
        if st.st_size >= MAP_FILES_FROM_BYTES:
            # Mapped, not read: the decoding child touches the pages, this process only the header.
            import mmap

            with open(path, "rb") as f:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return path.read_bytes()
    except OSError as exc:
        raise PteError(f"cannot read {path}: {exc.strerror}", "check the path and permissions") from exc


MAP_FILES_FROM_BYTES = 64 << 20


class _Sized(bytes):
    """Stands for bytes that are not read, keeping only their length (named data of a file read
    without constants). Its few real bytes name the range, so ExecuTorch's named-data store,
    which deduplicates by content, keeps distinct ranges apart."""

    def __new__(cls, n: int, start: int = 0):
        obj = super().__new__(cls, f"{start}:{n}".encode())
        obj.n, obj.start = n, start
        return obj

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise PteError("this .pte was read without its constants", "read it again with constants")
        r = range(*key.indices(self.n))
        return _Sized(len(r), self.start + (r.start if len(r) else 0))


class _DelegateSegmentsOnly:
    """The segment data of a file (``data[base:]``) that copies out only the delegates' segments;
    any other segment (named data: the weights) comes back as its length alone."""

    def __init__(self, data, base: int, program):
        self.data, self.base = data, base
        wanted = {d.processed.index for plan in program.execution_plan for d in plan.delegates
                  if getattr(d.processed.location, "name", "") == "SEGMENT"}
        self.delegate_ranges = {(s.offset, s.offset + s.size) for i, s in enumerate(program.segments or []) if i in wanted}

    def __len__(self) -> int:
        return len(self.data) - self.base

    def __getitem__(self, key: slice):
        start, stop, _ = key.indices(len(self))
        if (start, stop) in self.delegate_ranges:
            return self.data[self.base + start:self.base + stop]
        return _Sized(stop - start, start)

# Exit statuses of the decoding child besides 0 (a pickled result follows).
_CHILD_NO_MEMORY = 3
_CHILD_BROKEN = 4


def _run_bounded(fn, data: bytes, *args):
    """``fn(data, *args)`` in a forked child with a memory limit and a deadline.

    The child sends back the pickled result or a PteError; a crash, a timeout or
    running out of memory becomes a PteError here. Without fork (or with
    QLOWER_DECODE_INLINE=1) it runs in this process.
    """
    if not hasattr(os, "fork") or os.environ.get("QLOWER_DECODE_INLINE") == "1":
        return fn(data, *args)
    load_serialization()  # without exir's and the Vulkan backend's package __init__
    import executorch.exir._serialize._program  # noqa: F401  import once here, not in every child
    import executorch.backends.vulkan.serialization.vulkan_graph_schema  # noqa: F401

    budget = DECODE_MEMORY_BASE + DECODE_MEMORY_PER_BYTE * len(data)
    deadline = DECODE_SECONDS_BASE + len(data) / (8 << 20)
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # no room for a child: decode here, unbounded
        os.close(read_fd)
        os.close(write_fd)
        return fn(data, *args)
    if pid == 0:  # the child: never returns
        status = _CHILD_BROKEN
        try:
            os.close(read_fd)
            _limit_child(budget)
            try:
                result = ("ok", fn(data, *args))
            except PteError as exc:
                result = ("error", exc.message, exc.hint)
            except MemoryError:
                raise
            except Exception as exc:  # the decoders' own failures on bad bytes
                result = ("error", f"cannot decode the .pte: {type(exc).__name__}: {first_line(exc)}", "the file is corrupted")
            payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(payload)
            status = 0
        except MemoryError:
            status = _CHILD_NO_MEMORY
        except BaseException:
            status = _CHILD_BROKEN
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    timed_out = False
    end = time.monotonic() + deadline
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            while True:
                left = end - time.monotonic()
                if left <= 0 or not select.select([pipe], [], [], left)[0]:
                    timed_out = True
                    break
                chunk = os.read(pipe.fileno(), 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        if timed_out or sys.exc_info()[0] is not None:  # also on Ctrl-C: leave no child behind
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        raise PteError(f"decoding the .pte took longer than {deadline:.0f} s", "the file is corrupted or crafted")
    if os.WIFSIGNALED(status):
        raise PteError(f"the .pte decoder crashed ({signal.Signals(os.WTERMSIG(status)).name})", "the file is corrupted")
    code = os.WEXITSTATUS(status)
    if code == _CHILD_NO_MEMORY or (code == _CHILD_BROKEN and not chunks):
        raise PteError(f"decoding the .pte needs more than {budget >> 20} MiB", "the file is corrupted or crafted")
    if code != 0:
        raise PteError(f"the .pte decoder failed (status {code})", "the file is corrupted")
    result = pickle.loads(b"".join(chunks))
    if result[0] == "error":
        raise PteError(result[1], result[2])
    return result[1]


def _limit_child(budget: int) -> None:
    import resource

    if os.environ.get("QLOWER_DEBUG") != "1":
        # the decoders and flatc print their complaints; the parent reports one line
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    faulthandler.disable()  # a crash here is reported by the parent, not dumped
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    current = _address_space_bytes()
    if current is not None:
        limit = current + budget
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _address_space_bytes() -> int | None:
    from .memory import status_kb

    kb = status_kb(("VmSize",)).get("VmSize")
    return kb * 1024 if kb is not None else None


# --- summaries ---------------------------------------------------------------

# Fused ops: which argument positions hold packed weights, and which hold scales/sums.
FUSED_OP_ARGS = {
    "linear_dq8ca_q4gsw": {"weights": (3,), "scales": (4, 5)},
    "linear_q4gsw": {"weights": (1,), "scales": (2,)},
    "linear_q8ta_q8csw": {"weights": (3,), "scales": (4, 5)},
    "q8ta_linear": {"weights": (3,), "scales": (4, 5)},
    "q8ta_linear_gemv": {"weights": (3,), "scales": (4, 5)},
    "embedding_q4gsw": {"weights": (0,), "scales": (1,)},
    "qlower.linear_q4gsw": {"weights": (1,), "scales": (2, 3)},
    "qlower.linear_q4gsw_split": {"weights": (1,), "scales": (2, 3)},
    **{op: {"weights": (3,), "scales": (4, 5)}
       for op in ("q8ta_conv2d", "q8ta_conv2d_pw", "q8ta_conv2d_dw", "q8ta_conv2d_transposed")},
}
FLOAT_DTYPES = {"FLOAT16", "FLOAT32", "FLOAT64"}


# et_vk ops that move data rather than compute a fused layer.
NOT_FUSED_ET_VK = {"prepack", "select_as_symint"}


def fused_op_histogram(pte: Pte) -> Counter:
    return Counter(op.short_name for d in pte.vulkan_delegates for op in d.ops
                   if is_fused_op(op.name))


def cpu_operators(pte: Pte) -> Counter:
    return Counter(s.name for s in pte.steps if s.kind == "kernel")


# Ops that take a KV cache, and the argument positions that hold it (its initial contents are a constant).
CACHE_ARGS = {"sdpa_with_kv_cache": (3, 4), "update_cache": (1,), "qlower.sdpa_with_kv_cache": (3, 4)}
# Where an int4 linear keeps its group size, and what it computes as ET-VK's op of the scheme:
# op short name → (group size position, position of the quantize-input flag or None, stock op when it is off / on).
INT4_LINEAR_OPS = {
    "linear_dq8ca_q4gsw": (6, None, "linear_dq8ca_q4gsw"),
    "linear_q4gsw": (3, None, "linear_q4gsw"),
    "qlower.linear_q4gsw": (4, 7, ("linear_q4gsw", "linear_dq8ca_q4gsw")),
    "qlower.linear_q4gsw_split": (4, 6, ("linear_q4gsw", "linear_dq8ca_q4gsw")),
}


def int4_linear(d: "Delegate", op: VkOp) -> tuple[str, int | None] | None:
    """(the stock int4 op ``op`` computes as, its group size) for an int4 linear of either runtime; None otherwise."""
    spec = INT4_LINEAR_OPS.get(op.short_name)
    if spec is None:
        return None
    gs_at, flag_at, stock = spec
    value = lambda at: d.graph.values[op.args[at]].value  # noqa: E731
    if flag_at is not None:
        stock = stock[bool(getattr(value(flag_at), "bool_val", False))]
    return stock, getattr(value(gs_at), "int_val", None)


# The parts of a file's bytes, in the order they are shown; they add up to the file size.
SIZE_PARTS = ("packed_weights", "scales", "float_weights", "kv_cache", "other_constants", "shared", "program_and_headers")


@dataclass
class _Stored:
    """Bytes stored once in the file and the graph tensors that use them."""

    bytes: int
    role: str  # one of SIZE_PARTS' constant roles
    dtype: str | None = None
    shape: list[int] | None = None
    users: int = 0


def size_breakdown(pte: Pte) -> dict[str, Any]:
    """The file's bytes by what they hold; every stored byte is counted once and the parts add up to ``total``.

    A constant is stored once however many graph tensors use it (ExecuTorch stores
    equal named data once: a decoder's zero KV caches, equal norm weights). Bytes used
    by one tensor count in its role (packed weights, scales and sums, float weights,
    KV cache, other constants); bytes used by several count once under ``shared``,
    each listed in ``shared_constants`` with its user count. The CPU operators'
    constants count as float weights or other constants by their dtype; named data
    that no Vulkan constant uses (other delegates') and mutable buffers' initial
    contents are ``other_constants``.
    ``program_and_headers`` is the rest: the program, the delegate graphs, headers
    and alignment padding. Constants kept outside the file (a .ptd) are ``external``,
    not part of the total.
    """
    stored: dict[tuple, _Stored] = {}
    external = 0
    for d in pte.vulkan_delegates:
        graph = d.graph
        role = _value_roles(d)
        tensors_of: dict[int, list[Any]] = {}
        for vid, value in enumerate(graph.values):
            tensor = value.value
            if type(tensor).__name__ == "VkTensor" and tensor.constant_id >= 0:
                tensors_of.setdefault(tensor.constant_id, []).append((vid, tensor))
        for cid, c in enumerate(graph.constants):
            key = _storage_key(pte, d, c)
            if key is None:
                external += c.length
                continue
            users = tensors_of.get(cid, [])
            entry = stored.get(key)
            if entry is None:
                first = users[0][1] if users else None
                kind = next((role[vid] for vid, _ in users if vid in role), None)
                if kind is None:
                    kind = "float_weights" if first is not None and first.datatype.name in FLOAT_DTYPES else "other_constants"
                dtype = first.datatype.name.lower() if first is not None else None
                entry = stored[key] = _Stored(c.length, kind, dtype, list(first.dims) if first is not None else None)
            entry.users += max(len(users), 1)
    parts = dict.fromkeys(SIZE_PARTS, 0)
    shared = []
    for entry in stored.values():
        if entry.users > 1:
            parts["shared"] += entry.bytes
            shared.append({"role": entry.role, "bytes": entry.bytes, "users": entry.users, "dtype": entry.dtype, "shape": entry.shape})
        else:
            parts[entry.role] += entry.bytes
    seen_segments = {k[1] for k in stored if k[0] == "segment"}
    named_segments = {}
    for name, index in pte.named_segments.items():
        if index not in seen_segments and name in pte.named_sizes:
            named_segments[index] = pte.named_sizes[name]
    parts["other_constants"] += sum(named_segments.values())
    for kind, n in _program_constants(pte):
        parts[kind] += n
    parts["program_and_headers"] = max(pte.size - sum(parts.values()), 0)
    shared.sort(key=lambda s: -s["bytes"] * s["users"])
    return {"total": pte.size, **parts, "shared_constants": shared, "external": external}


def _program_constants(pte: Pte) -> list[tuple[str, int]]:
    """(role, bytes) of the constants the program keeps for its CPU operators (the constant buffer),
    each buffer once, and of its mutable buffers' initial contents."""
    program = pte.program
    dtypes: dict[int, str] = {}
    for plan in program.execution_plan:
        for value in plan.values:
            t = value.val
            if type(t).__name__ == "Tensor" and t.data_buffer_idx > 0:
                dtypes.setdefault(t.data_buffer_idx, getattr(t.scalar_type, "name", ""))
    out = []
    for i, buffer in enumerate(program.constant_buffer or []):
        if i and len(buffer.storage):  # buffer 0 is the reserved empty one
            dtype = SCALAR_TYPE_NAMES.get(dtypes.get(i, ""), "")
            out.append(("float_weights" if dtype.startswith(("float", "bfloat")) else "other_constants", len(buffer.storage)))
    out += [("other_constants", len(b.storage)) for b in pte.pte_file.mutable_data or []]
    return out


def _value_roles(d: Delegate) -> dict[int, str]:
    """Value id → "packed_weights" / "scales" / "kv_cache" for the constant arguments of fused ops and caches."""
    role: dict[int, str] = {}
    for op in d.ops:
        short = op.short_name
        spec = FUSED_OP_ARGS.get(short, {})
        positions = [(p, "packed_weights") for p in spec.get("weights", ())] + [(p, "scales") for p in spec.get("scales", ())]
        positions += [(p, "kv_cache") for p in CACHE_ARGS.get(short, ())]
        for pos, kind in positions:
            if pos < len(op.args):
                role.setdefault(op.args[pos], kind)
    return role


def _storage_key(pte: Pte, d: Delegate, c) -> tuple | None:
    """Where a VkGraph constant's bytes lie in the file, as a key equal for equal storage; None outside the file."""
    if c.offset != INLINE_CONSTANT:
        return ("blob", d.index, c.offset, c.length)
    key = c.named_key
    if not key or key not in pte.named_sizes:
        return None
    if key in pte.named_segments:
        return ("segment", pte.named_segments[key])
    return ("named", pte.pte_file.named_data.pte_data[key].buffer_index)


def summarize(pte: Pte) -> dict[str, Any]:
    """The counts that export prints and CI asserts on."""
    return {
        "vulkan_partitions": sum(1 for s in pte.steps if s.kind == "delegate" and s.name == VULKAN_BACKEND),
        "other_delegates": sorted({s.name for s in pte.steps if s.kind == "delegate" and s.name != VULKAN_BACKEND}),
        "cpu_ops": dict(sorted(cpu_operators(pte).items())),
        "fused_ops": dict(sorted(fused_op_histogram(pte).items())),
        "size": size_breakdown(pte),
    }
