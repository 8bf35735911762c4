"""Streaming load: a model skeleton without weights, filled from safetensors one tensor at a time.

Export never needs the float model whole. The skeleton is built with its
parameters on the meta device (:func:`empty_weights`: buffers stay real, so
non-persistent ones such as RoPE's ``inv_freq`` are computed as usual), then
:func:`fill_weights` reads the checkpoint tensor by tensor and, as soon as a
layer's tensors are there, hands the layer to export's own per-layer
quantization (``quantize.quantize_layer``) and drops the float copy. A layer
that stays float gets its tensor in the skeleton's dtype, exactly as
``load_state_dict``/``from_pretrained`` would give it.

Tensors are read with plain file reads into their final buffer rather than
memory-mapped: pages of a mapped file count in the process's resident set as
long as the mapping lives, so a 16 GB folder read through mmap shows 16 GB of
RSS even though nothing holds it.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import ModelLoadError

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
INDEX_NAME = "model.safetensors.index.json"


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        param = module._parameters.get(name)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def has_meta_parameters(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    offset: int  # absolute, in bytes
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class SafetensorsWeights:
    """The tensors of one safetensors file or of a sharded folder, read one at a time."""

    entries: dict[str, TensorEntry] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "SafetensorsWeights":
        """A ``.safetensors`` file, or a folder with ``model.safetensors`` or an index and its shards."""
        path = Path(path)
        if path.is_dir():
            index = path / INDEX_NAME
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ModelLoadError(f"cannot read {index}: {exc}", "the index must be written by save_pretrained") from exc
                files = sorted({path / name for name in weight_map.values()})
            else:
                files = sorted(path.glob("*.safetensors"))
        else:
            files = [path]
        weights = cls()
        for file in files:
            weights.entries.update(read_header(file))
        return weights

    def under(self, prefix: str) -> "SafetensorsWeights":
        """The same tensors named as the submodule ``prefix`` (e.g. ``"lm."``) of a wrapper sees them."""
        return SafetensorsWeights({prefix + k: e for k, e in self.entries.items()}) if prefix else self

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return self._read(name, e.offset, e.shape, e.nbytes)

    def read_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a tensor (along its first dimension), read alone."""
        e = self.entries[name]
        row_bytes = e.nbytes // e.shape[0] if e.shape and e.shape[0] else 0
        return self._read(name, e.offset + start * row_bytes, (end - start, *e.shape[1:]), (end - start) * row_bytes)

    def _read(self, name: str, offset: int, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        e = self.entries[name]
        tensor = torch.empty(shape, dtype=e.dtype)
        if nbytes:
            view = tensor.reshape(-1).view(torch.uint8).numpy()
            with open(e.file, "rb") as f:
                f.seek(offset)
                if f.readinto(view) != nbytes:
                    raise ModelLoadError(f"{e.file} is truncated (tensor {name})", "write the checkpoint again")
        return tensor


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file: an 8-byte little-endian header size, a JSON header, the data."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {file}: {exc}", "the file must be written by safetensors") from exc
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ModelLoadError(f"{file}: tensor {name} has dtype {info.get('dtype')}, which qlower cannot read",
                                 f"save the weights as one of {', '.join(DTYPES)}")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(file, 8 + size + begin, end - begin, DTYPES[info["dtype"]], tuple(info["shape"]))
    return entries


# --- filling a skeleton -------------------------------------------------------------------------------


@dataclass
class Progress:
    """What :func:`fill_weights` reports after each layer: bytes of the checkpoint read so far, and an ETA."""

    layer: str
    done_bytes: int
    total_bytes: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def eta_s(self) -> float | None:
        return self.elapsed_s * (1 - self.fraction) / self.fraction if self.fraction > 0 else None


@dataclass
class ReadCount:
    """The checkpoint's bytes read so far, over one fill or several (a model filled a decoder block at a
    time): each checkpoint tensor counts once, however often it is read (tied weights)."""

    total_bytes: int
    done_bytes: int = 0
    start: float = field(default_factory=time.perf_counter)
    _seen: set[str] = field(default_factory=set)

    def read(self, key: str, nbytes: int) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.done_bytes += nbytes

    def progress(self, layer: str) -> Progress:
        return Progress(layer, min(self.done_bytes, self.total_bytes), self.total_bytes, time.perf_counter() - self.start)


