"""A two-layer MLP: the smallest model that exercises every linear scheme."""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 256, d_hidden: int = 512, d_out: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def make_example_inputs():
    return (torch.randn(4, 256),)
