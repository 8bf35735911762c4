"""Transposed convs at odd shapes, int8 end to end: channels 3 → 5 → 7 → 8, kernels 3 and 2, stride 2,
padding 1 with output padding 1, then a plain 2×2 upsample, and a 1×1 head; odd input size 9×11."""

import torch
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(5, 7, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # 9×11 → 18×22
        nn.ConvTranspose2d(7, 8, 2, stride=2, bias=False),  # → 36×44, no relu, no bias
        nn.Conv2d(8, 3, 1),
    ).eval()


example_inputs = (torch.randn(1, 3, 9, 11, generator=torch.Generator().manual_seed(2)),)


def calibration_inputs():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(1, 3, 9, 11, generator=gen),) for _ in range(4)]
