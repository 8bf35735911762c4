"""The golden executor: run what a .pte serializes, on the CPU, op by op.

It follows the program's execution plan in order. A ``DelegateCall`` to the
Vulkan backend runs that delegate's VkGraph: constants are read from the file
(the program's named data, or the blob's own constant section), every
``OperatorCall`` is computed with its inputs taken from the VkGraph values in
the op's schema order and its output stored under the last value id (a
``ValueList`` when the op returns several). Quantized ``et_vk`` ops run on
:mod:`qlower.references` (int8 activations, integer accumulation, then
scales); float ``et_vk`` ops and every other namespace resolve through
``torch.ops`` by their qualified name. A ``KernelCall`` (a CPU kernel between
delegates, e.g. ``aten::mul.Scalar_out``) runs the kernel's functional
overload and writes its result into the out value.

Each tensor result is cast to the dtype the graph declares for it, so an
fp16 graph computes in fp16 and 64-bit values are narrowed to 32 bits where
the delegate narrowed them. An op it does not know raises ``VerifyError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import references
from .errors import VerifyError
from .pte import VK_HEADER_LENGTH, VULKAN_BACKEND, Pte, qualified_op_name, read_pte

# VkDataType (executorch/backends/vulkan/serialization/vulkan_graph_schema.py).
VK_DTYPES = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT32": torch.int32,
    "FLOAT16": torch.float16, "FLOAT32": torch.float32, "FLOAT64": torch.float64, "INT64": torch.int64,
}
# executorch.exir.scalar_type.ScalarType.
ET_DTYPES = {
    "BYTE": torch.uint8, "CHAR": torch.int8, "SHORT": torch.int16, "INT": torch.int32, "LONG": torch.int64,
    "HALF": torch.float16, "FLOAT": torch.float32, "DOUBLE": torch.float64, "BOOL": torch.bool,
    "BFLOAT16": torch.bfloat16,
}


@dataclass
class OpRecord:
    """One executed VkGraph op, for per-layer comparison."""

    delegate: int  # position of the delegate call in the execution plan
    index: int  # position of the op in its delegate's chain
    name: str  # qualified op name
    args: list[Any]  # resolved inputs
    output: Any
    blob: int = -1  # the delegate (``Pte.delegates`` index) whose graph holds the op


@dataclass
class GoldenExecutor:
    """Executes a decoded ``Pte``; ``run(inputs)`` returns the program's outputs."""

    pte: Pte
    on_op: Callable[[OpRecord], None] | None = None
    _constants: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_file(cls, source, **kwargs) -> "GoldenExecutor":
        return cls(read_pte(source), **kwargs)

    # -- the execution plan ----------------------------------------------------

    def reset(self) -> None:
        """Forget state kept between runs (KV caches live in constants the ops write)."""
        self._constants.clear()

    def method_names(self) -> list[str]:
        return [plan.name for plan in self.pte.program.execution_plan]

    def run(self, inputs: tuple | list, method: str | None = None) -> list:
        """Run ``method`` (default: ``forward``, else the first). State such as a
        KV cache carries over from one call to the next, as on the runtime."""
        program = self.pte.program
        plans = {p.name: p for p in program.execution_plan}
        if method is None:
            plan = plans.get("forward", program.execution_plan[0])
        elif method in plans:
            plan = plans[method]
        else:
            raise VerifyError(f"the .pte has no method {method!r}", f"methods: {', '.join(plans)}")
        values: list[Any] = [_UNSET] * len(plan.values)
        if len(inputs) != len(plan.inputs):
            raise VerifyError(f"the program takes {len(plan.inputs)} inputs, got {len(inputs)}",
                              "pass inputs matching the model's example inputs")
        for position, (index, given) in enumerate(zip(plan.inputs, inputs)):
            values[index] = self._check_input(position, plan.values[index].val, given)
        instructions = [i for chain in plan.chains[:1] for i in chain.instructions]
        delegate_calls = 0
        pc = 0
        while pc < len(instructions):
            args = instructions[pc].instr_args
            kind = type(args).__name__
            pc += 1
            if kind == "DelegateCall":
                self._delegate_call(plan, args, values, delegate_calls)
                delegate_calls += 1
            elif kind == "KernelCall":
                self._kernel_call(plan, args, values)
            elif kind == "MoveCall":
                values[args.move_to] = self._program_value(plan, values, args.move_from)
            elif kind == "JumpFalseCall":
                if not bool(self._program_value(plan, values, args.cond_value_index)):
                    pc = args.destination_instruction
            elif kind == "FreeCall":
                pass
            else:
                raise VerifyError(f"unknown instruction {kind} in the execution plan", "the .pte is newer than this qlower")
        return [self._program_value(plan, values, i) for i in plan.outputs]

    def _check_input(self, position: int, spec, given) -> torch.Tensor:
        if type(spec).__name__ != "Tensor":
            return given
        if not isinstance(given, torch.Tensor):
            raise VerifyError(f"input {position} must be a tensor, got {type(given).__name__}", "pass tensors")
        dtype = ET_DTYPES.get(spec.scalar_type.name)
        bounds = list(spec.sizes)
        if is_dynamic(spec):
            if given.dim() != len(bounds) or any(g > b for g, b in zip(given.shape, bounds)):
                raise VerifyError(f"input {position} has shape {list(given.shape)}, the .pte takes at most {bounds}",
                                  "pass an input within the shape bounds the .pte was exported with")
        elif list(given.shape) != bounds:
            raise VerifyError(f"input {position} has shape {list(given.shape)}, the .pte was exported for {bounds}",
                              "the .pte has static shapes: pass inputs shaped like the model's example inputs")
        return given.to(dtype) if dtype is not None else given

    def _program_value(self, plan, values: list, index: int):
        if values[index] is not _UNSET:
            return values[index]
        value = self._decode_program_value(plan, values, index)
        values[index] = value
        return value

    def _decode_program_value(self, plan, values: list, index: int):
        val = plan.values[index].val
        kind = type(val).__name__
        if kind == "Null":
            return None
        if kind in ("Int", "Bool"):
            return val.int_val if kind == "Int" else val.bool_val
        if kind == "Double":
            return float(val.double_val)  # non-finite doubles come back as strings ("-inf")
        if kind == "String":
            return val.string_val
        if kind == "IntList":  # items are value indices (boxed ints)
            return [self._program_value(plan, values, i) for i in val.items]
        if kind == "DoubleList":
            return [float(x) for x in val.items]
        if kind == "BoolList":
            return list(val.items)
        if kind in ("TensorList", "OptionalTensorList"):
            return [self._program_value(plan, values, i) if i >= 0 else None for i in val.items]
        if kind == "Tensor":
            return self._program_tensor(val)
        raise VerifyError(f"unsupported program value {kind} at index {index}", "the .pte is newer than this qlower")

    def _program_tensor(self, spec) -> torch.Tensor:
        dtype = ET_DTYPES.get(spec.scalar_type.name)
        if dtype is None:
            raise VerifyError(f"unsupported tensor dtype {spec.scalar_type.name} in the program", "")
        if spec.data_buffer_idx > 0 and spec.allocation_info is None:  # a constant
            buffers = self.pte.program.constant_buffer
            if spec.data_buffer_idx >= len(buffers):
                raise VerifyError(f"program constant {spec.data_buffer_idx} is missing", "the .pte is corrupted")
            data = bytes(buffers[spec.data_buffer_idx].storage)
            return _tensor_from_bytes(data, dtype, spec.sizes)
        # A memory-planned tensor not written yet: the kernel's out argument.
        return torch.zeros(spec.sizes, dtype=dtype)

    def _kernel_call(self, plan, call, values: list) -> None:
        op = plan.operators[call.op_index]
        name = f"{op.name}.{op.overload}" if op.overload else op.name
        overload = _resolve(name.replace("::", "."), f"CPU kernel {name}")
        schema = overload._schema
        n_args = len(schema.arguments)
        arg_ids = list(call.args[:n_args])
        inputs, outs = {}, []
        for arg, vid in zip(schema.arguments, arg_ids):
            if arg.is_out:
                outs.append(vid)
            else:
                inputs[arg.name] = self._program_value(plan, values, vid)
        functional = _functional(overload)
        if functional is not None:
            result = functional(**_filter_kwargs(functional, inputs))
        else:
            out_kwargs = {a.name: self._program_value(plan, values, v) for a, v in zip(schema.arguments, arg_ids) if a.is_out}
            result = overload(**inputs, **out_kwargs)
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        for vid, res in zip(outs, results):
            spec = plan.values[vid].val
            dtype = ET_DTYPES.get(spec.scalar_type.name) if type(spec).__name__ == "Tensor" else None
            values[vid] = res.to(dtype) if dtype is not None and isinstance(res, torch.Tensor) else res
        for vid in call.args[n_args:]:  # the returned aliases of the out arguments
            values[vid] = values[outs[0]] if outs else None

    # -- one Vulkan delegate ---------------------------------------------------

    def _delegate_call(self, plan, call, values: list, call_index: int) -> None:
        d = plan.delegates[call.delegate_index]
        blob_index = d.processed.index
        if d.id != VULKAN_BACKEND:
            raise VerifyError(f"the .pte delegates to {d.id}, which the golden executor cannot run",
                              "verify covers Vulkan delegates and CPU kernels")
        graph = self.pte.delegates[blob_index].graph
        n_in = len(graph.input_ids)
        ids = list(call.args)
        if len(ids) != n_in + len(graph.output_ids):
            raise VerifyError(f"delegate call {call_index} passes {len(ids)} values; its graph has "
                              f"{n_in} inputs and {len(graph.output_ids)} outputs", "the .pte is corrupted")
        env: dict[int, Any] = {}
        for vid, pid in zip(graph.input_ids, ids[:n_in]):
            env[vid] = self._cast(graph, vid, self._program_value(plan, values, pid))
        for index, op in enumerate(graph.chain):
            self._run_op(graph, blob_index, env, op, call_index, index)
        for vid, pid in zip(graph.output_ids, ids[n_in:]):
            out = self._vk_value(graph, blob_index, env, vid)
            spec = plan.values[pid].val
            dtype = ET_DTYPES.get(spec.scalar_type.name) if type(spec).__name__ == "Tensor" else None
            values[pid] = out.to(dtype) if dtype is not None and isinstance(out, torch.Tensor) else out

    def _run_op(self, graph, blob_index: int, env: dict, op, call_index: int, index: int) -> None:
        name = qualified_op_name(op.name)
        *arg_ids, out_id = op.args
        args = [self._vk_value(graph, blob_index, env, vid) for vid in arg_ids]
        kwargs: dict = {}
        if name in references.RUNTIME_LINEARS:  # recorded as the stock layer op it computes, then its epilogue
            stock, stock_args, after = references.runtime_linear_steps(name, args)
            layer = self._call(references.OPS[stock], stock, stock_args, {}, blob_index, index)
            if self.on_op is not None:
                self.on_op(OpRecord(call_index, index, stock, stock_args, layer, blob_index))
            fn = lambda *_: after(layer)  # noqa: E731
        elif name in references.OPS:
            fn = references.OPS[name]
        elif name.startswith("et_vk.") and name not in references.FLOAT_ET_VK_OPS:
            raise VerifyError(f"the golden executor has no reference for {name} (op {index} of Vulkan delegate {blob_index})",
                              "this fused op is not modelled by qlower yet; verify cannot check this .pte")
        else:
            overload = _resolve(name, f"op {name} (op {index} of Vulkan delegate {blob_index})")
            args, kwargs = _schema_args(overload, args, graph, out_id)
            fn = overload
        result = self._call(fn, name, args, kwargs, blob_index, index)
        out_value = graph.values[out_id].value
        if type(out_value).__name__ == "ValueList":
            results = list(result) if isinstance(result, (tuple, list)) else [result]
            for vid, res in zip(out_value.items, results):
                env[vid] = self._cast(graph, vid, res)
            env[out_id] = [env[v] for v in out_value.items]
        else:
            env[out_id] = self._cast(graph, out_id, result)
        if self.on_op is not None:
            self.on_op(OpRecord(call_index, index, name, args, env[out_id], blob_index))

    @staticmethod
    def _call(fn, name: str, args: list, kwargs: dict, blob_index: int, index: int):
        try:
            return fn(*args, **kwargs)
        except VerifyError:
            raise
        except Exception as exc:
            raise VerifyError(f"{name} (op {index} of Vulkan delegate {blob_index}) failed on the CPU: "
                              f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                              "the .pte's graph does not fit its own values; it may be corrupted") from exc

    def _vk_value(self, graph, blob_index: int, env: dict, vid: int):
        if vid in env:
            return env[vid]
        value = graph.values[vid].value
        kind = type(value).__name__
        if kind == "VkTensor":
            if value.constant_id < 0:
                raise VerifyError(f"Vulkan delegate {blob_index} reads value {vid} before any op writes it", "the .pte is corrupted")
            result = self._vk_constant(graph, blob_index, value)
        elif kind == "Null":
            result = None
        elif kind == "SymInt":  # its initial value, until an op (sym_size, select_as_symint) writes it
            result = int(value.value)
        elif kind == "Int":
            result = value.int_val
        elif kind == "Double":
            result = float(value.double_val)
        elif kind == "Bool":
            result = value.bool_val
        elif kind == "String":
            result = value.string_val
        elif kind in ("IntList", "DoubleList", "BoolList"):
            result = list(value.items)
        elif kind == "ValueList":
            result = [self._vk_value(graph, blob_index, env, v) for v in value.items]
        else:
            raise VerifyError(f"unsupported VkGraph value {kind} (value {vid} of delegate {blob_index})", "the .pte is newer than this qlower")
        if kind != "ValueList":  # lists may hold tensors computed later
            env[vid] = result
        return result

    def _vk_constant(self, graph, blob_index: int, tensor) -> torch.Tensor:
        key = (blob_index, tensor.constant_id)
        if key not in self._constants:
            data = vk_constant_bytes(self.pte, blob_index, graph, tensor.constant_id)
            self._constants[key] = _tensor_from_bytes(data, VK_DTYPES[tensor.datatype.name], tensor.dims)
        return self._constants[key]

    @staticmethod
    def _cast(graph, vid: int, value):
        if not isinstance(value, torch.Tensor):
            return value
        spec = graph.values[vid].value
        if type(spec).__name__ != "VkTensor":
            return value
        dtype = VK_DTYPES.get(spec.datatype.name)
        return value.to(dtype) if dtype is not None and value.dtype != dtype else value


