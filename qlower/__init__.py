"""qlower: PyTorch model → quantized ExecuTorch .pte for the Vulkan GPU delegate."""

from .console import import_heavy_libraries

# torch/torchao/ExecuTorch print optional-kernel notices at import; take them
# quietly once, before any module below pulls them in.
import_heavy_libraries()

from .api import export  # noqa: E402
from .errors import QlowerError  # noqa: E402

__all__ = ["export", "QlowerError"]
__version__ = "0.1.0"
