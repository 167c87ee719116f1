"""Build the project's CPU kernels now (./install.sh runs this), instead of on first use.

    python tools/build_cpu_kernel.py

Exit code 0: built (or already built) for this torch, or not x86-64 Linux (nothing to build);
1: they could not be built (the warning says why; bfloat16 layers then run on PyTorch's and oneDNN's
ops).  See models/layers/cpu_kernels.py.
"""
import sys

from models.layers import cpu_kernels


def main() -> int:
    if not cpu_kernels.buildable():  # an ARM or macOS machine: nothing to build, nothing missing
        print("bfloat16 CPU kernels: not needed here (x86-64 Linux code); bfloat16 layers run on PyTorch's ops")
        return 0
    if not cpu_kernels.load():
        return 1
    runs = ("runs them" if cpu_kernels.cpu_has_avx512_bf16()
            else "has no AVX512-BF16: bfloat16 layers keep PyTorch's and oneDNN's ops")
    isa = cpu_kernels.float32_instruction_set()
    print(f"bfloat16 CPU kernels (attention, depthwise conv, LayerNorm): built in {cpu_kernels.build_directory()}; "
          f"this CPU {runs}")
    print("float32 depthwise-conv training kernel: "
          + (f"runs with {isa.upper().replace('AVX512', 'AVX-512')} here" if isa else "this CPU has neither AVX-512 nor AVX2: training keeps "
             "PyTorch's ops"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
