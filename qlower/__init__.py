"""qlower: PyTorch model → quantized ExecuTorch .pte for the Vulkan GPU delegate."""

from .api import export
from .errors import QlowerError

__all__ = ["export", "QlowerError"]
__version__ = "0.1.0"
