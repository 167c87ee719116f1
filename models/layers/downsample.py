"""Stem and stage transitions: stride-2 3x3 convolutions followed by a channel LayerNorm."""
import math

import torch
from torch import nn


class ConvDownsample(nn.Module):
    """Downsample by ``stride`` (a power of two) with log2(stride) stride-2 3x3 convs.

    The stem (stride 4: 3 -> C/2 -> C) keeps its convs in an ``nn.Sequential``; a transition
    (stride 2) is one conv.  Input is NCHW; the output is NHWC so that the normalised result is
    directly the (B, H*W, C) token sequence.
    """

    def __init__(self, in_chans: int, embed_dim: int, stride: int, eps: float = 1e-6):
        super().__init__()
        num_convs = int(math.log2(stride))
        if 2**num_convs != stride or num_convs < 1:
            raise ValueError(f"stride must be a power of two >= 2, got {stride}")
        widths = [in_chans] + [embed_dim // 2 ** (num_convs - 1 - i) for i in range(num_convs)]
        convs = [nn.Conv2d(cin, cout, 3, stride=2, padding=1) for cin, cout in zip(widths[:-1], widths[1:])]
        self.proj = convs[0] if num_convs == 1 else nn.Sequential(*convs)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))
