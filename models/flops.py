"""FLOP counting with fvcore (one multiply-add = one FLOP, the convention of the seed tables).

fvcore silently ignores operators it has no handle for; ``scaled_dot_product_attention`` is one
of them, so without ``sdpa_flop_jit`` the attention matmuls (q @ k^T and attn @ v) would be
missing from the count.  The official code computed them with explicit ``bmm`` in eval mode,
which fvcore does count, so registering the handle keeps the figures comparable.
"""
import math
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

SDPA_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")


def _shape(value) -> List[int]:
    return value.type().sizes()


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of softmax(q k^T) v for q (..., L, E), k (..., S, E), v (..., S, Ev)."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def flop_handles() -> dict:
    """Extra handles for fvcore's FlopCountAnalysis or mmengine.analysis.FlopAnalyzer."""
    return {op: sdpa_flop_jit for op in SDPA_OPS}


def flops_by_module(model: nn.Module, inputs: Union[torch.Tensor, Tuple, Sequence[int]]) -> Dict[str, int]:
    """FLOPs (multiply-adds) of one forward of ``model`` in eval mode, by module name: each name
    counts its own operations and its submodules' ("" is the whole model).

    ``inputs`` is a tensor, a tuple of forward arguments, or an input shape such as (1, 3, 224, 224).
    """
    from fvcore.nn import FlopCountAnalysis

    if isinstance(inputs, (list, tuple)) and all(isinstance(d, int) for d in inputs):
        param = next(model.parameters())
        inputs = torch.zeros(tuple(inputs), dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, inputs).set_op_handle(**flop_handles())
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return dict(analysis.by_module())
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, inputs: Union[torch.Tensor, Tuple, Sequence[int]]) -> int:
    """FLOPs (multiply-adds) of one forward of ``model`` in eval mode (``inputs`` as ``flops_by_module``'s)."""
    return int(flops_by_module(model, inputs)[""])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
