"""Fused layers for CPU inference, and the transform that swaps them in.

``fuse_for_cpu_inference(model)`` replaces, inside the PaCa blocks, the plain ``nn.Linear`` /
``nn.Conv2d`` layers (and the GELU after them) by the modules below.  They hold the same
parameter tensors under the same names (the state_dict is unchanged) and are called as modules,
so hooks still see every layer; the model computes the same function.  What changes:

- ``FusedLinear`` / ``FusedConv2d`` / ``FusedPointwiseConv2d``: oneDNN computes the layer, its
  bias and the following GELU in one kernel as the output is written
  (``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``); PyTorch's plain ops make
  a separate pass for the bias copy and for the activation.  The 1x1 convolution runs as a GEMM
  over the NHWC tokens, and the MLP's depthwise conv folds its identity shortcut into the kernel.
  On the 2-core AVX-512 benchmark machine PaCa-Tiny's fp32 inference efficiency rose from 0.82 to
  0.93 of ConvNeXt-Tiny's with them (``classification/speed_report.sh``, README "Performance").
- ``ChannelMajorLinear`` / ``ChannelMajorConv2d``: the clustering output projection computed as
  ``W @ x^T``, so that the (B, M, N) logits come out contiguous for the softmax over the patches
  (a transposing copy costs more than the GEMM).

The oneDNN kernels have no autograd, and neither tracers nor ``torch.compile`` know them, so a
fused module runs them only for CPU tensors when no gradient is needed, outside tracing, FX,
TorchScript and compilation and CPU autocast, and for a dtype that ``cpu_fusion_support()`` lists
for this CPU (bfloat16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT).  Everywhere else the same module
runs the plain PyTorch ops.  The plain model (without the transform) never calls these kernels.
"""
import functools
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from .attention import PaCaAttention
from .clustering import ConvClustering, LinearClustering, MlpClustering
from .layout import nchw_to_tokens, tokens_to_nchw
from .mlp import ConvMlp


@functools.lru_cache(maxsize=None)
def cpu_fusion_support() -> FrozenSet[torch.dtype]:
    """The dtypes for which this CPU runs the oneDNN fused kernels (empty: none).

    Probed once per process.  ``_is_mkldnn_bf16_supported`` honours ``ONEDNN_MAX_CPU_ISA``; on an
    AVX2-only CPU (e.g. AMD Zen 3) it is False and oneDNN's bfloat16 kernels would fail.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return frozenset()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return frozenset({torch.float32, torch.bfloat16})
    return frozenset({torch.float32})


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a fused module may run its oneDNN kernel on input ``x`` (see the module docstring)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or is_fx_symbolic_tracing() or torch.compiler.is_compiling():
        return False
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in cpu_fusion_support()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    )


def _fusable_act(act: nn.Module) -> bool:
    return type(act) is nn.GELU


def _post_op(act: Optional[nn.Module]) -> Tuple[str, list, str]:
    """oneDNN's (attr, scalars, algorithm) for the activation ``act`` (None: identity)."""
    if act is None:
        return "none", [], ""
    if not _fusable_act(act):
        raise ValueError(f"oneDNN fuses GELU here, not {type(act).__name__}")
    return "gelu", [], act.approximate


class FusedLinear(nn.Module):
    """``act(linear(x))`` with ``act`` None or GELU; oneDNN's fused kernel where it may run."""

    def __init__(self, linear: nn.Linear, act: Optional[nn.Module] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.act = act if act is not None else nn.Identity()
        self.post_op = _post_op(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, *self.post_op)
        return self.act(F.linear(x, self.weight, self.bias))


class FusedConv2d(nn.Module):
    """``act(conv(x) [+ x])`` for a stride-1 conv; ``residual`` folds the identity into the kernel.

    ``x + depthwise_conv(x)`` is one convolution whose kernel has 1 added at its centre tap: the
    same function without a separate pass over the (large) output.
    """

    def __init__(self, conv: nn.Conv2d, act: Optional[nn.Module] = None, residual: bool = False):
        super().__init__()
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or isinstance(conv.padding, str) \
                or conv.padding_mode != "zeros":
            raise ValueError("FusedConv2d takes stride-1, undilated convs with numeric zero padding")
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        centred = all(2 * p + 1 == k for p, k in zip(conv.padding, conv.kernel_size))
        if residual and not (depthwise and centred):
            raise ValueError("the residual fold needs a depthwise conv whose output keeps the input size")
        self.padding, self.groups = list(conv.padding), conv.groups
        self.weight, self.bias = conv.weight, conv.bias
        self.act = act if act is not None else nn.Identity()
        self.post_op = _post_op(act)
        self.residual = residual
        if residual:
            identity = torch.zeros_like(conv.weight)
            identity[:, :, conv.padding[0], conv.padding[1]] = 1.0
            self.register_buffer("identity", identity, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(x, self.weight):
            weight = self.weight + self.identity if self.residual else self.weight
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, [1, 1], [1, 1], self.groups, *self.post_op
            )
        y = F.conv2d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)
        return self.act(y + x if self.residual else y)


