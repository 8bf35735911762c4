"""qlower: PyTorch model → quantized ExecuTorch .pte for the Vulkan GPU delegate.

Importing the package is cheap: ``qlower.export`` loads torch, torchao and
ExecuTorch (quietly, see console.import_heavy_libraries) on first use.
"""

from .errors import QlowerError
from .memory import no_blas_buffer_cache

no_blas_buffer_cache()

__all__ = ["export", "QlowerError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "export":
        from .console import import_heavy_libraries

        import_heavy_libraries()
        from .api import export

        globals()["export"] = export
        return export
    raise AttributeError(f"module 'qlower' has no attribute {name!r}")
