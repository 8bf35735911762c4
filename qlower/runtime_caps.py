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

It also records which shapes and group sizes the fused quantized operators
compute right (:func:`int4_group_problem`, :func:`stored_group_size` and the
constants beside them): a file the runtime loads can still compute garbage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterable, Optional

from .et_modules import load_serialization
from .vkops import LIBRARY_OPS, RUNTIME_QLOWER, RUNTIME_STOCK

load_serialization()  # the Vulkan graph schema, without the backend's package __init__
from executorch.backends.vulkan.serialization import vulkan_graph_schema as vk  # noqa: E402

__all__ = [
    "DQ8CA_PREFILL_SAFE_GROUP_SIZES",
    "INT4_GROUP_ALIGN",
    "LoadProblem",
    "ShaderLookup",
    "PteSummary",
    "dq8ca_prefill_group_size_ok",
    "int4_group_problem",
    "load_problems",
    "op_supported",
    "predict_shaders",
    "runtime_ops",
    "runtime_shaders",
    "shader_exists",
    "stored_group_size",
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


def op_supported(name: str, runtime: str = RUNTIME_STOCK) -> bool:
    """``name`` as in a VkGraph ``OperatorCall`` (``aten.add.Tensor``), on the stock runtime or on one linked
    with qlower's op library (``runtime="qlower"``)."""
    return name in runtime_ops() or (runtime == RUNTIME_QLOWER and name in LIBRARY_OPS)


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


def load_problems(graph: vk.VkGraph, runtime: str = RUNTIME_STOCK) -> list[LoadProblem]:
    """Every reason the runtime (stock, or linked with qlower's op library) would abort while loading ``graph``."""
    problems = [
        LoadProblem(node_id, name, f"Missing operator: {name}")
        for node_id, name, _ in _op_calls(graph)
        if not op_supported(name, runtime)
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


# -- what the quantized operators compute right --------------------------------
#
# Read from the runtime's source, github.com/pytorch/executorch at cff6f4dd,
# backends/vulkan/runtime/graph/ops/ (impl/ for C++, glsl/ for shaders), and
# checked on that runtime (lavapipe; tests/test_et_group_size_runtime.py).
#
# Every int4 operator walks K in blocks of 4 values and gives a block one
# group: linear_q4gsw (Q4gswLinear.cpp, registered for et_vk.linear_q4gsw:
# q4gsw_linear_gemm__w_4x8.glsl:148 `K4_per_group = group_size / 4`,
# q4gsw_linear_gemv_coop__w_4x8.glsl:186 `blocks_per_group = group_size / 4`),
# linear_dq8ca_q4gsw (QuantizedLinear.cpp:654 `K4_per_group = div_up(group_size, 4)`,
# linear_dq8ca_q4gsw_tiled.glsl:116, linear_q4gsw_coop.glsl:107 for its one-row
# GEMV) and embedding_q4gsw (embedding_q4gsw.glsl:154: one scale per 4 values,
# `dim / group_size`). A group size that is not a multiple of 4 is wrong in all.
#
# linear_dq8ca_q4gsw with more than one row (prefill) first quantizes the
# input with quantize_and_pack_4h4w_with_group_sums.glsl, one workgroup slice
# of NUM_WORKERS_PER_GROUP workers per group, each worker taking every
# NUM_WORKERS_PER_GROUP-th block of 4 (lines 75-101). Its per-worker sum is
# `local_sum[m] += dotPacked4x8AccSatEXT(a, ones, local_sum[m])` (lines 97-98):
# the accumulator is added twice, so the sum is right only while each worker
# takes at most one block, i.e. group_size / 4 <= workers. The dispatch
# (QuantizeDequantize.cpp:75-79 picks `_o2w32` for group_size >= 128, else
# `_o4w16`; :138-145 the local size {2, 1, 32} or {4, 1, 16}) gives 32 workers
# from 128 up and 16 below: right for 4..64 and for 128, wrong for every
# other size (96, 192, 256, 512, ...; measured -44 to -70 dB vs eager). K
# plays no part beyond K being a multiple of the group size (the shader's
# `num_groups = K4 / K4_per_group`, line 69); a group count that does not
# fill the last workgroup (K=384 at 128, K=160 at 32) returns early before
# the barrier but measured right. One-row inputs skip this shader
# (QuantizeDequantize.cpp:101, `is_gemv`) and run the GEMV per block of 4.
#
# linear_dq8ca_q4gsw's prefill reads group g's weight sums at `g * N4 + n4`
# (linear_int_weight_sums_load.glslh, N4 = ceil(N / 4)); ExecuTorch's pattern
# pass pads the sums to 8 along N, which shifts every group after the first
# when N = 4 mod 8 (measured -5 dB at N=20): qlower pads them to 4
# (pack.GROUP_SUMS_N_ALIGN).
#
# Other limits of the fused ops, all already guards in qlower:
# - K % 4 == 0: QuantizedLinear.cpp:720 (linear_dq8ca_q4gsw, linear_q8ta_q8csw),
#   Q4gswLinear.cpp:343, Q8taLinear.cpp:188, Q8taLinearGemv.cpp:164
#   (patterns.guards.K_ALIGN). int4 weights are prepacked with K padded to 8
#   (pack.INT4_K_ALIGN), which QuantizedLinear.cpp:362's `K % 8` then sees.
# - linear_q4gsw: N % 4 == 0, Q4gswLinear.cpp:342 (patterns.guards.Q4_N_ALIGN).
# - embedding_q4gsw: the embedding dim % 32 == 0, EmbeddingQ4gsw.cpp:73
#   (quantize.EMBEDDING_DIM_MULTIPLE); any group size that is a multiple of 4.
# - q8ta_linear, q8ta_linear_gemv, linear_q8ta_q8csw: per-channel int8, no
#   group size; q8ta_linear_gemv.glsl accumulates with `out = dotPacked4x8AccSat(
#   in, w, out)` (no double count); N is bounds-checked on store, M too.
# - linear_q4gsw's fp16 path (q4gsw_linear_gemm__tin__w_4x8) sizes a temporary
#   by the M the graph is built with (Q4gswLinear.cpp, add_q4gsw_linear_tin_w_4x8_node);
#   qlower's int4 schemes run in fp32, which does not take that path.

INT4_GROUP_ALIGN = 4  # every int4 op: a group is a whole number of 4-value blocks
DQ8CA_WIDE_GROUP_MIN = 128  # QuantizeDequantize.cpp:75: from here on, the 32-worker variant
DQ8CA_WIDE_WORKERS = 32  # quantize_and_pack_4h4w_with_group_sums.yaml: _o2w32
DQ8CA_NARROW_WORKERS = 16  # ... _o4w16
DQ8CA_PREFILL_SAFE_GROUP_SIZES = "multiples of 4 up to 64, and 128"

# The int4 operators, as the VkGraph and qlower's fused nodes name them (namespace dropped).
INT4_OPS = ("linear_q4gsw", "linear_dq8ca_q4gsw", "embedding_q4gsw")
# Those that quantize a multi-row input with quantize_and_pack_4h4w_with_group_sums.
DQ8CA_OPS = ("linear_dq8ca_q4gsw",)


def dq8ca_prefill_workers(group_size: int) -> int:
    """Workers per group of quantize_and_pack_4h4w_with_group_sums at this group size."""
    return DQ8CA_WIDE_WORKERS if group_size >= DQ8CA_WIDE_GROUP_MIN else DQ8CA_NARROW_WORKERS


def dq8ca_prefill_group_size_ok(group_size: int) -> bool:
    """Does linear_dq8ca_q4gsw compute a multi-row input right at this group size?"""
    return (
        group_size > 0
        and group_size % INT4_GROUP_ALIGN == 0
        and group_size // INT4_GROUP_ALIGN <= dq8ca_prefill_workers(group_size)
    )


def int4_group_problem(group_size: int) -> str | None:
    """Why no int4 operator computes this group size right, or None."""
    if group_size <= 0 or group_size % INT4_GROUP_ALIGN:
        return (f"group size {group_size} is not a multiple of {INT4_GROUP_ALIGN} "
                f"(the ET-VK int4 kernels give each block of {INT4_GROUP_ALIGN} values one scale)")
    return None


def stored_group_size(op: str, group_size: int) -> int | None:
    """The group size to store ``op``'s weights at so the runtime computes ``group_size``'s math.

    ``group_size`` itself where the runtime is right at it; else the largest
    size it is right at that divides ``group_size`` (each scale then repeated:
    the same int4 values, the same math); None when there is none. ``op``
    without namespace (``linear_dq8ca_q4gsw``).
    """
    if int4_group_problem(group_size) is not None:
        return None
    if op not in DQ8CA_OPS or dq8ca_prefill_group_size_ok(group_size):
        return group_size
    return next((d for d in range(group_size - 1, 0, -1)
                 if group_size % d == 0 and dq8ca_prefill_group_size_ok(d)), None)