def is_dynamic(spec) -> bool:
    """Whether a program tensor's sizes are upper bounds (``DYNAMIC_BOUND``) rather than exact."""
    dynamism = getattr(spec, "shape_dynamism", None)
    return dynamism is not None and getattr(dynamism, "name", str(dynamism)) != "STATIC"


class _Unset:
    pass


_UNSET = _Unset()


# --- helpers ---------------------------------------------------------------------


def vk_constant_bytes(pte: Pte, blob_index: int, graph, constant_id: int) -> bytes:
    """The bytes of one VkGraph constant: named data, or the blob's constant section."""
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import VulkanDelegateHeader

    ref = graph.constants[constant_id]
    if ref.named_key:
        return pte.named_bytes(ref.named_key)
    blob = bytes(pte.program.backend_delegate_data[blob_index].data)
    header = VulkanDelegateHeader.from_bytes(blob[:VK_HEADER_LENGTH])
    start = header.bytes_offset + ref.offset
    if start + ref.length > len(blob):
        raise VerifyError(f"constant {constant_id} of Vulkan delegate {blob_index} lies outside its blob", "the .pte is truncated or corrupted")
    return blob[start:start + ref.length]


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, dims) -> torch.Tensor:
    shape = [int(d) for d in dims]
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) < numel * itemsize:
        raise VerifyError(f"a constant holds {len(data)} bytes, its shape {shape} needs {numel * itemsize}", "the .pte is corrupted")
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data[:numel * itemsize]), dtype=dtype)
    return flat.reshape(shape).clone()