def checkpoint_bytes(module: nn.Module, weights: "SafetensorsWeights") -> int:
    """Bytes of the checkpoint tensors that fill ``module`` (each once)."""
    return _bytes_of([_checkpoint_key(names, weights) for names, _ in _param_groups(module)], weights)


def _bytes_of(keys: list[str | None], weights: "SafetensorsWeights") -> int:
    return sum(weights.entries[k].nbytes for k in set(keys) if k is not None)


def check_fits(module: nn.Module, weights: SafetensorsWeights, transposed: set[str] = frozenset()) -> str | None:
    """Why ``weights`` cannot fill ``module``'s parameters (a missing name, a wrong shape), or None."""
    return _check_groups_fit(_param_groups(module), weights, transposed)


def _check_groups_fit(groups, weights: SafetensorsWeights, transposed) -> str | None:
    for names, param in groups:
        key = _checkpoint_key(names, weights)
        if key is None:
            return f"the checkpoint has no tensor {names[0]}"
        shape = weights.entries[key].shape
        if key.rpartition(".")[0] in transposed:
            shape = shape[::-1]
        if tuple(shape) != tuple(param.shape):
            return f"tensor {key} is {list(shape)} in the checkpoint, the model's is {list(param.shape)}"
    return None


def checkpoint_names(module: nn.Module, weights: SafetensorsWeights) -> dict[str, str]:
    """Every parameter name with a tensor in ``weights`` -> that tensor's name (tied weights share one)."""
    names = {}
    for group, _ in _param_groups(module):
        key = _checkpoint_key(group, weights)
        names.update({n: key for n in group} if key is not None else {})
    return names


def _checkpoint_key(names: list[str], weights: SafetensorsWeights) -> str | None:
    """The name under which the checkpoint stores a parameter known by ``names`` (tied: several), or None."""
    return next((n for n in names if n in weights.entries), None)


