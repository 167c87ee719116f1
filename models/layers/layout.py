"""Zero-copy moves between token (B, N, C) and image (B, C, H, W) layouts.

Tokens are kept contiguous as (B, H*W, C), i.e. NHWC.  Viewing them as NCHW gives a
channels_last tensor, which convolutions consume and produce without a layout copy.
"""
from typing import Tuple

import torch


def tokens_to_nchw(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    B, _, C = x.shape
    return x.view(B, hw[0], hw[1], C).permute(0, 3, 1, 2)


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); free when ``x`` is channels_last."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)
