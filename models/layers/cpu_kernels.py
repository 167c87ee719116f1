"""The project's CPU kernels (``models/csrc``), from Python: bfloat16 ones for CPUs with AVX512-BF16,
and a float32 one for training on CPUs with AVX-512 or AVX2.

- ``attention_bf16``: PaCa's attention, softmax(q k^T / sqrt(D)) v (``bf16_attention.cpp``);
- ``depthwise_conv_bf16``: a depthwise conv with its bias, identity shortcut and GELU in one pass
  (``bf16_depthwise.cpp``);
- ``layer_norm_bf16``: LayerNorm over the channels of each token (``bf16_layer_norm.cpp``);
- ``depthwise_conv_fp32``: the same conv in float32 with autograd, one pass forward and one backward
  (``fp32_depthwise.cpp``).

PyTorch's C++ extension tools compile them once per torch version and Python (about 25 s; ./install.sh
does it) into ``<repo>/.cache/kernels`` (``$PACAVIT_KERNEL_CACHE`` elsewhere), and the library loads
on first use as the operators ``torch.ops.pacavit.*`` (``models/csrc/ops.cpp``).  It builds and loads
on any x86-64 CPU; its AVX512-BF16 (AVX-512, AVX2) code runs only where the CPU has those instructions
(each operator refuses elsewhere).  Where it cannot be built (no C++ compiler, another architecture) the layers keep
PyTorch's and oneDNN's ops, after one warning that says why.  ``fused.fuse_for_cpu`` puts
the kernels in the layers' forwards; each ``takes_*`` says which inputs a kernel handles.

    python tools/build_cpu_kernel.py    builds them now and says whether this CPU runs them
"""
import functools
import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE_DIRECTORY = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("ops.cpp", "bf16_attention.cpp", "bf16_depthwise.cpp", "bf16_layer_norm.cpp", "fp32_depthwise.cpp")
EXTENSION = "pacavit_cpu_kernels"


def build_directory() -> Path:
    """One folder per torch version and Python: the compiled library links against both."""
    root = os.environ.get("PACAVIT_KERNEL_CACHE") or SOURCE_DIRECTORY.parents[1] / ".cache" / "kernels"
    return Path(root) / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def _aten_capability_limit() -> str:
    return os.environ.get("ATEN_CPU_CAPABILITY", "").lower()


def _limited_below_avx512() -> bool:
    """``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) keeps ATen below AVX-512, and the kernels' probes too."""
    return _aten_capability_limit() in ("default", "avx2")


@functools.lru_cache(maxsize=None)
def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has the AVX512-BF16 instructions the kernels use.  Probed once per process.
    ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``), which keeps ATen's own kernels below AVX-512,
    makes it False, as the operator's own probe: a CPU without them, emulated on any host."""
    return not _limited_below_avx512() and bool(torch.cpu.get_capabilities().get("avx512_bf16", False))


def buildable() -> bool:
    """The kernels are x86-64 code for Linux's GCC / Clang."""
    return platform.machine() in ("x86_64", "AMD64") and sys.platform.startswith("linux")


