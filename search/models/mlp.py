"""Residual MLP: input Linear, pre-LN residual blocks, LayerNorm, head (THEORY 7 regression and CIFAR)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """h + fc2(act(fc1(LN(h)))), or h + fc(act(LN(h))) when hidden is None; the branch's last linear starts at 0."""

    def __init__(self, width: int, hidden: int | None, act: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU()}[act]
        if hidden is None:
            self.fc1, self.fc2 = None, nn.Linear(width, width)
        else:
            self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        nn.init.zeros_(self.fc2.weight)  # muP: zero-init the last linear of every residual branch

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.norm(h)
        if self.fc1 is not None:
            z = self.fc1(z)
        return h + self.fc2(self.act(z))


class ResidualMLP(nn.Module):
    def __init__(
        self, d_in: int, width: int, d_out: int, depth: int, hidden_mult: int | None = None, act: str = "gelu"
    ):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        hidden = None if hidden_mult is None else hidden_mult * width
        self.blocks = nn.ModuleList(Block(width, hidden, act) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, d_out)
        nn.init.zeros_(self.head.weight)  # muP: zero-init output head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))
