"""Linear and convolution layers fused with their activation, for CPU inference.

PyTorch runs ``gelu(conv(x))`` as two passes over the output and a biased ``linear`` as a copy
of the bias into the output followed by the GEMM.  oneDNN does each in one kernel, with the
bias and activation applied as the output is written.  On the 2-core benchmark machine this
makes PaCa-Tiny's inference 12% faster and Small/Base 7-10% (fp32, batch 8, 224; measured by
``classification/speed_report.sh``, see the README's Performance section).

The fused kernels have no autograd, and neither ``torch.compile`` nor the FLOP counter's tracer
knows them, so they are used only when no gradient is needed, outside tracing and compilation,
for float32 / bfloat16 CPU tensors; everywhere else the plain PyTorch ops compute the same
function.  ``fused_kernels(False)`` turns them off.
"""
import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_enabled = _available()


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Use (or not) the oneDNN fused kernels inside this context."""
    global _enabled
    previous, _enabled = _enabled, enabled and _available()
    try:
        yield
    finally:
        _enabled = previous


def _post_op(act: Optional[nn.Module]):
    """oneDNN's (attr, scalars, algorithm) for ``act``, or None when oneDNN cannot fuse it."""
    if act is None:
        return "none", [], ""
    if type(act) is nn.GELU:
        return "gelu", [], act.approximate
    return None


def _can_fuse(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)))
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def linear_act(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))``; ``act=None`` is the identity."""
    post_op = _post_op(act)
    if post_op is not None and _can_fuse(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *post_op)
    y = F.linear(x, weight, bias)
    return y if act is None else act(y)


def conv_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    padding: Sequence[int],
    groups: int,
    act: Optional[nn.Module] = None,
) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, padding=padding, groups=groups))`` with stride 1."""
    post_op = _post_op(act)
    if post_op is not None and _can_fuse(x, weight, bias):
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(padding), [1, 1], [1, 1], groups, *post_op
        )
    y = F.conv2d(x, weight, bias, padding=tuple(padding), groups=groups)
    return y if act is None else act(y)
