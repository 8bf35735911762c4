"""A small MobileNetV2-style classifier in plain torch, for the static int8 scheme.

Thirteen convolutions: a 3×3 strided stem, inverted residual blocks (1×1
expand, 3×3 depthwise, 1×1 linear projection) with ReLU6 and residual adds
where the shape allows, a final 1×1 conv, global average pooling as
``mean((2, 3))`` and a linear head. With ``--scheme q8ta_q8csw`` the convs
become ``et_vk.q8ta_conv2d``/``_dw``/``_pw`` with ReLU6 folded into their
output quantization, the adds ``et_vk.q8ta_add``.

    qlower export examples/mobilenet_v2.py -o mobilenet_v2.pte --config configs/vision.toml
"""

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2Style(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, stride=2),
            InvertedResidual(16, 16, 1, 1),  # dw, project; residual
            InvertedResidual(16, 24, 2, 4),  # expand, dw (stride 2), project
            InvertedResidual(24, 24, 1, 4),  # residual
            InvertedResidual(24, 32, 2, 4),
            conv_bn(32, 64, 1),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = MobileNetV2Style()
    _randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model.eval()


example_inputs = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)),)


def calibration_inputs():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(4)]
