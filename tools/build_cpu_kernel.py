"""Build the bfloat16 CPU attention kernel now (./install.sh runs this), instead of on first use.

    python tools/build_cpu_kernel.py

Exit code 0: built (or already built) for this torch, or not x86-64 Linux (nothing to build);
1: it could not be built (the warning says why; bfloat16 attention then runs on PyTorch's ops).
See models/layers/cpu_attention.py.
"""
import sys

from models.layers import cpu_attention


def main() -> int:
    if not cpu_attention.buildable():  # an ARM or macOS machine: nothing to build, nothing missing
        print("bfloat16 CPU attention kernel: not needed here (x86-64 Linux code); attention runs on PyTorch's ops")
        return 0
    if not cpu_attention.load():
        return 1
    runs = ("runs it" if cpu_attention.cpu_has_avx512_bf16()
            else "has no AVX512-BF16: bfloat16 attention keeps PyTorch's ops")
    print(f"bfloat16 CPU attention kernel: built in {cpu_attention.build_directory()}; this CPU {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
