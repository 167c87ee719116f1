"""Clustering modules: map N patch tokens to M cluster-assignment logits.

Every module takes tokens ``x`` of shape (B, N, C) with their spatial size ``hw`` and returns
logits of shape (B, M, N); the softmax over the N patches (last dim) is taken by the caller.
The last projection is computed as ``W @ x^T`` so that the logits come out cluster-major and
contiguous (a softmax over a non-last dim, or a transposing copy, costs more than the GEMM).
"""
import torch
from torch import nn

from .fused import conv_act, linear_act
from .layout import nchw_to_tokens, tokens_to_nchw


def project_to_clusters(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """Cluster-major ``linear``: (B, N, C) tokens and (M, C[,1,1]) weights -> (B, M, N) logits."""
    logits = torch.matmul(weight.flatten(1), x.transpose(1, 2))
    return logits if bias is None else logits + bias.unsqueeze(-1)


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

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        depthwise, act1, pointwise, act2, to_clusters = self.clustering
        x = conv_act(tokens_to_nchw(x, hw), depthwise.weight, depthwise.bias, depthwise.padding, x.shape[-1], act1)
        # The 1x1 convs are applied as linear layers on the (B, N, C) tokens: same weights and
        # math, but no NCHW round trip and a faster GEMM than a 1x1 convolution.
        x = linear_act(nchw_to_tokens(x), pointwise.weight.flatten(1), pointwise.bias, act2)
        return project_to_clusters(x, to_clusters.weight)


class MlpClustering(nn.Module):
    """Linear -> GELU -> Linear to M: ``p2cmlp``, the domain-agnostic token-to-cluster form."""

    def __init__(self, dim: int, num_clusters: int, mlp_ratio: float = 4.0, act_layer=nn.GELU):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.clustering = nn.Sequential(nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, num_clusters))

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        hidden, act, to_clusters = self.clustering
        return project_to_clusters(linear_act(x, hidden.weight, hidden.bias, act), to_clusters.weight, to_clusters.bias)


class LinearClustering(nn.Module):
    """A single linear projection to M (no bias): ``p2clinear``."""

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.clustering = nn.Sequential(nn.Linear(dim, num_clusters, bias=False))

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        return project_to_clusters(x, self.clustering[0].weight)


CLUSTERING_LAYERS = {"conv": ConvClustering, "mlp": MlpClustering, "linear": LinearClustering}