def _param_groups(module: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each parameter once with all its names (tied weights have several), in model order."""
    by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), ([], param))[0].append(name)
    return list(by_id.values())


def fill_weights(module: nn.Module, weights: SafetensorsWeights,
                 quantize: dict[str, Callable[[nn.Module, Callable | None], nn.Module]],
                 transposed: set[str] = frozenset(), on_layer: Callable[[Progress], None] | None = None,
                 unexpected: Callable[[list[str]], None] | None = None,
                 only: Callable[[str], bool] | None = None, count: ReadCount | None = None) -> None:
    """Fill ``module``'s meta parameters from ``weights``, replacing each layer named in ``quantize`` by
    ``quantize[name](layer, rows)`` as soon as its tensors are read. A large 2-D weight whose every
    layer is quantized is not read whole: the layer keeps its meta weight and ``rows(start, end)``
    reads its rows as the quantization goes (``rows`` is None for the others).

    ``transposed`` names layers whose checkpoint weight is stored ``[in, out]`` (GPT-2's ``Conv1D``,
    already swapped for a linear in the skeleton). A tensor shared by several layers (tied embeddings)
    is read once and given to all of them before it is dropped. ``unexpected`` receives checkpoint
    names that are neither a parameter nor a buffer (else they are an error).

    ``only``: fill just the layers (module names) it accepts, leaving the others as they are; the
    calibrated algorithms fill a model a decoder block at a time (:mod:`qlower.calibrate`), with one
    ``count`` for all the fills, so that ``on_layer`` hears of the whole checkpoint's progress.
    """
    from .memory import return_freed_memory

    accept = only or (lambda layer_name: True)
    return_freed_memory()
    groups = [(names, p) for names, p in _param_groups(module)
              if any(accept(n.rpartition(".")[0]) for n in names)]
    problem = _check_groups_fit(groups, weights, transposed)
    if problem:
        raise ModelLoadError(f"the checkpoint does not fit the model: {problem}", "check that the checkpoint belongs to this model")
    owners: dict[str, list[str]] = {}  # layer name -> its parameters' full names
    for names, _ in groups:
        for n in names:
            owners.setdefault(n.rpartition(".")[0], []).append(n)
    all_params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    buffers = {n: b for n, b in module.named_buffers() if accept(n.rpartition(".")[0])}
    extra = [k for k in weights.entries if k not in all_params and k not in buffers and accept(k.rpartition(".")[0])
             and (only is None or k not in dict(module.named_buffers()))]
    if extra:
        if unexpected is None:
            raise ModelLoadError(f"the checkpoint has tensors the model does not: {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}",
                                 "check that the checkpoint belongs to this model")
        unexpected(extra)
    for name in weights.entries:
        if name in buffers:
            with torch.no_grad():
                buffers[name].copy_(weights.read(name))

    ready: dict[str, torch.Tensor] = {}  # full parameter name -> tensor as read (checkpoint dtype)
    keys = [_checkpoint_key(names, weights) for names, _ in groups]
    if count is None:
        count = ReadCount(_bytes_of(keys, weights))
    for (names, param), key in zip(groups, keys):
        names = [n for n in names if accept(n.rpartition(".")[0])]
        entry = weights.entries[key]
        layers = {full.rpartition(".")[0] for full in names}
        lazy = (len(entry.shape) == 2 and entry.nbytes >= ROWS_READ_BYTES and layers <= set(quantize)
                and not layers & set(transposed) and names[0].endswith(".weight"))
        tensor = RowReader(weights, key) if lazy else weights.read(key)
        count.read(key, entry.nbytes)
        shared = None  # one float Parameter for every layer that keeps this tensor float
        for full in names:
            layer_name = full.rpartition(".")[0]
            raw = tensor.t() if layer_name in transposed and tensor.dim() == 2 else tensor
            if layer_name in quantize:
                ready[full] = raw
            else:
                if shared is None:
                    shared = nn.Parameter(raw.to(param.dtype).contiguous(), requires_grad=param.requires_grad)
                _set_param(module, full, shared)
            _finish_layer(module, layer_name, owners, ready, quantize, on_layer,
                          lambda: count.progress(layer_name))
        del tensor, raw, shared
    left = [n for n, p in module.named_parameters() if p.device.type == "meta" and accept(n.rpartition(".")[0])]
    if left:
        raise ModelLoadError(f"the checkpoint left {left[0]} unset", "check that the checkpoint belongs to this model")


def _finish_layer(module, layer_name, owners, ready, quantize, on_layer, progress) -> None:
    """Quantize a layer once all its tensors are read (each layer is reported once)."""
    from .modules import replace_module

    names = owners[layer_name]
    if layer_name in quantize:
        if not all(n in ready for n in names):
            return
        layer = module.get_submodule(layer_name)
        rows = None
        for n in names:  # the checkpoint's tensors in place of the meta ones, then quantized
            value = ready.pop(n)
            if isinstance(value, RowReader):
                rows = value  # the weight: its rows are read as they are quantized
            else:
                _set_param(module, n, nn.Parameter(value, requires_grad=False))
        replace_module(module, layer_name, quantize[layer_name](layer, rows))
    elif any(module.get_parameter(n).device.type == "meta" for n in names):
        return
    if on_layer is not None:
        on_layer(progress())


# Weights of quantized layers from this size on are read a chunk of rows at a time, never whole.
ROWS_READ_BYTES = 64 << 20


@dataclass(frozen=True)
class RowReader:
    """``rows(start, end)``: rows of one checkpoint tensor, read from disk when asked."""

    weights: SafetensorsWeights
    name: str

    def __call__(self, start: int, end: int) -> torch.Tensor:
        return self.weights.read_rows(self.name, start, end)


def _set_param(root: nn.Module, full: str, param: nn.Parameter) -> None:
    layer_name, _, attr = full.rpartition(".")
    layer = root.get_submodule(layer_name) if layer_name else root
    layer._parameters[attr] = param
