"""Clustering modules: map N patch tokens to M cluster-assignment logits.

Every module takes tokens ``x`` of shape (B, N, C) with their spatial size ``hw`` and returns
logits of shape (B, N, M), token-major like the tokens themselves, so that no layout copy is
needed; the softmax over the N patches (dim 1) is taken by the caller.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .layout import nchw_to_tokens, tokens_to_nchw


class ConvClustering(nn.Module):
    """7x7 depthwise conv -> GELU -> 1x1 conv -> GELU -> 1x1 conv to M (no bias): ``p2cconv``."""

    def __init__(self, dim: int, num_clusters: int, kernel_size: int = 7, act_layer=nn.GELU, **_):
        super().__init__()
        self.clustering = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
            act_layer(),
            nn.Conv2d(dim, dim, 1),
            act_layer(),
            nn.Conv2d(dim, num_clusters, 1, bias=False),
        )

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        depthwise, act1, pointwise, act2, to_clusters = self.clustering
        x = nchw_to_tokens(act1(depthwise(tokens_to_nchw(x, hw))))
        # The 1x1 convs are applied as linear layers on the (B, N, C) tokens: same weights and
        # math, but no NCHW round trip and a faster GEMM than a 1x1 convolution.
        x = act2(F.linear(x, pointwise.weight.flatten(1), pointwise.bias))
        return F.linear(x, to_clusters.weight.flatten(1))


class MlpClustering(nn.Module):
    """Linear -> GELU -> Linear to M: ``p2cmlp``, the domain-agnostic token-to-cluster form."""

    def __init__(self, dim: int, num_clusters: int, mlp_ratio: float = 4.0, act_layer=nn.GELU, **_):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.clustering = nn.Sequential(nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, num_clusters))

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        return self.clustering(x)


class LinearClustering(nn.Module):
    """A single linear projection to M (no bias): ``p2clinear``."""

    def __init__(self, dim: int, num_clusters: int, **_):
        super().__init__()
        self.clustering = nn.Sequential(nn.Linear(dim, num_clusters, bias=False))

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        return self.clustering(x)


CLUSTERING_LAYERS = {"conv": ConvClustering, "mlp": MlpClustering, "linear": LinearClustering}
