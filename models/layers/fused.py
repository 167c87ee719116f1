"""Fused CPU layers (for inference, and float32 training of the depthwise convs) and the transform that swaps them in.

``fuse_for_cpu(model)`` replaces, inside the PaCa stages, the plain ``nn.Linear`` /
``nn.Conv2d`` layers (and the GELU after them), and the stages themselves, by the modules below.
They hold the same parameter tensors under the same names (the state_dict is unchanged) and are
called as modules; the model computes the same function.  Hooks registered after the transform
fire on every fused layer (it refuses a model whose replaced layers already have hooks, which would
stop firing).  A layer with its GELU folded in returns the activated values, and an ``nn.Identity``
takes the GELU's place (as ``torch.ao.quantization.fuse_modules`` does); the MLP's depthwise conv
returns ``x + conv(x)``: hooks that need each plain layer's own output belong on the plain model.
What changes:

- ``FusedLinear`` / ``FusedConv2d`` / ``FusedPointwiseConv2d``: oneDNN computes the layer, its
  bias and the following GELU in one kernel as the output is written
  (``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``); PyTorch's plain ops make
  a separate pass for the bias copy and for the activation.  The 1x1 convolution runs as a GEMM
  over the NHWC tokens, and the MLP's depthwise conv folds its identity shortcut into the kernel.
  oneDNN's fp32 GEMMs use AVX-512 where the CPU has it (PyTorch's MKL runs its AVX2 kernel on AMD
  CPUs, seen on Zen 5).
- ``ChannelMajorLinear`` / ``ChannelMajorConv2d``: the clustering output projection computed as
  ``W @ x^T``, so that the (B, M, N) logits come out contiguous for the softmax over the patches
  (a transposing copy costs more than the GEMM).
- ``BFloat16CpuAttention``: in bfloat16, the patch-to-cluster attention the way this CPU runs it
  fastest: PyTorch's fused CPU attention kernel with AMX, this project's kernel with AVX512-BF16
  (``cpu_kernels``), two batched matmuls elsewhere (see the class).
- ``FusedConv2d`` (depthwise) and ``BFloat16CpuLayerNorm``: in bfloat16 on a CPU with AVX512-BF16,
  this project's kernels (``cpu_kernels``): the depthwise conv with its bias, shortcut and GELU in
  one pass, and the LayerNorm, both computing in float32 inside.
- ``FusedConv2d`` (depthwise) in float32 training on a CPU with AVX-512 or AVX2: the project's differentiable
  kernel (``cpu_kernels.depthwise_conv_fp32``), conv, bias, shortcut and GELU in one pass forward and
  one backward, where PyTorch makes a pass for each, both ways.  The other fused layers run the plain
  ops where a gradient is needed.
- On a CPU where oneDNN runs AVX2 code only (``onednn_runs_avx512``: AMD Zen 3, older Intel), the
  float32 GEMM layers run MKL's GEMM (``F.linear``) with a separate GELU, and the depthwise convs the
  project's kernel, at inference too: oneDNN's AVX2 kernels were the slower ones there.
- ``BatchChunkedStage``: a stage runs its blocks on groups of images, whose activations then stay
  in the CPU caches and small enough for glibc's malloc to reuse them instead of page-faulting
  them afresh on every call (see the class).  This does not depend on the instruction set.

What the transform gains, plain -> fused, with the host and the command that measured it:
``classification/PERFORMANCE.md`` (``classification/speed_report.sh``).

The oneDNN kernels and the project's bfloat16 kernels have no autograd, and neither tracers nor
``torch.compile`` know any of them, so a fused module runs them only for CPU tensors when no
gradient is needed, outside tracing, FX, TorchScript (a scripted fused model runs the plain ops) and
compilation, and for a dtype that ``cpu_fusion_support()`` lists for this CPU (bfloat16 needs
AVX-512 BW/VL/DQ or AVX-NE-CONVERT); the float32 depthwise kernel runs only where a gradient is
needed, outside autocast, under the same other conditions.  Everywhere else the same module runs the
plain PyTorch ops.  The plain model (without the transform) never calls these kernels.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a fused module computes in bfloat16 as
autocast's linear / conv would (bfloat16 output), but from a bfloat16 copy of its weight and bias
that it keeps between calls, where autocast casts the float32 weight again on every call.  The copy
is made again when the parameter changes: an in-place update (optimizer step, ``load_state_dict``)
moves its version counter, ``.to()`` / ``.data =`` give it new storage, and ``load_state_dict`` drops
the copy.  A write through ``.data`` (``p.data.copy_(...)``) is invisible to both, and so is an
in-place update of a parameter made under ``torch.inference_mode`` (it has no version counter);
after one, call ``model.apply(fused.drop_weight_caches)``.
"""
import functools
import os
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from . import cpu_kernels
from .attention import PaCaAttention
from .clustering import ConvClustering, LinearClustering, MlpClustering
from .layout import nchw_to_tokens, tokens_to_nchw
from .mlp import ConvMlp, DWConv
from .stage import PaCaStage


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


