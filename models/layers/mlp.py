"""The PaCa block's feed-forward network: fc1 -> 3x3 depthwise conv (+ shortcut) -> GELU -> fc2."""
from typing import Optional

import torch
from torch import nn

from .fused import conv_act, linear_act
from .layout import nchw_to_tokens, tokens_to_nchw


class DWConv(nn.Module):
    """3x3 depthwise convolution over tokens, with its own identity shortcut.

    ``x + dwconv(x)`` is computed as one convolution whose kernel has 1 added at its centre tap:
    the same function, without a separate pass over the block's largest tensor.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        identity = torch.zeros(dim, 1, 3, 3)
        identity[:, :, 1, 1] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def forward(self, x: torch.Tensor, hw, act: Optional[nn.Module] = None) -> torch.Tensor:
        """``act(x + dwconv(x))``; ``act=None`` is the identity."""
        weight = self.dwconv.weight + self.identity.to(self.dwconv.weight.dtype)
        y = conv_act(tokens_to_nchw(x, hw), weight, self.dwconv.bias, (1, 1), x.shape[-1], act)
        return nchw_to_tokens(y)


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        x = self.drop(self.dwconv(linear_act(x, self.fc1.weight, self.fc1.bias), hw, act=self.act))
        return self.drop(linear_act(x, self.fc2.weight, self.fc2.bias))
