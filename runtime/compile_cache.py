"""torch.compile's on-disk caches, kept apart per CPU vector ISA.

Inductor (PyTorch 2.14) keys the code it caches (``TORCHINDUCTOR_CACHE_DIR``, by default
/tmp/torchinductor_$USER) without the vector ISA it generated the code for.  A process with another
ISA (a node with another CPU sharing the folder, or ``ATEN_CPU_CAPABILITY=avx2``) then reuses loops
sized for the wrong vector width: AVX-512 code under AVX2 gave NaN logits, AVX2 code under AVX-512
corrupted the heap ("double free"), vector code without a vector ISA did not compile (a LayerNorm
over PaCa-Tiny's 1x1 last stage at 32 px; ``tests/tools/test_compile_cache.py``).
The entry points that compile put the ISA into the caches' key tag first.
"""
import torch

ISA_TAG = "cpu_vec_isa="


def key_compile_caches_by_cpu_isa() -> str:
    """Add the vector ISA Inductor's C++ code generator picks here ("avx512 ...", "avx2", "none")
    to ``torch.compiler.config.cache_key_tag``, after the user's own tag
    (``TORCH_COMPILE_CACHE_KEY_TAG``); returns the tag."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa  # reads ATEN_CPU_CAPABILITY as the code generator does

    own_tags = [t for t in torch.compiler.config.cache_key_tag.split(",") if t and not t.startswith(ISA_TAG)]
    torch.compiler.config.cache_key_tag = ",".join(own_tags + [f"{ISA_TAG}{pick_vec_isa() or 'none'}"])
    return torch.compiler.config.cache_key_tag
