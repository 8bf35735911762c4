"""Load a model and its example inputs from a Python file.

Conventions (first match wins):

* model: ``--entry NAME`` names a module-level ``nn.Module`` or a function that
  returns one; otherwise a module-level ``model`` (module or factory), then
  ``make_model()``, then the only ``nn.Module`` instance defined at module level.
* example inputs: a module-level ``example_inputs`` (tuple, list or tensor, or a
  function returning one), then ``make_example_inputs()``.
* optional calibration batches for static schemes: ``calibration_inputs``
  (a list of input tuples, or a function returning one).
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ModelLoadError, QlowerError, first_line

MODEL_NAMES = ("model", "make_model")
INPUT_NAMES = ("example_inputs", "make_example_inputs")
CALIBRATION_NAMES = ("calibration_inputs", "make_calibration_inputs")
METADATA_NAMES = ("metadata",)  # runner metadata for --kv-cache (a dict of method name → value)


@dataclass
class LoadedModel:
    module: nn.Module
    example_inputs: tuple
    calibration_inputs: list[tuple] | None
    source: Path
    entry: str
    metadata: dict | None = None
    # Streaming (export): the module is a skeleton with meta parameters and this is its checkpoint
    # (stream.SafetensorsWeights), read layer by layer by the quantize stage.
    weights: Any = None
    unexpected_weights: Callable[[list[str]], None] | None = None  # checkpoint names to ignore (None: an error)


def load_model(path: str | Path, entry: str | None = None, checkpoint: str | Path | None = None,
               stream: bool = False) -> LoadedModel:
    """``stream``: with a ``.safetensors`` checkpoint, build the model without weights (meta parameters)
    and leave the checkpoint to the quantize stage, which reads it layer by layer (qlower.stream)."""
    path = Path(path)
    streaming = stream and checkpoint is not None and Path(checkpoint).suffix == ".safetensors"
    if streaming:
        from .stream import SafetensorsWeights, empty_weights

        if not Path(checkpoint).is_file():
            raise ModelLoadError(f"checkpoint not found: {checkpoint}", "pass a .safetensors or .pt state dict")
        weights = SafetensorsWeights.open(checkpoint)
        with empty_weights():
            namespace = _run_model_file(path)
            name, module = _find_model(namespace, path, entry)
    else:
        namespace = _run_model_file(path)
        name, module = _find_model(namespace, path, entry)
        if checkpoint is not None:
            load_checkpoint(module, checkpoint)
    module.eval()
    inputs = _as_input_tuple(_lookup(namespace, INPUT_NAMES, path), "example inputs", path)
    if inputs is None:
        raise ModelLoadError(
            f"{path} defines no example inputs",
            "define `example_inputs = (tensor, ...)` or `def make_example_inputs(): ...` in the model file",
        )
    calibration = _lookup(namespace, CALIBRATION_NAMES, path)
    if calibration is not None:
        calibration = [_as_input_tuple(batch, "calibration inputs", path) for batch in calibration]
    if streaming:  # a skeleton cannot run; the weights' fit is checked before any is read
        from .stream import check_fits

        problem = check_fits(module, weights)
        if problem:
            raise ModelLoadError(f"checkpoint {checkpoint} does not fit the model: {problem}",
                                 "check that the checkpoint belongs to this model")
        metadata = _lookup(namespace, METADATA_NAMES, path)
        _check_metadata(metadata, path)
        return LoadedModel(module, inputs, calibration, path, name, metadata, weights=weights)
    with torch.no_grad():
        try:
            module(*inputs)
        except Exception as exc:  # the model's own code rejected the inputs
            raise ModelLoadError(
                f"the model rejects its example inputs: {type(exc).__name__}: {first_line(exc)}",
                f"make `example_inputs` in {path.name} match the model's forward() signature",
            ) from exc
    metadata = _lookup(namespace, METADATA_NAMES, path)
    _check_metadata(metadata, path)
    return LoadedModel(module, inputs, calibration, path, name, metadata)


def _check_metadata(metadata: Any, path: Path) -> None:
    if metadata is not None and not isinstance(metadata, dict):
        raise ModelLoadError(f"`metadata` in {path} must be a dict, got {type(metadata).__name__}", 'e.g. metadata = {"get_bos_id": 1, "get_eos_ids": [2]}')


def _run_model_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", "check the path, e.g. examples/mlp.py")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}", "pass a Python file that defines the model")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}", "check the file's permissions and encoding") from exc
    module_name = f"qlower_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Let the file import its siblings, as `python model.py` would.
    sys.path.insert(0, str(path.parent.resolve()))
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        code = compile(source, str(path), "exec")
        exec(code, module.__dict__)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise ModelLoadError(f"{path}:{exc.lineno}: syntax error: {exc.msg}", "fix the model file") from exc
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ModelLoadError(_located(exc, path), "fix the model file; QLOWER_DEBUG=1 shows the traceback") from exc
    finally:
        sys.path.pop(0)
    return module.__dict__


def _located(exc: BaseException, path: Path) -> str:
    """'file:line: Type: message' for the innermost frame inside the model file."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {type(exc).__name__}: {first_line(exc)}"


