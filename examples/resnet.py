"""A small ResNet-style classifier in plain torch, for the static int8 scheme.

Nine convolutions (a 3×3 stem, three basic blocks of two 3×3 convs, two 1×1
strided shortcuts), BatchNorm after each, ReLU, three residual adds, global
average pooling and a linear head. With ``--scheme q8ta_q8csw`` every conv
becomes an int8 ``et_vk.q8ta_conv2d``/``_pw``, every add an ``et_vk.q8ta_add``.

    qlower export examples/resnet.py -o resnet.pte --config configs/vision.toml
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class ResNetStyle(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    # Untrained BatchNorm is the identity; give it running statistics and an
    # affine transform so folding it into the convolutions is exercised.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = ResNetStyle()
    _randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model.eval()


example_inputs = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)),)


def calibration_inputs():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(4)]
