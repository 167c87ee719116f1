"""The PaCa block's feed-forward network: fc1 -> 3x3 depthwise conv (+ shortcut) -> GELU -> fc2."""
from typing import Tuple

import torch
from torch import nn

from .layout import nchw_to_tokens, tokens_to_nchw


class DWConv(nn.Module):
    """3x3 depthwise convolution over (B, N, C) tokens, with its own identity shortcut."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return x + nchw_to_tokens(self.dwconv(tokens_to_nchw(x, hw)))


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x, hw)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)