def _call_user(fn, what: str, path: Path):
    try:
        return fn()
    except Exception as exc:
        raise ModelLoadError(_located(exc, path), f"fix {what} in the model file") from exc


def _find_model(namespace: dict[str, Any], path: Path, entry: str | None) -> tuple[str, nn.Module]:
    if entry is not None:
        if entry not in namespace:
            raise ModelLoadError(f"{path} has no attribute {entry!r}", f"candidates: {', '.join(_candidates(namespace)) or 'none'}")
        return entry, _materialize(namespace[entry], entry, path)
    for name in MODEL_NAMES:
        if name in namespace:
            return name, _materialize(namespace[name], name, path)
    candidates = _candidates(namespace)
    if not candidates:
        raise ModelLoadError(
            f"{path} defines no model",
            "define `model = MyModel()` or `def make_model(): ...`, or pass --entry NAME",
        )
    if len(candidates) > 1:
        raise ModelLoadError(
            f"{path} defines several models: {', '.join(candidates)}",
            "pick one with --entry NAME",
        )
    return candidates[0], namespace[candidates[0]]


def _candidates(namespace: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in namespace.items() if isinstance(v, nn.Module) and not k.startswith("_"))


def _materialize(obj: Any, name: str, path: Path) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj) and not isinstance(obj, type):
        result = _call_user(obj, f"{name}()", path)
        if isinstance(result, nn.Module):
            return result
        raise ModelLoadError(f"{name}() in {path} returned {type(result).__name__}, not an nn.Module", "return the model instance")
    raise ModelLoadError(f"{name!r} in {path} is a {type(obj).__name__}, not an nn.Module or a factory", "point --entry at a model or a function returning one")


def _lookup(namespace: dict[str, Any], names: tuple[str, ...], path: Path):
    for name in names:
        if name in namespace:
            value = namespace[name]
            return _call_user(value, f"{name}()", path) if callable(value) and not isinstance(value, torch.Tensor) else value
    return None


def _as_input_tuple(value: Any, what: str, path: Path) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise ModelLoadError(f"{what} in {path} must be a tensor or a tuple of tensors, got {type(value).__name__}", "e.g. example_inputs = (torch.randn(1, 16),)")


def load_checkpoint(module: nn.Module, checkpoint: str | Path) -> None:
    """Load a state dict from .safetensors or .pt (weights_only) into the model."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelLoadError(f"checkpoint not found: {checkpoint}", "pass a .safetensors or .pt state dict")
    try:
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(checkpoint))
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read checkpoint {checkpoint}: {first_line(exc)}", "save it with torch.save(model.state_dict()) or safetensors") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {checkpoint} holds a {type(state).__name__}, not a state dict", "save model.state_dict()")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {checkpoint} does not fit the model: {first_line(exc)}", "check that the checkpoint belongs to this model") from exc


# --- input batches (calibration data, verification inputs) --------------------


def read_input_batches(path: Path, what: str, error: type[QlowerError], tensor_is_batches: bool) -> list[tuple]:
    """torch.save'd inputs: a list of input tuples, one tuple, or one tensor.

    A bare tensor is [batches, *input_shape] when ``tensor_is_batches`` (calibration
    data), else one input of one batch.
    """
    hint = "torch.save([(x1,), (x2,), ...], path)"
    if not path.is_file():
        raise error(f"{what} file not found: {path}", f"save a list of input tuples: {hint}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"cannot read {what} file {path}: {first_line(exc)}", f"save a list of input tuples: {hint}") from exc
    if isinstance(data, torch.Tensor):
        return [(t,) for t in data] if tensor_is_batches else [(data,)]
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        return [data]
    if isinstance(data, (list, tuple)) and data:
        return [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in data]
    raise error(f"{what} file {path} holds {type(data).__name__}, expected a non-empty list of input tuples", hint)


def describe_tensor(t: Any) -> str:
    """'float32[4, 256]', or the type name of a non-tensor."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random input shaped and typed like ``t``."""
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, t.shape, generator=gen).bool()
    # Integer inputs are usually indices: stay within the example's range.
    high = int(t.max().item()) + 1 if t.numel() else 2
    return torch.randint(0, max(high, 2), t.shape, generator=gen, dtype=t.dtype)