class FusedPointwiseConv2d(nn.Module):
    """``act(conv1x1(x))`` computed as a fused linear layer over the NHWC pixels (a faster GEMM
    than a 1x1 convolution, and free of layout copies for a channels_last input)."""

    def __init__(self, conv: nn.Conv2d, act: Optional[nn.Module] = None):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError("FusedPointwiseConv2d takes 1x1 stride-1 convs without groups")
        self.weight, self.bias = conv.weight, conv.bias
        self.act = act if act is not None else nn.Identity()
        self.post_op = _post_op(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(x, self.weight):
            nhwc = torch.ops.mkldnn._linear_pointwise(
                x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias, *self.post_op
            )
            return nhwc.permute(0, 3, 1, 2)
        return self.act(F.conv2d(x, self.weight, self.bias))


def _channel_major_linear(tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, N, C) tokens, (M, C) weight -> contiguous (B, M, N) = linear(tokens)^T."""
    out = torch.matmul(weight, tokens.transpose(1, 2))
    return out if bias is None else out + bias.unsqueeze(-1)


class ChannelMajorLinear(nn.Module):
    """``linear(x)`` for (B, N, C) input, returned as the transpose of a contiguous (B, M, N)
    tensor: same values, but ``.transpose(1, 2)`` of the result is contiguous."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_major_linear(x, self.weight, self.bias).transpose(1, 2)


class ChannelMajorConv2d(nn.Module):
    """A 1x1 conv whose output is contiguous NCHW (for channels_last input too), so that
    ``flatten(2)`` of it is free."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError("ChannelMajorConv2d takes 1x1 stride-1 convs without groups")
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        return _channel_major_linear(nchw_to_tokens(x), self.weight.flatten(1), self.bias).view(B, -1, H, W)


class FusedDWConv(nn.Module):
    """``DWConv`` with its shortcut and the following activation in one ``FusedConv2d``."""

    def __init__(self, conv: FusedConv2d):
        super().__init__()
        self.dwconv = conv

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return nchw_to_tokens(self.dwconv(tokens_to_nchw(x, hw)))


# -- the transform ------------------------------------------------------------------------------
def _fuse_attention(attn: PaCaAttention):
    for name in ("q", "k", "v", "proj"):
        if type(getattr(attn, name)) is nn.Linear:
            setattr(attn, name, FusedLinear(getattr(attn, name)))


def _fuse_mlp(mlp: ConvMlp):
    if type(mlp.fc1) is not nn.Linear:  # already fused
        return
    fuse_act = _fusable_act(mlp.act)
    mlp.fc1 = FusedLinear(mlp.fc1)
    mlp.dwconv = FusedDWConv(FusedConv2d(mlp.dwconv.dwconv, mlp.act if fuse_act else None, residual=True))
    if fuse_act:
        mlp.act = nn.Identity()
    mlp.fc2 = FusedLinear(mlp.fc2)


def _fuse_conv_clustering(clustering: ConvClustering):
    seq = clustering.clustering  # depthwise, act, pointwise, act, to_clusters
    if type(seq[0]) is not nn.Conv2d:
        return
    for i, fused_cls in ((0, FusedConv2d), (2, FusedPointwiseConv2d)):
        fuse_act = _fusable_act(seq[i + 1])
        seq[i] = fused_cls(seq[i], seq[i + 1] if fuse_act else None)
        if fuse_act:
            seq[i + 1] = nn.Identity()
    seq[4] = ChannelMajorConv2d(seq[4])


def _fuse_mlp_clustering(clustering: MlpClustering):
    seq = clustering.clustering  # hidden, act, to_clusters
    if type(seq[0]) is not nn.Linear:
        return
    fuse_act = _fusable_act(seq[1])
    seq[0] = FusedLinear(seq[0], seq[1] if fuse_act else None)
    if fuse_act:
        seq[1] = nn.Identity()
    seq[2] = ChannelMajorLinear(seq[2])


def _fuse_linear_clustering(clustering: LinearClustering):
    if type(clustering.clustering[0]) is nn.Linear:
        clustering.clustering[0] = ChannelMajorLinear(clustering.clustering[0])


# How each module type is fused, in place.  A new fused layer is added here.
FUSERS: Dict[Type[nn.Module], Callable[[nn.Module], None]] = {
    PaCaAttention: _fuse_attention,
    ConvMlp: _fuse_mlp,
    ConvClustering: _fuse_conv_clustering,
    MlpClustering: _fuse_mlp_clustering,
    LinearClustering: _fuse_linear_clustering,
}


def fuse_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap the fused modules into ``model`` (in place) and return it; a no-op when this CPU has
    no oneDNN fused kernels, and when applied twice.  For inference: the fused modules run the
    plain ops when a gradient is needed, so training still works, only without the speed-up.
    """
    if not cpu_fusion_support():
        return model
    for module in list(model.modules()):
        fuse = FUSERS.get(type(module))
        if fuse is not None:
            fuse(module)
    return model
