"""The ConvMixer clustering teacher.

A small convolutional pyramid runs beside the transformer on the stem output.  Its bottom-up
stage features are added to the transformer's stage outputs (before the stage norm); a top-down
path (FPN-like) merges the stages, and each merged stage predicts the cluster-assignment logits
for that stage's PaCa blocks.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class BlurPoolConv2d(nn.Module):
    """A fixed 3x3 binomial blur before a strided conv (anti-aliased downsampling)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        binomial = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
        self.register_buffer("blur_filter", binomial.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_filter, padding=1, groups=self.conv.in_channels)
        return self.conv(x)


def conv_mixer_layer(dim: int, kernel_size: int, act_layer=nn.GELU) -> nn.Sequential:
    """Depthwise conv (residual) -> pointwise conv, each followed by activation and BatchNorm."""
    return nn.Sequential(
        Residual(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim), act_layer(), nn.BatchNorm2d(dim)
            )
        ),
        nn.Conv2d(dim, dim, 1),
        act_layer(),
        nn.BatchNorm2d(dim),
    )


def conv_act_bn(conv: nn.Module, out_dim: int, act_layer=nn.GELU) -> nn.Sequential:
    return nn.Sequential(conv, act_layer(), nn.BatchNorm2d(out_dim))


class ConvMixerTeacher(nn.Module):
    kind = "teacher"  # for find_cluster_output_layers (models/layers/clustering.py)

    def __init__(
        self,
        embed_dims: Tuple[int, ...],
        depths: Tuple[int, ...],
        num_clusters: Tuple[int, ...],
        kernel_size: int = 7,
        act_layer=nn.GELU,
    ):
        super().__init__()
        self.num_stages = len(embed_dims)
        for i, dim in enumerate(embed_dims):
            layers = [conv_mixer_layer(dim, kernel_size, act_layer) for _ in range(depths[i])]
            setattr(self, f"block{i + 1}", nn.Sequential(*layers))
            if i + 1 < self.num_stages:
                nxt = embed_dims[i + 1]
                down = BlurPoolConv2d(nn.Conv2d(dim, nxt, 3, stride=2, padding=1))
                setattr(self, f"transition{i + 1}", conv_act_bn(down, nxt, act_layer))
                setattr(self, f"lateral{i + 1}", conv_act_bn(nn.Conv2d(nxt, dim, 1), dim, act_layer))
                setattr(self, f"fpn{i + 1}", conv_mixer_layer(dim, kernel_size, act_layer))
            if num_clusters[i] > 0:
                setattr(self, f"to_clusters{i + 1}", nn.Conv2d(dim, num_clusters[i], 1))

    def named_cluster_outputs(self) -> List[Tuple[str, nn.Module]]:
        """The per-stage heads that output the cluster-assignment logits (``to_clusters{i}``)."""
        return [(name, child) for name, child in self.named_children() if name.startswith("to_clusters")]

    def forward(self, x: torch.Tensor) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]:
        """x: stem output (B, C, H, W).

        Returns per-stage assignment logits (B, M, N) (None for a stage without clusters) and the
        bottom-up stage features (B, C, H, W).
        """
        # The children keep the official names (block1, transition1, ...), so they are found by
        # name; a loop over named_children() also compiles with TorchScript, unlike getattr(f"...").
        bottom_up: List[torch.Tensor] = []
        for name, bottom_layer in self.named_children():
            if name.startswith("block"):
                x = bottom_layer(x)
                bottom_up.append(x)
            elif name.startswith("transition"):
                x = bottom_layer(x)
        merged = [bottom_up[-1]]
        for level in range(len(bottom_up) - 2, -1, -1):
            top = F.interpolate(merged[0], size=bottom_up[level].shape[-2:], mode="bilinear", align_corners=False)
            for name, top_down_layer in self.named_children():  # lateral{i} is registered before fpn{i}
                if name == f"lateral{level + 1}":
                    top = top_down_layer(top)
                elif name == f"fpn{level + 1}":
                    merged.insert(0, top_down_layer(bottom_up[level] + top))
        logits: List[Optional[torch.Tensor]] = [None for _ in merged]
        for name, head in self.named_children():
            if name.startswith("to_clusters"):
                level = int(name[len("to_clusters"):]) - 1
                logits[level] = head(merged[level]).flatten(2)
        return logits, bottom_up
