"""What the ExecuTorch Vulkan (ET-VK) runtime really implements.

The partitioner's idea of support is wider than the runtime's: a delegated
node whose operator the runtime never registered aborts the load with
``Missing operator: <name>``, and an operator implementation that builds a
shader variant name the runtime was not compiled with aborts with ``Could not
find ShaderInfo with name <name>``. The lists live in ``qlower/data/`` with
their provenance in the header lines (``tools/derive_runtime_caps.py`` derives
them); this module loads them and predicts, for a decoded VkGraph, the shader
variants its operators will look up.

Variant names are built by the runtime as ``<kernel>`` + suffixes, with
``_buffer``/``_texture3d``/``_texture2d`` for a storage type and ``_float``,
``_half``, ``_int32``, ``_uint8`` (bool too), ``_int8`` for a dtype; the order
of the suffixes differs per operator, which :data:`_SHADER_RULES` records.
Operators whose naming is not modelled are only checked for registration.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterable, Optional

from .et_modules import load_serialization

load_serialization()  # the Vulkan graph schema, without the backend's package __init__
from executorch.backends.vulkan.serialization import vulkan_graph_schema as vk  # noqa: E402

__all__ = [
    "LoadProblem",
    "ShaderLookup",
    "PteSummary",
    "load_problems",
    "op_supported",
    "predict_shaders",
    "runtime_ops",
    "runtime_shaders",
    "shader_exists",
    "summarize_pte",
]


def _read_names(filename: str) -> frozenset[str]:
    text = resources.files("qlower").joinpath("data", filename).read_text()
    return frozenset(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    )


@functools.cache
def runtime_ops() -> frozenset[str]:
    """Operator names the runtime registers, as a VkGraph names them."""
    return _read_names("et_vk_runtime_ops.txt")


@functools.cache
def runtime_shaders() -> frozenset[str]:
    """Shader variant names compiled into the runtime."""
    return _read_names("et_vk_runtime_shaders.txt")


def op_supported(name: str) -> bool:
    """``name`` as in a VkGraph ``OperatorCall`` (``aten.add.Tensor``)."""
    return name in runtime_ops()


def shader_exists(name: str) -> bool:
    return name in runtime_shaders()


_STORAGE = {
    vk.VkStorageType.BUFFER: "buffer",
    vk.VkStorageType.TEXTURE_3D: "texture3d",
    vk.VkStorageType.TEXTURE_2D: "texture2d",
}
_DTYPE = {
    vk.VkDataType.BOOL: "uint8",
    vk.VkDataType.UINT8: "uint8",
    vk.VkDataType.INT8: "int8",
    vk.VkDataType.INT32: "int32",
    vk.VkDataType.FLOAT16: "half",
    vk.VkDataType.FLOAT32: "float",
    vk.VkDataType.FLOAT64: "double",
    vk.VkDataType.INT64: "int64",
}


@dataclass(frozen=True)
class ShaderLookup:
    """One shader variant that an operator call will ask the runtime for."""

    node_id: int
    op: str
    shader: str

    @property
    def exists(self) -> bool:
        return shader_exists(self.shader)


@dataclass(frozen=True)
class LoadProblem:
    """Something that makes the runtime abort while it builds the graph."""

    node_id: int
    op: str
    message: str  # the runtime's own words

    def __str__(self) -> str:
        return f"will abort at load: {self.message} (node {self.node_id}, {self.op})"


class _Graph:
    """Storage and dtype of VkGraph values, as the runtime resolves them."""

    def __init__(self, graph: vk.VkGraph):
        self.graph = graph
        default = graph.storage_type_override
        self.default_storage = (
            vk.VkStorageType.TEXTURE_3D
            if default == vk.VkStorageType.DEFAULT_STORAGE
            else default
        )

    def tensor(self, vid: int) -> Optional[vk.VkTensor]:
        v = self.graph.values[vid].value
        return v if isinstance(v, vk.VkTensor) else None

    def storage(self, vid: int) -> Optional[str]:
        t = self.tensor(vid)
        if t is None:
            return None
        st = t.storage_type
        if st == vk.VkStorageType.DEFAULT_STORAGE:
            st = self.default_storage
        return _STORAGE.get(st)

    def dtype(self, vid: int) -> Optional[str]:
        t = self.tensor(vid)
        return None if t is None else _DTYPE.get(t.datatype)

    def scalar_dtype(self, vid: int, tensor_dtype: str) -> Optional[str]:
        # Float tensors take every scalar as float; otherwise ints (and bools,
        # symints) are int32 and doubles are float.
        if tensor_dtype in ("float", "half"):
            return "float"
        v = self.graph.values[vid].value
        if isinstance(v, (vk.Int, vk.Bool, vk.SymInt)):
            return "int32"
        if isinstance(v, vk.Double):
            return "float"
        return self.dtype(vid)


def _binary(kernel: str) -> Callable[[_Graph, list[int]], Optional[str]]:
    # binary_<op><storage of out><dtype of first input>
    def rule(g: _Graph, args: list[int]) -> Optional[str]:
        parts = (g.storage(args[-1]), g.dtype(args[0]))
        return None if None in parts else f"binary_{kernel}_{parts[0]}_{parts[1]}"

    return rule


def _binary_scalar(kernel: str) -> Callable[[_Graph, list[int]], Optional[str]]:
    # <op>_scalar<storage of out><dtype of tensor><dtype of scalar>
    def rule(g: _Graph, args: list[int]) -> Optional[str]:
        st, dt = g.storage(args[-1]), g.dtype(args[0])
        if st is None or dt is None:
            return None
        sdt = g.scalar_dtype(args[1], dt)
        return None if sdt is None else f"{kernel}_scalar_{st}_{dt}_{sdt}"

    return rule


def _dtype_storage(kernel: str) -> Callable[[_Graph, list[int]], Optional[str]]:
    # <kernel><dtype of out><storage of out> (unary ops)
    def rule(g: _Graph, args: list[int]) -> Optional[str]:
        st, dt = g.storage(args[-1]), g.dtype(args[-1])
        return None if None in (st, dt) else f"{kernel}_{dt}_{st}"

    return rule


def _storage_dtype(kernel: str) -> Callable[[_Graph, list[int]], Optional[str]]:
    # <kernel><storage of out><dtype of out>
    def rule(g: _Graph, args: list[int]) -> Optional[str]:
        st, dt = g.storage(args[-1]), g.dtype(args[-1])
        return None if None in (st, dt) else f"{kernel}_{st}_{dt}"

    return rule


def _scalar_tensor(g: _Graph, args: list[int]) -> Optional[str]:
    # scalar_tensor<dtype of out><storage of out><dtype of the scalar>
    st, dt = g.storage(args[-1]), g.dtype(args[-1])
    if None in (st, dt):
        return None
    v = g.graph.values[args[0]].value
    sdt = {vk.Int: "int32", vk.Bool: "bool", vk.Double: "float"}.get(type(v))
    return None if sdt is None else f"scalar_tensor_{dt}_{st}_{sdt}"


# Read from the runtime's operator implementations (BinaryOp.cpp,
# BinaryScalarOp.cpp, UnaryOp.cpp, Where.cpp, Full.cpp, Arange.cpp, ...).
_SHADER_RULES: dict[str, Callable[[_Graph, list[int]], Optional[str]]] = {
    **{
        f"aten.{op}.Tensor": _binary(op)
        for op in ("add", "sub", "mul", "div", "eq", "lt", "le", "gt", "ge")
    },
    "aten.pow.Tensor_Tensor": _binary("pow"),
    "aten.div.Tensor_mode": _binary("floor_divide"),
    "aten.minimum.default": _binary("minimum"),
    "aten.bitwise_and.Tensor": _binary("bitwise_and"),
    "aten.logical_and.default": _binary("bitwise_and"),
    "aten.bitwise_or.Tensor": _binary("bitwise_or"),
    "aten.logical_or.default": _binary("bitwise_or"),
    **{
        f"aten.{op}.Scalar": _binary_scalar(op)
        for op in ("eq", "ne", "lt", "le", "gt", "ge")
    },
    "aten.pow.Tensor_Scalar": _binary_scalar("pow"),
    **{
        f"aten.{op}.default": _dtype_storage(op)
        for op in (
            "abs", "cos", "exp", "gelu", "neg", "sigmoid", "sin", "sqrt", "rsqrt",
            "tanh", "hardshrink", "hardswish", "hardsigmoid", "round",
            "bitwise_not",
        )
    },
    "aten.where.self": _storage_dtype("where"),
    **{
        f"aten.{op}.default": _storage_dtype("full")
        for op in ("full", "full_like", "zeros", "zeros_like", "ones", "ones_like")
    },
    "aten.arange.start_step": _storage_dtype("arange"),
    "aten.expand_copy.default": _storage_dtype("expand"),
    "aten.permute_copy.default": _storage_dtype("permute"),
    "aten.permute.default": _storage_dtype("permute"),
    "aten.gather.default": _storage_dtype("gather"),
    "aten.repeat.default": _storage_dtype("repeat"),
    "aten._softmax.default": _storage_dtype("softmax"),
    "aten._log_softmax.default": _storage_dtype("log_softmax"),
    "aten.scalar_tensor.default": _scalar_tensor,
}


def _op_calls(graph: vk.VkGraph) -> Iterable[tuple[int, str, list[int]]]:
    for call in graph.chain:
        yield call.node_id, call.name, list(call.args)


def predict_shaders(graph: vk.VkGraph) -> list[ShaderLookup]:
    """Shader variants the runtime will look up for the modelled operators."""
    g = _Graph(graph)
    out = []
    for node_id, name, args in _op_calls(graph):
        rule = _SHADER_RULES.get(name)
        if rule is None or not args:
            continue
        shader = rule(g, args)
        if shader is not None:
            out.append(ShaderLookup(node_id, name, shader))
    return out


def load_problems(graph: vk.VkGraph) -> list[LoadProblem]:
    """Every reason the runtime would abort while loading ``graph``."""
    problems = [
        LoadProblem(node_id, name, f"Missing operator: {name}")
        for node_id, name, _ in _op_calls(graph)
        if not op_supported(name)
    ]
    problems += [
        LoadProblem(s.node_id, s.op, f"Could not find ShaderInfo with name {s.shader}")
        for s in predict_shaders(graph)
        if not s.exists
    ]
    return problems


@dataclass
class PteSummary:
    """How a .pte's first method runs: delegate calls, CPU kernels, load problems."""

    partitions: int
    cpu_kernels: dict[str, int]
    problems: list[LoadProblem]

    @property
    def cpu_kernel_calls(self) -> int:
        return sum(self.cpu_kernels.values())


def summarize_pte(buf: bytes) -> PteSummary:
    """Partitions, CPU kernels and predicted load problems of a .pte's first method."""
    from .pte import cpu_operators, read_pte

    pte = read_pte(buf)
    partitions = sum(1 for s in pte.steps if s.kind == "delegate")
    problems = [p for d in pte.vulkan_delegates for p in load_problems(d.graph)]
    return PteSummary(partitions, dict(cpu_operators(pte)), problems)
