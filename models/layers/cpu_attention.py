"""The bfloat16 attention kernel for CPUs with AVX512-BF16 (``models/csrc/bf16_attention.cpp``).

PyTorch's C++ extension tools compile it once per torch version and Python (about 15 s; ./install.sh
does it) into ``<repo>/.cache/kernels`` (``$PACAVIT_KERNEL_CACHE`` elsewhere), and it loads on first
use as the operator ``torch.ops.pacavit.attention_bf16``.  The library builds and loads on any
x86-64 CPU; its AVX512-BF16 code runs only where the CPU has those instructions (the operator
refuses elsewhere).  Where it cannot be built (no C++ compiler, another architecture) the attention
keeps PyTorch's ops, after one warning that says why.

    python tools/build_cpu_kernel.py    builds it now and says whether this CPU runs it
"""
import functools
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "bf16_attention.cpp"
EXTENSION = "pacavit_bf16_attention"


def build_directory() -> Path:
    """One folder per torch version and Python: the compiled library links against both."""
    root = os.environ.get("PACAVIT_KERNEL_CACHE") or SOURCE.parents[2] / ".cache" / "kernels"
    return Path(root) / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


@functools.lru_cache(maxsize=None)
def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has the AVX512-BF16 instructions the kernel uses.  Probed once per process.
    ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``), which keeps ATen's own kernels below AVX-512,
    makes it False, as the operator's own probe: a CPU without them, emulated on any host."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        return False
    return bool(torch.cpu.get_capabilities().get("avx512_bf16", False))


def buildable() -> bool:
    """The kernel is x86-64 code for Linux's GCC / Clang."""
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
    """Compile the kernel unless it is built for this torch already, and load it: True when
    ``torch.ops.pacavit.attention_bf16`` is there, False (with one warning) when it cannot be built."""
    if hasattr(torch.ops.pacavit, "attention_bf16"):  # loaded already: a second copy could not register
        return True
    # torch's extension tools log that they found no CUDA at import: true, and not this build's concern
    logging.getLogger("torch.utils.cpp_extension").addFilter(lambda rec: "No CUDA runtime" not in rec.getMessage())
    from torch.utils import cpp_extension  # imports setuptools: only when the kernel is wanted

    folder = build_directory()
    try:
        if not buildable():
            raise RuntimeError(f"it is x86-64 Linux code and this is {platform.machine()} {sys.platform}")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{EXTENSION}.so").exists():
            print(f"building the bfloat16 CPU attention kernel in {folder} (once per torch version, about 15 s)",
                  file=sys.stderr, flush=True)
        # the library links torch's own OpenMP through the process that loads it (no -fopenmp at link
        # time, which could bring a second OpenMP runtime)
        cpp_extension.load(name=EXTENSION, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                           build_directory=str(folder), is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure leaves the PyTorch ops, which work
        reason = _cause(error)
        warnings.warn(f"the bfloat16 CPU attention kernel could not be built in {folder} ({reason}); bfloat16 "
                      "attention runs on PyTorch's ops, slower: install g++ and ninja, then "
                      "`python tools/build_cpu_kernel.py`", RuntimeWarning, stacklevel=2)
        return False
    return True


def available() -> bool:
    """Whether bfloat16 attention can run the kernel here: the CPU has AVX512-BF16 and it is built."""
    return cpu_has_avx512_bf16() and load()


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these bfloat16 CPU tensors: an even number of channels per head
    (it reads them in pairs), each token's channels contiguous (as in head views of projections)."""
    return q.shape[-1] % 2 == 0 and all(t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for bfloat16 (B, heads, N, D) queries and (B, heads, M, D) keys and
    values on the CPU (D even, each token's channels contiguous).  The result's memory is (B, N, heads,
    D), so that ``out.transpose(1, 2).reshape(B, N, heads * D)`` copies nothing."""
    return torch.ops.pacavit.attention_bf16(q, k, v, q.shape[-1] ** -0.5)
