"""A .pte's fused layers on a Vulkan device: ``verify --device vulkan`` and ``qlower bench``.

The golden executor runs the file once on the CPU; every fused op it executes
comes back with its resolved arguments (packed constants read from the file,
activations as the graph computed them) and its golden output. Those calls are
then replayed on the device by qlower's kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qlower.errors import VerifyError
from qlower.golden import ET_DTYPES, OpRecord, run_pte
from qlower.pte import Pte, read_pte
from qlower.vk import ops
from qlower.vk.device import Device, open_device


def example_inputs_for(pte: Pte, seed: int = 0) -> tuple:
    """Random inputs shaped and typed as the program's first method declares."""
    plan = pte.program.execution_plan[0]
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for index in plan.inputs:
        spec = plan.values[index].val
        if type(spec).__name__ != "Tensor":
            raise VerifyError("the program takes a non-tensor input", "pass --inputs to choose its value")
        dtype = ET_DTYPES.get(spec.scalar_type.name, torch.float32)
        shape = list(spec.sizes)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=gen).to(dtype))
        else:  # token ids and the like: small non-negative values stay in range of any table
            inputs.append(torch.randint(0, 2, shape, generator=gen, dtype=dtype))
    return tuple(inputs)


def fused_calls(source, inputs: tuple | None = None, seed: int = 0) -> list[OpRecord]:
    """The fused ops (those qlower's kernels implement) of one golden run, in execution order."""
    pte = source if isinstance(source, Pte) else read_pte(source)
    records: list[OpRecord] = []
    run_pte(pte, inputs if inputs is not None else example_inputs_for(pte, seed),
            on_op=lambda r: records.append(r) if ops.supports(r.name) else None)
    return records


def check_on_device(records: list[OpRecord], device=None) -> list[dict[str, Any]]:
    """Each fused call computed on the device, compared with the golden output.

    Integer (requantized int8) outputs may differ by ``INT8_ATOL`` steps at
    rounding ties; float outputs by ``FLOAT_RTOL`` of their largest magnitude
    (only the order of the float summation differs).
    """
    dev = device if isinstance(device, Device) else open_device(device)
    try:
        return [_check_one(r, dev) for r in records]
    finally:
        if dev is not device:
            dev.close()


def _check_one(r: OpRecord, dev: Device) -> dict[str, Any]:
    got = np.asarray(ops.run_op(r.name, r.args, device=dev))
    want = r.output.detach().cpu().numpy() if isinstance(r.output, torch.Tensor) else np.asarray(r.output)
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
    if np.issubdtype(want.dtype, np.integer):
        tolerance, kind = float(ops.INT8_ATOL), "int8"
    else:
        tolerance, kind = ops.FLOAT_RTOL * max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-12), "float"
    return {
        "delegate_call": r.delegate, "op_index": r.index, "op": r.name.removeprefix("et_vk.").removesuffix(".default"),
        "shape": list(want.shape), "kind": kind, "max_abs_diff": diff, "tolerance": tolerance, "passed": diff <= tolerance,
    }


def bench_args(records: list[OpRecord]) -> list[tuple[str, str, list]]:
    """(name, op, args) triples for ``qlower.bench.bench_layers``, one per fused call."""
    return [(f"d{r.delegate}.op{r.index}", r.name, r.args) for r in records]
