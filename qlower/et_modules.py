"""ExecuTorch's .pte serialization modules, without their packages' heavy ``__init__``.

Reading a .pte takes a handful of light ExecuTorch modules (the program schema
and its flatbuffer reader, the Vulkan graph schema), but importing them the
usual way first runs ``executorch/exir/__init__.py`` (torch.export, the exir
passes, torchao: most of ten seconds) and ``executorch/backends/vulkan/__init__.py``
(the partitioner). In a process that only reads files (:func:`read_without_compiler`:
the inspect command), :func:`load_serialization` puts those packages in
``sys.modules`` with their ``__init__`` deferred: submodules import as usual,
and the first access to any other attribute of the package (``from
executorch.exir import to_edge``) runs the real ``__init__`` in the same module
object, so there is one copy of every module and class. :func:`complete` runs
the deferred ``__init__`` now (``console.import_heavy_libraries``, while the
import-time chatter is silenced).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# Packages whose __init__ pulls in the compiler side of ExecuTorch.
HEAVY_PACKAGES = ("executorch.exir", "executorch.backends.vulkan")
SERIALIZATION_MODULES = (
    "executorch.exir._serialize._program",
    "executorch.exir._serialize._dataclass",
    "executorch.exir._serialize._flatbuffer",
    "executorch.backends.vulkan.serialization.vulkan_graph_schema",
    "executorch.backends.vulkan.serialization.vulkan_graph_serialize",
)


class _DeferredPackage(types.ModuleType):
    """A package whose ``__init__`` runs on the first access to an attribute it does not have yet."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        _run_init(self)
        return getattr(self, name)


def _run_init(package: types.ModuleType) -> None:
    if isinstance(package, _DeferredPackage):
        package.__class__ = types.ModuleType
        package.__spec__.loader.exec_module(package)


_deferring = False  # set by a process that reads files and never lowers (the inspect command)


def read_without_compiler() -> None:
    """From now on, load_serialization defers the heavy packages' ``__init__``. Only for a process
    that never imports ExecuTorch's compiler modules directly (a submodule import such as
    ``executorch.exir.pass_base`` under a deferred package can meet a half-run ``__init__``)."""
    global _deferring
    _deferring = True


def load_serialization() -> None:
    """Import SERIALIZATION_MODULES; after read_without_compiler, deferring the ``__init__`` of heavy
    packages not imported yet."""
    if all(name in sys.modules for name in SERIALIZATION_MODULES):
        return
    if not _deferring:
        for name in SERIALIZATION_MODULES:
            importlib.import_module(name)
        return
    for name in HEAVY_PACKAGES:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            continue  # not installed as a package: the imports below say so
        package = importlib.util.module_from_spec(spec)
        package.__class__ = _DeferredPackage
        sys.modules[name] = package
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, package)
    for name in SERIALIZATION_MODULES:
        importlib.import_module(name)


def complete() -> None:
    """Run the ``__init__`` that load_serialization deferred."""
    for name in HEAVY_PACKAGES:
        module = sys.modules.get(name)
        if module is not None:
            _run_init(module)