@functools.lru_cache(maxsize=None)
def onednn_runs_avx512() -> bool:
    """Whether oneDNN's float32 kernels run AVX-512 code here: the CPU has AVX512F and
    ``ONEDNN_MAX_CPU_ISA`` does not keep oneDNN below it.  Where they run AVX2 code only (AMD Zen 3,
    older Intel), MKL's GEMM (``F.linear``) and the project's depthwise kernel beat oneDNN's fused
    ones (``classification/PERFORMANCE.md``), so the fused layers run those in float32.  Probed once
    per process."""
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    below = limit != "ALL" and not limit.startswith(("AVX512", "AVX10"))
    return bool(torch.cpu.get_capabilities().get("avx512_f")) and not below


def _onednn_gemm(dtype: Optional[torch.dtype]) -> bool:
    """Whether a fused GEMM layer computing in ``dtype`` (None: the plain ops) runs oneDNN's kernel:
    in bfloat16, and in float32 where oneDNN has AVX-512 (``onednn_runs_avx512``)."""
    return dtype is not None and (dtype != torch.float32 or onednn_runs_avx512())


@functools.lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (Intel Sapphire Rapids and later), with which
    PyTorch's fused CPU attention kernel computes its bfloat16 GEMMs.  Probed once per process."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def _eager() -> bool:
    """Not under TorchScript, tracing, FX or compilation, which know none of the tricks here."""
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_fx_symbolic_tracing()
                or torch.compiler.is_compiling())


def _needs_gradient(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def kernel_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype in which a fused module runs its oneDNN kernel on input ``x``: CPU autocast's
    dtype when it is on, else that of ``x`` and ``weight``; None: the plain ops (see the module
    docstring)."""
    if not _eager() or x.device.type != "cpu":
        return None
    if _needs_gradient(x, weight):
        return None
    if torch.is_autocast_enabled("cpu"):
        # autocast leaves float64 alone, and so do we
        dtype = torch.get_autocast_dtype("cpu") if weight.dtype != torch.float64 else None
    else:
        dtype = x.dtype if x.dtype == weight.dtype else None
    return dtype if dtype in cpu_fusion_support() else None


class WeightCache(nn.Module):
    """Base of the fused modules: ``weight`` / ``bias`` as the kernel takes them, in a given dtype,
    kept while the parameters are unchanged (see the module docstring)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    def __init__(self):
        super().__init__()
        self._cached: Optional[tuple] = None

    def kernel_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the kernel takes it (subclasses fold or reshape it)."""
        return weight

    def _fingerprint(self) -> tuple:
        # the cache keeps a reference to each source tensor, so its storage cannot be freed and
        # reused under the same address; the version counter sees in-place updates (parameters
        # made under inference_mode, e.g. by .to() there, have none: as with .data writes)
        return tuple(None if t is None else (t.data_ptr(), 0 if t.is_inference() else t._version)
                     for t in (self.weight, self.bias))

    # oneDNN's linear kernel takes the bfloat16 weight in its own blocked layout (an opaque tensor),
    # which saves it a reorder per call (PaCa-Tiny's bf16 GEMM layers: 99.7 ms against 107.7 on Zen 4)
    packs_bf16_linear_weight = False

    def kernel_weights(self, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        key = (dtype, self._fingerprint())
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                weight = self.kernel_weight(self.weight).to(dtype).contiguous()
                if dtype == torch.bfloat16 and self.packs_bf16_linear_weight:
                    weight = torch.ops.mkldnn._reorder_linear_weight(weight)
                bias = None if self.bias is None else self.bias.to(dtype)
            self._cached = (key, weight, bias, (self.weight, self.bias))
        return self._cached[1], self._cached[2]

    def __getstate__(self):
        # the kept copy is derived, and a packed weight can be neither copied nor pickled
        return {**self.__dict__, "_cached": None}

    def weights_for(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kept weights where the kernels may run (under autocast: no cast per call), else the
        parameters themselves (autograd, tracing, TorchScript)."""
        if not torch.jit.is_scripting():
            dtype = kernel_dtype(x, self.weight)
            if dtype is not None:
                return self.kernel_weights(dtype)
        return self.kernel_weight(self.weight), self.bias

    def _load_from_state_dict(self, *args, **kwargs):
        # parameters made under inference_mode have no version counter to show the in-place copy
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)


