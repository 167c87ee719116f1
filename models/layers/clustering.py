"""Clustering modules: map N patch tokens to M cluster-assignment logits.

Every module takes tokens ``x`` of shape (B, N, C) with their spatial size ``hw`` and returns
logits of shape (B, M, N); the softmax over the N patches (last dim) is taken by the caller.

The layer that outputs the M logits (the *cluster output layer*: it is resized when the number of
clusters changes, and the ADE20K recipe gives it its own learning rate) is named by each module's
``named_cluster_outputs()``; :func:`find_cluster_output_layers` finds them in any model, so no
caller needs to know their position inside the module (the state_dict keys stay the official ones).
"""
from typing import Iterator, List, Tuple

import torch
from torch import nn

from .layout import tokens_to_nchw


class _SequentialClustering(nn.Module):
    """A clustering module whose ``clustering`` Sequential ends in the cluster output layer."""

    kind: str  # the name in CLUSTERING_LAYERS
    __jit_unused_properties__ = ["output_layer"]  # a Python-side accessor; TorchScript compiles forward only

    @property
    def output_layer(self) -> nn.Module:
        return self.clustering[-1]

    def replace_output_layer(self, layer: nn.Module) -> None:
        """Swap the output layer (e.g. for an equivalent fused one); its state_dict key stays."""
        self.clustering[len(self.clustering) - 1] = layer

    def named_cluster_outputs(self) -> List[Tuple[str, nn.Module]]:
        return [(f"clustering.{len(self.clustering) - 1}", self.output_layer)]


class ConvClustering(_SequentialClustering):
    """7x7 depthwise conv -> GELU -> 1x1 conv -> GELU -> 1x1 conv to M (no bias): ``p2cconv``."""

    kind = "conv"

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


class MlpClustering(_SequentialClustering):
    """Linear -> GELU -> Linear to M: ``p2cmlp``, the domain-agnostic token-to-cluster form."""

    kind = "mlp"

    def __init__(self, dim: int, num_clusters: int, mlp_ratio: float = 4.0, act_layer=nn.GELU):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.clustering = nn.Sequential(nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, num_clusters))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return self.clustering(x).transpose(1, 2)


class LinearClustering(_SequentialClustering):
    """A single linear projection to M (no bias): ``p2clinear``."""

    kind = "linear"

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.clustering = nn.Sequential(nn.Linear(dim, num_clusters, bias=False))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return self.clustering(x).transpose(1, 2)


CLUSTERING_LAYERS = {cls.kind: cls for cls in (ConvClustering, MlpClustering, LinearClustering)}


def find_cluster_output_layers(model: nn.Module) -> Iterator[Tuple[str, str, nn.Module]]:
    """``(module path, kind, layer)`` of every cluster output layer in ``model``: the on-site
    clustering modules (kind ``conv``, ``mlp``, ``linear``) and the ConvMixer teacher's per-stage
    heads (``teacher``)."""
    for path, module in model.named_modules():
        if hasattr(module, "named_cluster_outputs"):
            for name, layer in module.named_cluster_outputs():
                yield (f"{path}.{name}" if path else name), module.kind, layer
