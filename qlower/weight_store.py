"""Large constants kept in files on disk, mapped into memory, from quantization to the written .pte.

A 1B–8B decoder's quantized weights are 1–5 GB. Held in memory they would be
the export's whole resident set, and every stage that copies them (ExecuTorch's
Vulkan preprocess turns each constant into a ``bytes`` object, for one) would
add another copy. Instead, as soon as a layer is quantized its large tensors
go to a file of their own in a scratch directory beside the output, and the
model holds a memory map of that file (``torch.from_file(shared=True)``):

- pages of a mapping are resident only once read through it, and nothing in
  the pipeline reads the packed weights after quantization except the file
  writer, which reads the files themselves;
- the lower stage hands ExecuTorch each stored constant as the file it is
  (``FileBackedData``, ExecuTorch's named data on disk: see
  :func:`vulkan_constants_from_store`), and the
  serializer copies it from that file into the ``.pte`` (or ``.ptd``) in 8 MB
  pieces.

The scratch directory is removed when the export ends, whether it succeeded or
not. Everything works without a store (``store=None``): then constants stay in
memory as before, which is what a run without an output file does.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import math
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .memory import release_pages

# Tensors below this stay in memory (norm weights, biases): not worth a file each. The group scales,
# zero points and group sums of a 1B model's attention projections (64-256 KB each, ~3 MB a block) go
# to files: kept in memory they add up over the blocks.
MIN_STORED_BYTES = 64 << 10


class WeightStore:
    """Files of large constants in ``directory`` (created; removed by :meth:`close`)."""

    def __init__(self, parent: Path, name: str, min_bytes: int | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".weights", dir=parent))
        self.min_bytes = MIN_STORED_BYTES if min_bytes is None else min_bytes
        self._count = itertools.count()
        # data_ptr of a mapped storage -> (file, byte size, sha256 of the bytes)
        self._files: dict[int, tuple[Path, int, bytes]] = {}
        self.stored_bytes = 0

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values as a mapped file (the same dtype and shape); small tensors come back as they are."""
        if tensor.device.type != "cpu" or tensor.nbytes < self.min_bytes or self.file_of(tensor) is not None:
            return tensor
        data = tensor.detach().contiguous()
        raw = data.view(-1).view(torch.uint8).numpy()  # one byte view of the values, no copy
        path = self._new_path()
        with open(path, "wb") as f:
            f.write(memoryview(raw))
        digest = hashlib.sha256(memoryview(raw)).digest()
        return self._map(path, data.shape, data.dtype, digest)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new tensor that lives in a file from the start, for a large result written a piece at a time
        (an LM head's packed rows): :meth:`written` takes each piece out of the resident set once it is
        written, so the whole is never in memory. Small ones are plain tensors."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        path = self._new_path()
        with open(path, "wb") as f:
            f.truncate(nbytes)
        return self._map(path, shape, dtype, None)  # its sha256 once written (file_of)

    def written(self, view: torch.Tensor) -> None:
        """The contiguous ``view`` of a tensor from :meth:`empty` holds its final values: its pages leave the
        resident set (they stay in the file). Anything else is left alone."""
        if view.device.type == "cpu" and view.is_contiguous() and view.untyped_storage().data_ptr() in self._files:
            release_pages(view.data_ptr(), view.nbytes)

    def _new_path(self) -> Path:
        return self.directory / f"{next(self._count):05d}.bin"

    def _map(self, path: Path, shape, dtype: torch.dtype, digest: bytes | None) -> torch.Tensor:
        numel = math.prod(shape)
        mapped = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        self._files[mapped.untyped_storage().data_ptr()] = (path, numel * dtype.itemsize, digest)
        self.stored_bytes += numel * dtype.itemsize
        return mapped

    def file_of(self, tensor: torch.Tensor) -> tuple[Path, bytes] | None:
        """(file, sha256) when ``tensor`` is exactly a stored file's contents (not a view of part of it)."""
        if tensor.device.type != "cpu":
            return None
        key = tensor.untyped_storage().data_ptr()
        entry = self._files.get(key)
        if entry is None or not tensor.is_contiguous() or tensor.storage_offset() != 0 or tensor.nbytes != entry[1]:
            return None
        if entry[2] is None:  # made by empty(): hashed from its file once asked (read, not mapped)
            entry = self._files[key] = (entry[0], entry[1], _file_sha256(entry[0]))
        return entry[0], entry[2]

    def adopt(self, module: nn.Module) -> nn.Module:
        """Move ``module``'s large parameters and buffers (all its submodules') to files; returns it."""
        for layer in module.modules():
            for table in (layer._parameters, layer._buffers):
                for key, value in table.items():
                    if value is None or value.device.type == "meta":
                        continue
                    stored = self.put(value)
                    if stored is not value:
                        table[key] = nn.Parameter(stored, requires_grad=False) if isinstance(value, nn.Parameter) else stored
        return module

    def release_pages(self, module: nn.Module) -> None:
        """Drop the pages of ``module``'s stored tensors from the resident set (they stay in their files;
        reading them again maps them back in). A forward pass reads every stored weight through its mapping:
        a whole-model calibration pass would otherwise leave all of them resident."""
        for layer in module.modules():
            for table in (layer._parameters, layer._buffers):
                for value in table.values():
                    if value is not None and value.device.type == "cpu":
                        entry = self._files.get(value.untyped_storage().data_ptr())
                        if entry is not None:
                            release_pages(value.untyped_storage().data_ptr(), entry[1])

    def close(self) -> None:
        self._files.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


class InMemory:
    """Where large results go without a store (``WeightStore.empty``/``written``'s counterparts): memory."""

    @staticmethod
    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    @staticmethod
    def written(view: torch.Tensor) -> None:
        pass


IN_MEMORY = InMemory()


def _file_sha256(path: Path, piece: int = 8 << 20) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            digest.update(chunk)
    return digest.digest()


@contextlib.contextmanager
def vulkan_constants_from_store(store: WeightStore | None) -> Iterator[None]:
    """Inside, ExecuTorch's Vulkan preprocess takes each stored constant as its file.

    Two copies are avoided:

    - ``to_backend`` deep-copies each partition's program before preprocessing
      it (``BackendDetails.copy_exported_program_for_preprocess``), constants
      included; here the copy shares the stored constants (they are only read);
    - ``VkGraphBuilder.maybe_add_constant_tensor`` copies every constant into a
      ``bytes`` object (keyed by its SHA-256) for the named data store. For a
      tensor that is a stored file (and that the builder would not convert to
      another dtype) this adds ExecuTorch's ``FileBackedData`` for the file
      instead, under the same key, so the serialized program is byte for byte
      the same and the bytes are never in memory.
    """
    if store is None:
        yield
        return
    from executorch.backends.vulkan.serialization import vulkan_graph_builder as builder
    from executorch.backends.vulkan.vulkan_preprocess import VulkanBackend
    from executorch.exir._serialize._cord import FileBackedData

    original = builder.VkGraphBuilder.maybe_add_constant_tensor
    original_copy = VulkanBackend.__dict__.get("copy_exported_program_for_preprocess")  # None: inherited

    def copy_for_preprocess(cls, edge_program, compile_specs):
        tables = (edge_program.state_dict, edge_program.constants)
        memo = {id(t): t for table in tables for t in table.values()
                if isinstance(t, torch.Tensor) and store.file_of(t) is not None}
        return copy.deepcopy(edge_program, memo)

    def add_constant(self, node) -> int:
        if builder.is_param_node(self.program, node):
            tensor = self.get_param_tensor(node)
            stored = store.file_of(tensor)
            if stored is not None and self.get_effective_dtype(tensor.dtype) == tensor.dtype:
                path, digest = stored
                key = digest.hex()
                self.named_data_store.add_named_data(key, FileBackedData(str(path), sha256=digest), alignment=16)
                self.const_tensors.append((key, tensor.nbytes))
                return len(self.const_tensors) - 1
        return original(self, node)

    builder.VkGraphBuilder.maybe_add_constant_tensor = add_constant
    VulkanBackend.copy_exported_program_for_preprocess = classmethod(copy_for_preprocess)
    try:
        yield
    finally:
        builder.VkGraphBuilder.maybe_add_constant_tensor = original
        if original_copy is None:
            del VulkanBackend.copy_exported_program_for_preprocess
        else:
            VulkanBackend.copy_exported_program_for_preprocess = original_copy