def drop_weight_caches(module: nn.Module) -> None:
    """``model.apply(drop_weight_caches)``: forget the kept kernel weights (after ``p.data`` writes)."""
    if isinstance(module, WeightCache):
        module._cached = None


def _fusable_act(act: nn.Module) -> bool:
    return type(act) is nn.GELU


def _post_op(act: Optional[nn.Module]) -> Tuple[str, list, str]:
    """oneDNN's (attr, scalars, algorithm) for the activation ``act`` (None: identity)."""
    if act is None:
        return "none", [], ""
    if not _fusable_act(act):
        raise ValueError(f"oneDNN fuses GELU here, not {type(act).__name__}")
    return "gelu", [], act.approximate


class FusedLinear(WeightCache):
    """``act(linear(x))`` with ``act`` None or GELU; oneDNN's fused kernel where it may run."""

    packs_bf16_linear_weight = True

    def __init__(self, linear: nn.Linear, act: Optional[nn.Module] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.act = act if act is not None else nn.Identity()
        self.post_op = _post_op(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            dtype = kernel_dtype(x, self.weight)
            if _onednn_gemm(dtype):
                return torch.ops.mkldnn._linear_pointwise(x.to(dtype), *self.kernel_weights(dtype), *self.post_op)
        return self.act(F.linear(x, self.weight, self.bias))


class FusedConv2d(WeightCache):
    """``act(conv(x) [+ x])`` for a stride-1 conv; ``residual`` folds the identity into the kernel.

    ``x + depthwise_conv(x)`` is one convolution whose kernel has 1 added at its centre tap: the
    same function without a separate pass over the (large) output.  A depthwise conv in bfloat16 runs
    the project's kernel where it can (``cpu_kernels.depthwise_conv_bf16``: PaCa-Tiny's depthwise
    convs took 22.5 ms of a bf16 batch-8 forward against 28.4 with oneDNN's, ``layer_times.py``, 2
    Zen 4 threads), else oneDNN's; in float32 it runs the project's differentiable kernel
    (``cpu_kernels.depthwise_conv_fp32``) where a gradient is needed, and also without one where
    oneDNN has no AVX-512.
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
        # the project's kernels: "same" padding, and the exact GELU or none
        self.own_kernel_fits = depthwise and centred and self.post_op in (("none", [], ""), ("gelu", [], "none"))
        if residual:
            identity = torch.zeros_like(conv.weight)
            identity[:, :, conv.padding[0], conv.padding[1]] = 1.0
            self.register_buffer("identity", identity, persistent=False)

    def kernel_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.identity if self.residual else weight

    def runs_own_float32_kernel(self, x: torch.Tensor) -> bool:
        """Whether a float32 forward runs the project's kernel (``fp32_depthwise.cpp``): where a gradient is
        needed, and without one where oneDNN has no AVX-512 (``onednn_runs_avx512``)."""
        return (self.own_kernel_fits and _eager() and x.device.type == "cpu"
                and (_needs_gradient(x, self.weight) or not onednn_runs_avx512())
                and not torch.is_autocast_enabled("cpu")
                and (self.bias is None or self.bias.dtype == torch.float32)
                and cpu_kernels.takes_depthwise_conv_fp32(x, self.weight) and cpu_kernels.float32_available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.runs_own_float32_kernel(x):
                return cpu_kernels.depthwise_conv_fp32(x, self.weight, self.bias, self.residual,
                                                       gelu=self.post_op[0] == "gelu")
            dtype = kernel_dtype(x, self.weight)
            if dtype is not None:
                x = x.to(dtype)
                fits = self.own_kernel_fits and cpu_kernels.takes_depthwise_conv(x, self.weight)
                if dtype == torch.bfloat16 and fits and cpu_kernels.available():
                    # float32 weights inside: 1 + w at the centre tap stays exact
                    return cpu_kernels.depthwise_conv_bf16(x, self.weight, self.bias, self.residual,
                                                           gelu=self.post_op[0] == "gelu")
                weight, bias = self.kernel_weights(dtype)
                return torch.ops.mkldnn._convolution_pointwise(
                    x, weight, bias, self.padding, [1, 1], [1, 1], self.groups, *self.post_op
                )
        y = F.conv2d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)
        return self.act(y + x if self.residual else y)


class FusedPointwiseConv2d(WeightCache):
    """``act(conv1x1(x))`` computed as a fused linear layer over the NHWC pixels (a faster GEMM
    than a 1x1 convolution, and free of layout copies for a channels_last input)."""

    packs_bf16_linear_weight = True

    def __init__(self, conv: nn.Conv2d, act: Optional[nn.Module] = None):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError("FusedPointwiseConv2d takes 1x1 stride-1 convs without groups")
        self.weight, self.bias = conv.weight, conv.bias
        self.act = act if act is not None else nn.Identity()
        self.post_op = _post_op(act)

    def kernel_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            dtype = kernel_dtype(x, self.weight)
            if dtype is not None:
                nhwc = x.to(dtype).permute(0, 2, 3, 1)
                if _onednn_gemm(dtype):
                    nhwc = torch.ops.mkldnn._linear_pointwise(nhwc, *self.kernel_weights(dtype), *self.post_op)
                else:
                    nhwc = self.act(F.linear(nhwc, self.weight.flatten(1), self.bias))
                return nhwc.permute(0, 3, 1, 2)
        return self.act(F.conv2d(x, self.weight, self.bias))


def _channel_major_linear(tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, N, C) tokens, (M, C) weight -> contiguous (B, M, N) = linear(tokens)^T."""
    # bmm, not matmul: for a 2-D weight matmul computes tokens @ weight^T and copies its transpose
    out = torch.bmm(weight.expand(tokens.shape[0], -1, -1), tokens.transpose(1, 2))
    return out if bias is None else out + bias.unsqueeze(-1)


class ChannelMajorLinear(WeightCache):
    """``linear(x)`` for (B, N, C) input, returned as the transpose of a contiguous (B, M, N)
    tensor: same values, but ``.transpose(1, 2)`` of the result is contiguous.  Where a gradient is
    needed, the plain linear layer (its backward is faster than the batched matmul's)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_gradient(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.weights_for(x)
        return _channel_major_linear(x, weight, bias).transpose(1, 2)


class ChannelMajorConv2d(WeightCache):
    """A 1x1 conv whose output is contiguous NCHW (for channels_last input too), so that
    ``flatten(2)`` of it is free.  Where a gradient is needed, the plain conv (as ``ChannelMajorLinear``)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError("ChannelMajorConv2d takes 1x1 stride-1 convs without groups")
        self.weight, self.bias = conv.weight, conv.bias

    def kernel_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_gradient(x, self.weight):
            return F.conv2d(x, self.weight, self.bias)
        B, _, H, W = x.shape
        weight, bias = self.weights_for(x)
        return _channel_major_linear(nchw_to_tokens(x), weight, bias).view(B, -1, H, W)


class FusedDWConv(nn.Module):
    """``DWConv`` with its shortcut and the following activation in one ``FusedConv2d``."""

    def __init__(self, conv: FusedConv2d):
        super().__init__()
        self.dwconv = conv

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return nchw_to_tokens(self.dwconv(tokens_to_nchw(x, hw)))


class BFloat16CpuLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward, for a bfloat16 model's contiguous tokens on a CPU with
    AVX512-BF16, runs the project's kernel (``cpu_kernels.layer_norm_bf16``: statistics in float32;
    PaCa-Tiny's LayerNorms took 6.3 ms of a bf16 batch-8 forward against PyTorch's 11.9, 2 Zen 4
    threads).  Elsewhere, and under autocast (which returns LayerNorm outputs in float32), the
    plain op.  The transform swaps the class of each ``nn.LayerNorm`` in place: same module,
    parameters and hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if (kernel_dtype(x, self.weight) == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
                    and self.bias is not None and len(self.normalized_shape) == 1
                    and cpu_kernels.takes_layer_norm(x) and cpu_kernels.available()):
                return cpu_kernels.layer_norm_bf16(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _watched(module: nn.Module) -> bool:
    """Whether a forward hook sees ``module`` or a layer in it (``capture_maps``, feature hooks)."""
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    return bool(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class BFloat16CpuAttention(PaCaAttention):
    """``PaCaAttention`` whose attention, in bfloat16 on the CPU at inference, runs the fastest of
    three equivalent ways for this CPU, which ``cpu_has_amx_bf16()`` and
    ``cpu_kernels.cpu_has_avx512_bf16()`` tell apart:

    - with AMX, PyTorch's fused CPU attention kernel, whose AMX GEMMs work on blocks of queries
      whose scores stay in the caches: PaCa-Tiny's attention took 23 ms of a 93-ms batch-8 forward,
      against 30 of 99 ms with the matmuls below (``classification/layer_times.py --precision
      bf16``, 2 threads of an Intel Xeon VM with AMX);
    - with AVX512-BF16 but no AMX (AMD Zen 4 and 5), this project's kernel
      (``models/csrc/bf16_attention.cpp``): the scores of a block of queries stay in float32 in the
      L1 cache, and the output goes straight to the (B, N, C) layout the projection reads.  PaCa-Tiny's
      attention's own ops took 28.7 of a 206.7-ms forward against 48.1 of 238.1 ms with the matmuls
      (Zen 4, 2 threads, ``layer_times.py --precision bf16``); where the kernel cannot be built the
      matmuls run;
    - otherwise two batched matmuls around a softmax (PyTorch's fused kernel ran 1.3-2x slower on
      Zen 4 and 5).  The scores are formed as (keys, queries), so the softmax over the M keys runs
      down the columns, vectorised over the many queries, where along rows of only M = 100 values
      it took about 1.4x longer on Zen 5."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if dropout_p == 0.0 and kernel_dtype(q, self.q.weight) == torch.bfloat16:
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
                if not cpu_has_amx_bf16():
                    if cpu_kernels.takes_attention(q, k, v) and cpu_kernels.available():
                        return cpu_kernels.attention_bf16(q, k, v)
                    scores_t = (k * k.shape[-1] ** -0.5) @ q.transpose(-2, -1)  # (B, heads, M, N)
                    return (v.transpose(-2, -1) @ scores_t.softmax(dim=-2)).transpose(-2, -1)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


# glibc's malloc serves blocks below its largest mmap threshold (32 MiB on 64-bit) from its heap,
# which it reuses; it maps every larger block afresh and unmaps it on free, paying a page fault per
# 4 kB each time
MMAP_THRESHOLD_MAX = 32 * 2**20


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype in which the layers compute on ``x``: CPU autocast's where it is on."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class BatchChunkedStage(PaCaStage):
    """A ``PaCaStage`` that, at inference, runs its blocks on groups of images in turn.

    The images are independent, so the output is the same.  But a group's activations, above
    all the MLP's 4x wider hidden layer (4.8 MB per 224x224 image in stage 1), stay in the CPU
    caches from one layer to the next, and no tensor gets so large that glibc's malloc maps it
    from the operating system and unmaps it again on every call, paying a page fault per 4 kB.

    The group size (at least one image; groups of nearly equal size):
    - float32: about 1024 tokens per intra-op thread.  Groups whose blocks merely stayed below
      the mmap threshold (4 images in stage 1) ran 18% slower with glibc's default settings;
    - bfloat16 (a bfloat16 input, or CPU autocast to bfloat16): as many images as keep the
      stage's largest activation (the MLP's hidden layer, or the attention scores) below glibc's
      largest mmap threshold; this ran 7-11% faster than 2048 tokens per thread with the memory
      kept, and within 2% of it with glibc's defaults (PaCa-Tiny, batch 8, 2 Zen 5 threads);
    - ``tokens_per_group`` (default None) sets it in tokens instead.

    The whole batch goes through at once off the CPU, where a gradient is needed, under tracing,
    scripting and compilation, and while a forward hook watches the stage or a layer in it: hooks
    (``capture_maps``) see the batch that the plain model passes.
    """

    def __init__(self, stage: PaCaStage, tokens_per_group: Optional[int] = None):
        super().__init__(list(stage))
        self.grad_checkpointing = stage.grad_checkpointing
        self.tokens_per_group = tokens_per_group

    def widest_activation(self, tokens_per_image: int) -> int:
        """Channels per token of the stage's largest activation: the MLP's hidden layer, or the
        attention scores (heads x keys: the clusters, or the patches where there are none)."""
        return max([blk.mlp.fc1.out_features for blk in self]
                   + [blk.attn.num_heads * (blk.attn.num_clusters or tokens_per_image) for blk in self])

    def group_size(self, batch: int, tokens_per_image: int, dtype: torch.dtype = torch.float32) -> int:
        if self.tokens_per_group:
            largest = self.tokens_per_group // tokens_per_image
        elif dtype == torch.bfloat16:
            image_bytes = tokens_per_image * self.widest_activation(tokens_per_image) * dtype.itemsize
            largest = (MMAP_THRESHOLD_MAX - 1) // image_bytes
        else:
            largest = 1024 * torch.get_num_threads() // tokens_per_image
        groups = -(-batch // max(1, largest))
        return -(-batch // groups)  # 8 images by at most 6 make 4 + 4, not 6 + 2

    def forward(
        self, x: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None, shortcut: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.runs_in_groups(x):
                return self.run_in_groups(x, teacher_logits, shortcut)
        return self.run_blocks(x, teacher_logits, shortcut)

    def runs_in_groups(self, x: torch.Tensor) -> bool:
        if not _eager() or not len(self) or x.device.type != "cpu" or _watched(self):
            return False
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return not needs_grad and self.group_size(x.shape[0], x.shape[1] * x.shape[2], compute_dtype(x)) < x.shape[0]

    def run_in_groups(
        self, x: torch.Tensor, teacher_logits: Optional[torch.Tensor], shortcut: Optional[torch.Tensor]
    ) -> torch.Tensor:
        group = self.group_size(x.shape[0], x.shape[1] * x.shape[2], compute_dtype(x))
        parts = [
            self.run_blocks(
                x[i : i + group],
                None if teacher_logits is None else teacher_logits[i : i + group],
                None if shortcut is None else shortcut[i : i + group],
            )
            for i in range(0, x.shape[0], group)
        ]
        return torch.cat(parts)


# -- the transform ------------------------------------------------------------------------------
def _fuse_attention(attn: PaCaAttention):
    for name in ("q", "k", "v", "proj"):
        if type(getattr(attn, name)) is nn.Linear:
            setattr(attn, name, FusedLinear(getattr(attn, name)))
    # it only adds a method: the module keeps its identity, parameters and hooks
    attn.__class__ = BFloat16CpuAttention


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
    seq = clustering.clustering  # depthwise, act, pointwise, act, output layer
    if type(seq[0]) is not nn.Conv2d:
        return
    for i, fused_cls in ((0, FusedConv2d), (2, FusedPointwiseConv2d)):
        fuse_act = _fusable_act(seq[i + 1])
        seq[i] = fused_cls(seq[i], seq[i + 1] if fuse_act else None)
        if fuse_act:
            seq[i + 1] = nn.Identity()
    clustering.replace_output_layer(ChannelMajorConv2d(clustering.output_layer))


def _fuse_mlp_clustering(clustering: MlpClustering):
    seq = clustering.clustering  # hidden, act, output layer
    if type(seq[0]) is not nn.Linear:
        return
    fuse_act = _fusable_act(seq[1])
    seq[0] = FusedLinear(seq[0], seq[1] if fuse_act else None)
    if fuse_act:
        seq[1] = nn.Identity()
    clustering.replace_output_layer(ChannelMajorLinear(clustering.output_layer))


def _fuse_layer_norm(norm: nn.LayerNorm):
    # it only replaces the forward: the module keeps its identity, parameters and hooks
    if norm.weight is not None:
        norm.__class__ = BFloat16CpuLayerNorm


def _fuse_linear_clustering(clustering: LinearClustering):
    if type(clustering.output_layer) is nn.Linear:
        clustering.replace_output_layer(ChannelMajorLinear(clustering.output_layer))


# How each module type is fused, in place.  A new fused layer is added here.
FUSERS: Dict[Type[nn.Module], Callable[[nn.Module], None]] = {
    PaCaAttention: _fuse_attention,
    ConvMlp: _fuse_mlp,
    ConvClustering: _fuse_conv_clustering,
    MlpClustering: _fuse_mlp_clustering,
    LinearClustering: _fuse_linear_clustering,
    nn.LayerNorm: _fuse_layer_norm,
}


# the layers that the transform replaces by fused modules (the blocks, attention, MLP and
# clustering modules keep their identity)
REPLACED_TYPES = (nn.Linear, nn.Conv2d, nn.GELU, DWConv, PaCaStage)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def _refuse_hooks_on_replaced_layers(model: nn.Module) -> None:
    """A hook on a layer that the transform replaces would silently stop firing: say so first."""
    hooked = set()
    for stage_name, stage in model.named_modules():
        if type(stage) is PaCaStage:
            hooked.update(f"{stage_name}.{name}".rstrip(".") for name, module in stage.named_modules()
                          if type(module) in REPLACED_TYPES and _has_hooks(module))
    if hooked:
        raise ValueError(
            f"fuse_for_cpu replaces layers that have hooks, which would stop firing: "
            f"{', '.join(sorted(hooked))}. Register the hooks after fusing, or keep the plain model"
        )


def fuse_for_cpu(model: nn.Module) -> nn.Module:
    """Swap the fused modules into ``model`` (in place) and return it; a no-op when this CPU has
    no oneDNN fused kernels, and when applied twice.  Made for inference; a fused model also trains
    (the same gradients as the plain model's), with the depthwise convs on the float32 training
    kernel where the CPU has AVX-512 or AVX2 and the plain ops for the rest.
    """
    if not cpu_fusion_support():
        return model
    _refuse_hooks_on_replaced_layers(model)
    for module in list(model.modules()):
        fuse = FUSERS.get(type(module))
        if fuse is not None:
            fuse(module)
        for name, child in module.named_children():
            if type(child) is PaCaStage:
                setattr(module, name, BatchChunkedStage(child))
    return model