def _resolve(qualified: str, what: str):
    """'aten.add.Tensor' / 'aten::add.Tensor' → torch.ops.aten.add.Tensor."""
    namespace, _, rest = qualified.replace("::", ".").partition(".")
    name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        raise VerifyError(f"the golden executor does not know {what}",
                          "torch.ops has no such operator; the .pte needs a newer torch/executorch than installed") from None


def _functional(overload):
    """The functional overload of an out-variant kernel (``mul.Scalar_out`` → ``mul.Scalar``).

    The one with the out variant's other arguments: ``mean.out`` takes
    ``dim`` and ``keepdim``, so it is ``mean.dim``, not ``mean.default``.
    """
    name = overload._overloadname
    if name == "out":
        preferred = "default"
    elif name.endswith("_out"):
        preferred = name[: -len("_out")]
    else:
        return None
    packet = overload._overloadpacket
    wanted = [a.name for a in overload._schema.arguments if not a.is_out]
    for base in [preferred, *sorted(set(packet.overloads()) - {preferred})]:
        candidate = getattr(packet, base, None)
        if candidate is not None and [a.name for a in candidate._schema.arguments] == wanted:
            return candidate
    return getattr(packet, preferred, None)


def _filter_kwargs(overload, kwargs: dict) -> dict:
    names = {a.name for a in overload._schema.arguments}
    return {k: v for k, v in kwargs.items() if k in names}


