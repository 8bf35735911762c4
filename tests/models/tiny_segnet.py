"""examples/segnet.py at test size: width 8, a 4×4 stride-2 transposed conv (padding 1), 5 classes (odd head)."""

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("qlower_example_segnet", Path(__file__).resolve().parents[2] / "examples" / "segnet.py")
_segnet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_segnet)

SIZE = 32


def make_model():
    return _segnet.make_model(num_classes=5, width=8, up_kernel=4)


example_inputs = (torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)),)


def calibration_inputs():
    return _segnet.calibration_inputs(SIZE)
