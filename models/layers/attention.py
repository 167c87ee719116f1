"""Patch-to-cluster attention: queries from the N patches, keys and values from M clusters."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    import xformers.ops as xops
except ImportError:  # optional dependency
    xops = None


class PaCaAttention(nn.Module):
    """Multi-head attention of N patch tokens over M cluster tokens.

    With ``num_clusters == 0`` the keys and values come from the patches themselves (ordinary
    patch-to-patch attention).  ``clustering`` (optional) computes this block's assignment logits;
    without it the block reuses the assignments handed in by an earlier block or the teacher.
    The attention weights are ``attention_weights`` of the outputs of ``q`` and ``k``: the fused
    kernel never forms them, so ``models.capture_maps`` rebuilds them from hooks on those layers.
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
        if clustering is not None and num_clusters == 0:
            raise ValueError("a clustering module needs num_clusters > 0")
        self.num_heads = num_heads
        self.num_clusters = num_clusters
        self.use_xformers = use_xformers
        self.cluster_norm = norm_layer(dim) if num_clusters > 0 else None
        self.clustering = clustering
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def computes_assignments(self) -> bool:
        return self.clustering is not None

    def forward(
        self, x: torch.Tensor, hw: Tuple[int, int], assignments: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, N, C) normalised tokens; assignments: (B, M, N) softmax over N, or None.

        Returns the attention output (B, N, C) and the assignments to hand to the next block.
        """
        if self.clustering is not None:
            assignments = self.clustering(x, hw).softmax(dim=-1)
        context = x
        if self.cluster_norm is not None:
            if assignments is None:
                raise RuntimeError("a block without a clustering module needs assignments from an earlier block")
            context = self.cluster_norm(torch.bmm(assignments, x))
        B, N, C = x.shape
        M = context.shape[1]
        heads = self.num_heads
        q = self.q(x).view(B, N, heads, C // heads)
        k = self.k(context).view(B, M, heads, C // heads)
        v = self.v(context).view(B, M, heads, C // heads)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.use_xformers and x.is_cuda:
            out = self._xformers_attention(q, k, v, dropout_p)
        else:
            out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p).transpose(1, 2)
        out = self.proj_drop(self.proj(out.reshape(B, N, C)))
        return out, assignments

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Scaled dot-product attention of (B, heads, N, d) queries over (B, heads, M, d) keys / values
        (``fuse_for_cpu`` swaps in a faster way for bfloat16 on the CPU)."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    @torch.jit.unused
    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) per head, (B, heads, N, M), from the outputs of ``q`` (B, N, C)
        and ``k`` (B, M, C): the weights that the block's scaled dot-product attention applies to ``v``."""
        q, k = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k))
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)

    @torch.jit.unused
    def _xformers_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        return xops.memory_efficient_attention(q, k, v, p=dropout_p)