def _schema_args(overload, args: list, graph, out_id: int) -> tuple[list, dict]:
    """(positional, keyword) arguments in schema order.

    The VkGraph serializer writes dtypes, layouts and devices as Null, so a
    Null for a ScalarType argument is filled in: from the input for a
    dequantize's ``dtype``, from the output's declared dtype otherwise.
    """
    schema = overload._schema
    out_dtypes = _output_dtypes(graph, out_id)
    positional, keyword = [], {}
    for i, arg in enumerate(schema.arguments[: len(args)]):
        value = args[i]
        type_name = str(getattr(arg, "real_type", arg.type))
        if value is None and "ScalarType" in type_name:
            if schema.name == "torchao::choose_qparams_affine":
                value = _choose_qparams_dtype(arg.name, args, out_dtypes)
            elif "dequantize" in schema.name and arg.name == "dtype" and isinstance(args[0], torch.Tensor):
                value = args[0].dtype
            elif out_dtypes:
                value = out_dtypes[0]
        elif value is None and type_name in ("Layout", "Device"):
            value = torch.strided if type_name == "Layout" else torch.device("cpu")
        if arg.kwarg_only:
            keyword[arg.name] = value
        else:
            positional.append(value)
    return positional, keyword


def _choose_qparams_dtype(name: str, args: list, out_dtypes: list):
    if name == "target_dtype":
        qmin, qmax = args[4], args[5]
        if qmin is not None and qmin >= 0:
            return torch.uint8 if qmax is not None and qmax <= 255 else torch.int32
        return torch.int8 if qmax is None or qmax <= 127 else torch.int32
    if name == "scale_dtype" and out_dtypes:
        return out_dtypes[0]
    if name == "zero_point_dtype" and len(out_dtypes) > 1:
        return out_dtypes[1]
    return None


def _output_dtypes(graph, out_id: int) -> list:
    value = graph.values[out_id].value
    ids = value.items if type(value).__name__ == "ValueList" else [out_id]
    dtypes = []
    for vid in ids:
        spec = graph.values[vid].value
        if type(spec).__name__ == "VkTensor":
            dtypes.append(VK_DTYPES.get(spec.datatype.name))
    return dtypes


def run_pte(source, inputs: tuple, on_op: Callable[[OpRecord], None] | None = None) -> list[torch.Tensor]:
    """Execute a .pte (path, bytes or ``Pte``) on the CPU with the golden executor."""
    pte = source if isinstance(source, Pte) else read_pte(source)
    with torch.no_grad():
        return GoldenExecutor(pte, on_op=on_op).run(inputs)