def _cause(error: Exception) -> str:
    """The line of a build error that names its cause (the compiler's error, a missing program),
    not the echoed compile command."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("Error building extension", "FAILED:", "ninja:", "["))
              and ("error" in line.lower() or "not found" in line)]
    return (causes or lines or [type(error).__name__])[0][:300]


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Compile the kernels unless they are built for this torch already, and load them: True when
    the ``torch.ops.pacavit`` operators are there, False (with one warning) when they cannot be built."""
    if hasattr(torch.ops.pacavit, "layer_norm_bf16"):  # loaded already: a second copy could not register
        return True
    # torch's extension tools log that they found no CUDA at import: true, and not this build's concern
    logging.getLogger("torch.utils.cpp_extension").addFilter(lambda rec: "No CUDA runtime" not in rec.getMessage())
    from torch.utils import cpp_extension  # imports setuptools: only when the kernels are wanted

    folder = build_directory()
    try:
        if not buildable():
            raise RuntimeError(f"it is x86-64 Linux code and this is {platform.machine()} {sys.platform}")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{EXTENSION}.so").exists():
            print(f"building the bfloat16 CPU kernels in {folder} (once per torch version, about 25 s)",
                  file=sys.stderr, flush=True)
        # the library links torch's own OpenMP through the process that loads it (no -fopenmp at link
        # time, which could bring a second OpenMP runtime)
        cpp_extension.load(name=EXTENSION, sources=[str(SOURCE_DIRECTORY / name) for name in SOURCES],
                           extra_cflags=["-O3", "-fopenmp"], build_directory=str(folder), is_python_module=False,
                           verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure leaves the PyTorch ops, which work
        reason = _cause(error)
        warnings.warn(f"the bfloat16 CPU kernels could not be built in {folder} ({reason}); bfloat16 "
                      "layers run on PyTorch's and oneDNN's ops, slower: install g++ and ninja, then "
                      "`python tools/build_cpu_kernel.py`", RuntimeWarning, stacklevel=2)
        return False
    return True


def available() -> bool:
    """Whether the kernels can run here: the CPU has AVX512-BF16 and they are built."""
    return cpu_has_avx512_bf16() and load()


def takes_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attention_bf16`` takes these bfloat16 CPU tensors: an even number of channels per head
    (it reads them in pairs), each token's channels contiguous (as in head views of projections)."""
    return q.shape[-1] % 2 == 0 and all(t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for bfloat16 (B, heads, N, D) queries and (B, heads, M, D) keys and
    values on the CPU (D even, each token's channels contiguous).  The result's memory is (B, N, heads,
    D), so that ``out.transpose(1, 2).reshape(B, N, heads * D)`` copies nothing."""
    return torch.ops.pacavit.attention_bf16(q, k, v, q.shape[-1] ** -0.5)


def takes_depthwise_conv(x: torch.Tensor, conv_weight: torch.Tensor) -> bool:
    """Whether ``depthwise_conv_bf16`` takes this bfloat16 CPU input and (C, 1, K, K) weight: channels_last
    memory, a multiple of 32 channels, K = 3, 5 or 7 (the caller checks stride 1 and "same" padding)."""
    C = x.shape[1] if x.dim() == 4 else 0
    return (C % 32 == 0 and C > 0 and x.is_contiguous(memory_format=torch.channels_last)
            and tuple(conv_weight.shape) in {(C, 1, k, k) for k in (3, 5, 7)})


def depthwise_conv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                        gelu: bool) -> torch.Tensor:
    """``act(conv(x) + bias [+ x])`` for a depthwise K x K conv with stride 1 and padding K // 2: a
    channels_last bfloat16 (B, C, H, W) ``x`` in, the same shape and memory out; ``act`` is the exact
    (erf) GELU or nothing.  The weight and bias may be float32 or bfloat16; the sums are float32."""
    return torch.ops.pacavit.depthwise_conv_bf16(x, weight, bias, residual, gelu)


def takes_layer_norm(x: torch.Tensor) -> bool:
    """Whether ``layer_norm_bf16`` takes this bfloat16 CPU input: contiguous, a multiple of 32 channels."""
    return x.dim() >= 1 and x.shape[-1] % 32 == 0 and x.shape[-1] > 0 and x.is_contiguous()


def layer_norm_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension of a contiguous bfloat16 ``x``, in float32 inside."""
    return torch.ops.pacavit.layer_norm_bf16(x, weight, bias, eps)


@functools.lru_cache(maxsize=None)
def float32_instruction_set() -> Optional[str]:
    """The instruction set of the float32 kernel on this CPU, as its operator's own probe: "avx512" where
    the CPU has AVX512F, else "avx2" where it has AVX2 and FMA (AMD Zen 3, older Intel), else None.
    ``ATEN_CPU_CAPABILITY=avx2`` makes it "avx2" (AVX-512 CPUs emulate AVX2-only ones) and ``=default``
    None, as for ATen's own kernels.  Probed once per process."""
    capabilities = torch.cpu.get_capabilities()
    if _aten_capability_limit() == "default" or not (capabilities.get("avx2") and capabilities.get("fma3")):
        return None
    return "avx512" if capabilities.get("avx512_f") and not _limited_below_avx512() else "avx2"


def float32_available() -> bool:
    """Whether the float32 training kernel can run here: the CPU has AVX-512 or AVX2, and the kernels are built."""
    return float32_instruction_set() is not None and load()


def takes_depthwise_conv_fp32(x: torch.Tensor, conv_weight: torch.Tensor) -> bool:
    """Whether ``depthwise_conv_fp32`` takes this float32 CPU input and (C, 1, K, K) weight: channels_last
    memory, a multiple of 16 channels, K = 3, 5 or 7 (the caller checks stride 1 and "same" padding)."""
    C = x.shape[1] if x.dim() == 4 else 0
    return (C % 16 == 0 and C > 0 and x.dtype == conv_weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last)
            and tuple(conv_weight.shape) in {(C, 1, k, k) for k in (3, 5, 7)})


class _DepthwiseConvFp32(torch.autograd.Function):
    """The float32 kernel's forward, and its backward that recomputes the GELU's input from ``x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual: bool, gelu: bool):
        ctx.save_for_backward(x, weight, bias)
        ctx.flags = (residual, gelu)
        return torch.ops.pacavit.depthwise_conv_fp32(x, weight, bias, residual, gelu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.pacavit.depthwise_conv_fp32_backward(
            grad_y, x, weight, bias, *ctx.flags)
        return grad_x, grad_weight, None if bias is None else grad_bias, None, None


def depthwise_conv_fp32(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                        gelu: bool) -> torch.Tensor:
    """``act(conv(x) + bias [+ x])`` as ``depthwise_conv_bf16``, in float32 and differentiable: one pass
    forward, one backward, where PyTorch's ops make a pass for the conv, the shortcut and the GELU each way
    and keep the GELU's input for the backward."""
    return _DepthwiseConvFp32.apply(x, weight, bias, residual, gelu)
