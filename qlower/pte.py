"""Read a .pte: the program, its execution plan, and each Vulkan delegate's VkGraph.

Decoding uses ExecuTorch's own deserializers (``deserialize_pte_binary`` for the
program, ``flatbuffer_to_vk_graph`` for the Vulkan blob). Everything a report
needs is derived from ``Pte``; nothing here writes files.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PteError, first_line

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
    def short_name(self) -> str:
        """"et_vk.linear_q4gsw.default" → "linear_q4gsw"; "aten.add.Tensor" → "add.Tensor"."""
        namespace, _, rest = self.name.partition(".")
        base, _, overload = rest.partition(".")
        if namespace == "et_vk":
            return base
        return base if overload in ("", "default") else f"{base}.{overload}"


@dataclass
class Delegate:
    index: int  # position in program.backend_delegate_data
    backend_id: str
    blob_size: int
    graph: Any = None  # VkGraph for Vulkan delegates

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
class Pte:
    size: int
    pte_file: Any
    delegates: list[Delegate]
    steps: list[PlanStep]
    named_sizes: dict[str, int] = field(default_factory=dict)

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
        return bytes(named.buffers[named.pte_data[key].buffer_index])


def read_pte(source: str | Path | bytes) -> Pte:
    data = _read_bytes(source)
    if len(data) < 8 or data[4:6] != PTE_MAGIC:
        raise PteError("not an ExecuTorch .pte file (bad magic)", "pass a file written by qlower export or ExecuTorch's to_executorch()")
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        pte_file = deserialize_pte_binary(data)
    except Exception as exc:
        raise PteError(f"cannot decode the .pte: {type(exc).__name__}: {first_line(exc)}", "the file is truncated or corrupted") from exc
    program = pte_file.program
    delegates = []
    for i, blob in enumerate(program.backend_delegate_data):
        delegates.append(Delegate(i, "?", len(blob.data)))
    steps: list[PlanStep] = []
    for plan in program.execution_plan[:1]:
        ops = plan.operators
        for d in plan.delegates:
            index = d.processed.index
            if 0 <= index < len(delegates):
                delegates[index].backend_id = d.id
        for chain in plan.chains:
            for instr in chain.instructions:
                args = instr.instr_args
                kind = type(args).__name__
                if kind == "DelegateCall":
                    d = plan.delegates[args.delegate_index]
                    steps.append(PlanStep("delegate", d.id, d.processed.index))
                elif kind == "KernelCall":
                    op = ops[args.op_index]
                    steps.append(PlanStep("kernel", f"{op.name}.{op.overload}" if op.overload else op.name))
    for d in delegates:
        if d.backend_id == VULKAN_BACKEND:
            d.graph = decode_vk_graph(bytes(program.backend_delegate_data[d.index].data))
    named = pte_file.named_data
    named_sizes = {}
    if named is not None:
        named_sizes = {k: len(named.buffers[v.buffer_index]) for k, v in named.pte_data.items()}
    return Pte(len(data), pte_file, delegates, steps, named_sizes)


def decode_vk_graph(blob: bytes):
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
    try:
        return _flatbuffer_to_vk_graph(blob[header.flatbuffer_offset:end])
    except Exception as exc:
        raise PteError(f"cannot decode the Vulkan graph: {first_line(exc)}", "the .pte is corrupted") from exc


# flatc writes non-finite doubles as bare inf/nan, which json rejects; ExecuTorch's
# own flatbuffer_to_vk_graph therefore fails on any graph holding -inf (attention masks).
_NON_FINITE = re.compile(r'(?<=[\[:,\s])(-?)(inf|nan)(?=[\s,\]}])')


def _flatbuffer_to_vk_graph(flatbuffer: bytes):
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
    if path.is_dir():
        raise PteError(f"{path} is a directory, not a .pte file", "pass the path of a .pte file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PteError(f"file not found: {path}", "check the path") from None
    except OSError as exc:
        raise PteError(f"cannot read {path}: {exc.strerror}", "check the path and permissions") from exc



# --- summaries ---------------------------------------------------------------

# Fused ops: which argument positions hold packed weights, and which hold scales/sums.
FUSED_OP_ARGS = {
    "linear_dq8ca_q4gsw": {"weights": (3,), "scales": (4, 5)},
    "linear_q4gsw": {"weights": (1,), "scales": (2,)},
    "linear_q8ta_q8csw": {"weights": (3,), "scales": (4, 5)},
    "q8ta_linear": {"weights": (3,), "scales": (4, 5)},
    "q8ta_linear_gemv": {"weights": (3,), "scales": (4, 5)},
    "embedding_q4gsw": {"weights": (0,), "scales": (1,)},
}
FLOAT_DTYPES = {"FLOAT16", "FLOAT32", "FLOAT64"}


def fused_op_histogram(pte: Pte) -> Counter:
    return Counter(op.short_name for d in pte.vulkan_delegates for op in d.ops if op.name.startswith("et_vk."))


def cpu_operators(pte: Pte) -> Counter:
    return Counter(s.name for s in pte.steps if s.kind == "kernel")


def size_breakdown(pte: Pte) -> dict[str, int]:
    """Bytes of packed weights, scales (and sums), float weights, and everything else."""
    packed = scales = floats = 0
    for d in pte.vulkan_delegates:
        graph = d.graph
        role: dict[int, str] = {}
        for op in d.ops:
            spec = FUSED_OP_ARGS.get(op.short_name)
            if spec:
                for kind in ("weights", "scales"):
                    for pos in spec[kind]:
                        if pos < len(op.args):
                            role.setdefault(op.args[pos], kind)
        for vid, value in enumerate(graph.values):
            tensor = value.value
            if type(tensor).__name__ != "VkTensor" or tensor.constant_id < 0:
                continue
            length = graph.constants[tensor.constant_id].length
            kind = role.get(vid)
            if kind == "weights":
                packed += length
            elif kind == "scales":
                scales += length
            elif tensor.datatype.name in FLOAT_DTYPES:
                floats += length
    other = max(pte.size - packed - scales - floats, 0)
    return {"total": pte.size, "packed_weights": packed, "scales": scales, "float_weights": floats, "other": other}


def summarize(pte: Pte) -> dict[str, Any]:
    """The counts that export prints and CI asserts on."""
    return {
        "vulkan_partitions": sum(1 for s in pte.steps if s.kind == "delegate" and s.name == VULKAN_BACKEND),
        "other_delegates": sorted({s.name for s in pte.steps if s.kind == "delegate" and s.name != VULKAN_BACKEND}),
        "cpu_ops": dict(sorted(cpu_operators(pte).items())),
        "fused_ops": dict(sorted(fused_op_histogram(pte).items())),
        "size": size_breakdown(pte),
    }
