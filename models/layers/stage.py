"""A stage of PaCa blocks: run in order, each handing its cluster assignments to the next."""
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layout import nchw_to_tokens


class PaCaStage(nn.ModuleList):
    """The PaCa blocks of one stage.  A ``ModuleList`` (the official ``stage{i}.{j}`` names) that
    also runs them: the first block (or the teacher) provides the assignments the others reuse."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__(blocks)
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None, shortcut: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.run_blocks(x, teacher_logits, shortcut)

    def run_blocks(
        self, x: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None, shortcut: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x: (B, H, W, C).  teacher_logits: (B, M, H*W) cluster logits from the ConvMixer teacher;
        shortcut: the teacher's (B, C, H, W) stage features, added to the output.  Returns
        (B, H, W, C), before the stage norm."""
        hw = (x.shape[1], x.shape[2])
        tokens = x.flatten(1, 2)
        assignments = None if teacher_logits is None else teacher_logits.softmax(dim=-1)
        for blk in self:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                tokens, assignments = checkpoint(blk, tokens, hw, assignments, use_reentrant=False)
            else:
                tokens, assignments = blk(tokens, hw, assignments)
        if shortcut is not None:
            tokens = tokens + nchw_to_tokens(shortcut)
        return tokens.view_as(x)
