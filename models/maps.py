"""Interpretability: cluster assignments and attention maps out of a normal forward pass.

``capture_maps`` only adds forward hooks: the model runs its usual code (and kernels) and its
output is unchanged.  The attention weights, which the fused attention kernel never forms, come from
``PaCaAttention.attention_weights`` applied to the outputs of the ``q`` and ``k`` layers that the
hooks see.
"""
import re
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from torch import nn

from .layers import PaCaAttention

_BLOCK_NAME = re.compile(r"stage(\d+)\.(\d+)\.attn$")


class _BlockRecorder:
    """Hooks on one PaCa attention block: its q and k outputs, then the block's own output."""

    def __init__(self, sink: list, attn: PaCaAttention, stage: int, block: int):
        self.sink, self.attn, self.stage, self.block = sink, attn, stage, block
        self.q: Optional[torch.Tensor] = None
        self.k: Optional[torch.Tensor] = None
        self.handles = [
            attn.q.register_forward_hook(self.keep_q),
            attn.k.register_forward_hook(self.keep_k),
            attn.register_forward_hook(self.record, with_kwargs=True),
        ]

    def keep_q(self, module, args, out):
        self.q = out.detach()

    def keep_k(self, module, args, out):
        self.k = out.detach()

    def record(self, module, args, kwargs, output):
        if torch._C._current_graph_task_id() != -1:
            return  # gradient checkpointing runs the block again during backward: recorded already
        hw = tuple(args[1] if len(args) > 1 else kwargs["hw"])
        assignments = output[1]
        self.sink.append({
            "stage": self.stage,
            "block": self.block,
            "assignments": None if assignments is None else assignments.detach().unflatten(-1, hw),
            "attention": self.attn.attention_weights(self.q, self.k),
            "hw": hw,
        })
        self.q = self.k = None


def _record_head(sink: list, name: str):
    """Hook for a segmentation head's clustering layer: (B, M, H, W) logits -> softmax over pixels."""

    def record(module, args, logits):
        hw = tuple(logits.shape[-2:])
        assignments = logits.detach().flatten(2).softmax(dim=-1).unflatten(-1, hw)
        sink.append({"head": name, "assignments": assignments, "hw": hw})

    return record


@contextmanager
def capture_maps(model: nn.Module) -> Iterator[List[dict]]:
    """Record the cluster maps of every PaCa block and PaCa segmentation head run inside the ``with``.

    For a block (a ``PaCaAttention`` named ``...stage<s>.<b>.attn``), a dict with

    - ``stage`` (0-based) and ``block`` (index within the stage),
    - ``assignments``: (B, M, H, W) soft cluster assignments (softmax over the H*W patches), or
      None in a stage without clusters,
    - ``attention``: (B, heads, N, M) attention of each patch over the clusters (N x N without),
    - ``hw``: the stage's (H, W).

    For a segmentation head (a module whose class names its clustering layer in
    ``cluster_logits_layer``, e.g. ``PaCaSegHead``), a dict with ``head`` (its module name),
    ``assignments`` (B, num_classes, H, W), softmax over the pixels, and ``hw``.
    """
    maps: List[dict] = []
    handles = []
    for name, module in model.named_modules():
        match = _BLOCK_NAME.search(name)
        if isinstance(module, PaCaAttention) and match:
            recorder = _BlockRecorder(maps, module, int(match.group(1)) - 1, int(match.group(2)))
            handles.extend(recorder.handles)
        layer = getattr(type(module), "cluster_logits_layer", None)
        if layer is not None:
            handles.append(getattr(module, layer).register_forward_hook(_record_head(maps, name)))
    if not handles:
        raise ValueError(f"{type(model).__name__} has no PaCa attention blocks or PaCa head to capture")
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
