"""Clustering modules: map N patch tokens to M cluster-assignment logits.

Every module takes tokens ``x`` of shape (B, N, C) with their spatial size ``hw`` and returns
logits of shape (B, M, N); the softmax over the N patches (last dim) is taken by the caller.
"""
from typing import Tuple

import torch
from torch import nn

from .layout import tokens_to_nchw


class ConvClustering(nn.Module):
    """7x7 depthwise conv -> GELU -> 1x1 conv -> GELU -> 1x1 conv to M (no bias): ``p2cconv``."""

    def __init__(self, dim: int, num_clusters: int, kernel_size: int = 7, act_layer=nn.GELU):
        super().__init__()
        self.clustering = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
            act_layer(),
            nn.Conv2d(dim, dim, 1),
            act_layer(),
            nn.Conv2d(dim, num_clusters, 1, bias=False),
        )

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return self.clustering(tokens_to_nchw(x, hw)).flatten(2)


class MlpClustering(nn.Module):
    """Linear -> GELU -> Linear to M: ``p2cmlp``, the domain-agnostic token-to-cluster form."""

    def __init__(self, dim: int, num_clusters: int, mlp_ratio: float = 4.0, act_layer=nn.GELU):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.clustering = nn.Sequential(nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, num_clusters))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return self.clustering(x).transpose(1, 2)


class LinearClustering(nn.Module):
    """A single linear projection to M (no bias): ``p2clinear``."""

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.clustering = nn.Sequential(nn.Linear(dim, num_clusters, bias=False))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return self.clustering(x).transpose(1, 2)


CLUSTERING_LAYERS = {"conv": ConvClustering, "mlp": MlpClustering, "linear": LinearClustering}
