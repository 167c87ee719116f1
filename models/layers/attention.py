"""Patch-to-cluster attention: queries from the N patches, keys and values from M clusters."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fused import linear_act

try:
    import xformers.ops as xops
except ImportError:  # optional dependency
    xops = None


class PaCaAttention(nn.Module):
    """Multi-head attention of N patch tokens over M cluster tokens.

    With ``num_clusters == 0`` the keys and values come from the patches themselves (ordinary
    patch-to-patch attention).  ``clustering`` (optional) computes this block's assignment logits;
    without it the block reuses the assignments handed in by an earlier block or the teacher.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_clusters: int = 0,
        clustering: Optional[nn.Module] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer=nn.LayerNorm,
        use_xformers: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if use_xformers and xops is None:
            raise ImportError("use_xformers=True needs the xformers package (./install.sh --with-xformers)")
        self.num_heads = num_heads
        self.num_clusters = num_clusters
        self.use_xformers = use_xformers
        if num_clusters > 0:
            self.cluster_norm = norm_layer(dim)
            if clustering is not None:
                self.clustering = clustering
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Set by ``models.capture_maps``: a list that receives this block's maps on each forward.
        self.capture: Optional[list] = None

    @property
    def computes_assignments(self) -> bool:
        return hasattr(self, "clustering")

    def forward(self, x: torch.Tensor, hw, assignments: Optional[torch.Tensor] = None):
        """x: (B, N, C) normalised tokens; assignments: (B, M, N) softmax over N, or None.

        Returns the attention output (B, N, C) and the assignments to hand to the next block.
        """
        if self.num_clusters > 0:
            if self.computes_assignments:
                assignments = self.clustering(x, hw).softmax(dim=-1)
            elif assignments is None:
                raise RuntimeError("a block without a clustering module needs assignments from an earlier block")
            context = self.cluster_norm(torch.bmm(assignments, x))
        else:
            context = x
        B, N, C = x.shape
        M = context.shape[1]
        heads = self.num_heads
        q = linear_act(x, self.q.weight, self.q.bias).view(B, N, heads, C // heads)
        k = linear_act(context, self.k.weight, self.k.bias).view(B, M, heads, C // heads)
        v = linear_act(context, self.v.weight, self.v.bias).view(B, M, heads, C // heads)
        dropout_p = self.attn_drop if self.training else 0.0

        if self.capture is not None:
            out = self._explicit_attention(q, k, v, dropout_p, assignments, hw)
        elif self.use_xformers and x.is_cuda:
            out = xops.memory_efficient_attention(q, k, v, p=dropout_p)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p
            ).transpose(1, 2)
        out = self.proj_drop(linear_act(out.reshape(B, N, C), self.proj.weight, self.proj.bias))
        return out, assignments

    def _explicit_attention(self, q, k, v, dropout_p, assignments, hw):
        """The same math as the fused kernels, keeping the attention weights for inspection."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        weights = weights.softmax(dim=-1)
        self.capture.append(
            {
                "assignments": None if assignments is None else assignments.detach().unflatten(-1, tuple(hw)),
                "attention": weights.detach(),
                "hw": tuple(hw),
            }
        )
        weights = F.dropout(weights, dropout_p, self.training)
        return (weights @ v).transpose(1, 2)
