"""Interpretability hook: cluster assignments and attention maps out of a normal forward pass."""
import re
from contextlib import contextmanager
from typing import Iterator, List

from torch import nn

from .layers import PaCaAttention

_BLOCK_NAME = re.compile(r"stage(\d+)\.(\d+)\.attn$")


class _Recorder:
    """Stands in for a list on one attention block, tagging its entries with stage and block."""

    def __init__(self, sink: list, stage: int, block: int):
        self.sink, self.stage, self.block = sink, stage, block

    def append(self, entry: dict):
        self.sink.append({"stage": self.stage, "block": self.block, **entry})


@contextmanager
def capture_maps(model: nn.Module) -> Iterator[List[dict]]:
    """Record, for every PaCa block run inside the ``with``, a dict with

    - ``stage`` (0-based) and ``block`` (index within the stage),
    - ``assignments``: (B, M, H, W) soft cluster assignments (softmax over the H*W patches), or
      None in a stage without clusters,
    - ``attention``: (B, heads, N, M) attention of each patch over the clusters (N x N without),
    - ``hw``: the stage's (H, W).

    The math is unchanged: the blocks compute attention explicitly instead of with a fused kernel.
    """
    maps: List[dict] = []
    blocks = []
    for name, module in model.named_modules():
        match = _BLOCK_NAME.search(name)
        if isinstance(module, PaCaAttention) and match:
            module.capture = _Recorder(maps, int(match.group(1)) - 1, int(match.group(2)))
            blocks.append(module)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no PaCa attention blocks to capture")
    try:
        yield maps
    finally:
        for module in blocks:
            module.capture = None
