"""A small segmentation-style CNN in plain torch, for the static int8 scheme.

An encoder of three 3×3 convs (stride 1, 2, 2), a 2×2 stride-2 transposed
conv that upsamples back to the stride-2 resolution, a channel concat with
that skip, and a 1×1 per-pixel head (one logit per class and pixel). With
``--scheme q8ta_q8csw`` every conv becomes an int8 ``et_vk.q8ta_conv2d`` /
``_pw`` and the transposed conv ``et_vk.q8ta_conv2d_transposed``, so
activations stay int8 from the first conv to the head.

    qlower export examples/segnet.py -o segnet.pte --config configs/vision.toml
"""

import torch
from torch import nn


class SegNet(nn.Module):
    def __init__(self, num_classes: int = 5, width: int = 16, up_kernel: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        # Doubles H and W for an even kernel: (H − 1)·2 − 2p + k with p = k/2 − 1.
        self.up = nn.ConvTranspose2d(4 * width, 2 * width, up_kernel, stride=2, padding=up_kernel // 2 - 1)
        self.fuse = nn.Conv2d(4 * width, 2 * width, 3, padding=1)
        self.head = nn.Conv2d(2 * width, num_classes, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        skip = self.relu(self.down1(x))
        x = self.relu(self.down2(skip))
        x = self.relu(self.up(x))
        x = self.relu(self.fuse(torch.cat([x, skip], dim=1)))
        return self.head(x)


def make_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return SegNet(**kwargs).eval()


SIZE = 64
example_inputs = (torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)),)


def calibration_inputs(size: int = SIZE):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(1, 3, size, size, generator=gen),) for _ in range(4)]
