"""The bfloat16 CPU attention kernel (models/csrc/bf16_attention.cpp): it builds on any x86-64 host,
computes softmax(q k^T / sqrt(D)) v within bfloat16 rounding where the CPU has AVX512-BF16, refuses
to run elsewhere, and a failed build leaves PyTorch's ops with one warning."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from models.layers import cpu_kernels, fused

from tests.conftest import REPO
from tests.models.test_fused import BOTH_DTYPES, create_pair

# built by ./install.sh; otherwise the first test builds it (about 15 s)
BUILT = cpu_kernels.load()
KERNEL = "pacavit::attention_bf16"


def test_the_kernel_builds_here_and_its_probe_agrees_with_pythons_and_the_cpus_flags():
    from classification.benchmark import cpu_flags

    assert BUILT, "the kernel did not build (see the warning)"
    assert torch.ops.pacavit.cpu_has_avx512_bf16() == cpu_kernels.cpu_has_avx512_bf16() == (
        "avx512_bf16" in cpu_flags())


def reference(q, k, v):
    """What the kernel computes, in float64 from the same bfloat16 inputs."""
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())


def head_views(B, N, H, D, scale=1.0):
    """(B, H, N, D) heads of a (B, N, H * D) projection, as PaCaAttention hands them over."""
    return (torch.randn(B, N, H * D) * scale).bfloat16().view(B, N, H, D).transpose(1, 2)


# (batch, heads, queries, keys, channels): the zoo's heads (D 48 / 40 / 24 / 32, M 100 and the
# patches of stage 4), a row tile's every remainder (N % 4), several query blocks (N > 64), a key
# count past one score tile (M > 64) with every tail of a 16-key vector, and more than four
# 16-channel vectors (D 80, 2)
SHAPES = [
    (2, 2, 67, 100, 48),
    (1, 8, 13, 100, 40),
    (2, 16, 49, 49, 24),
    (1, 3, 130, 1, 32),
    (1, 1, 5, 2, 2),
    (1, 2, 66, 177, 80),
    (3, 1, 1, 64, 16),
    (1, 1, 0, 10, 8),
]


def attention_or_refusal(q, k, v):
    """The kernel's output on a CPU with AVX512-BF16; elsewhere (e.g. AMD Zen 3, where none of its
    instructions runs) it must refuse with an error that says so: None."""
    if torch.ops.pacavit.cpu_has_avx512_bf16():
        return cpu_kernels.attention_bf16(q, k, v)
    with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
        cpu_kernels.attention_bf16(q, k, v)
    return None


@pytest.mark.parametrize("B,H,N,M,D", SHAPES)
def test_the_kernel_computes_attention_within_bfloat16_rounding_or_refuses_a_cpu_without_avx512_bf16(B, H, N, M, D):
    torch.manual_seed(0)
    q, k, v = head_views(B, N, H, D), head_views(B, M, H, D), head_views(B, M, H, D)
    out = attention_or_refusal(q, k, v)
    if out is not None:
        assert out.shape == (B, H, N, D) and out.dtype == torch.bfloat16
        assert out.transpose(1, 2).is_contiguous()  # the (B, N, C) the projection reads, without a copy
        torch.testing.assert_close(out.double(), reference(q, k, v), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("B,H,N,M,D", [(2, 2, 3136, 100, 48), (8, 8, 196, 100, 40)], ids=["stage1", "stage3"])
def test_with_float32_scores_it_is_closer_to_float64_than_pytorchs_bfloat16_gemms(B, H, N, M, D):
    torch.manual_seed(0)
    q, k, v = head_views(B, N, H, D), head_views(B, M, H, D), head_views(B, M, H, D)
    out = attention_or_refusal(q, k, v)
    if out is not None:
        expected = reference(q, k, v)
        kernel_error, gemms_error = ((o.double() - expected).abs().mean() for o in (out, gemms(q, k, v)))
        assert kernel_error < 0.8 * gemms_error, (kernel_error, gemms_error)


def gemms(q, k, v):
    """The attention as BFloat16CpuAttention computes it without the kernel."""
    scores_t = (k * k.shape[-1] ** -0.5) @ q.transpose(-2, -1)
    return (v.transpose(-2, -1) @ scores_t.softmax(dim=-2)).transpose(-2, -1)


def test_scores_far_apart_give_the_softmax_of_the_largest_without_overflow():
    torch.manual_seed(0)
    q, k, v = head_views(2, 70, 2, 48, scale=30.0), head_views(2, 100, 2, 48, scale=30.0), head_views(2, 100, 2, 48)
    out = attention_or_refusal(q, k, v)
    if out is not None:
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), reference(q, k, v), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v: (q[..., :-1], k[..., :-1], v[..., :-1]), "even number of channels"),
    (lambda q, k, v: (q.float(), k, v), "bfloat16 CPU tensors"),
    (lambda q, k, v: (q.transpose(2, 3), k, v), "channels contiguous"),
    (lambda q, k, v: (q, k, v[:, :, :3]), "do not match"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "at least one key"),
])
def test_inputs_it_cannot_take_get_an_error_that_says_why(change, message):
    q, k, v = head_views(1, 8, 2, 8), head_views(1, 4, 2, 8), head_views(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.attention_bf16(*change(q, k, v))


def test_a_cpu_without_avx512_bf16_emulated_on_any_host_gets_the_refusal_and_the_matmuls():
    """ATEN_CPU_CAPABILITY=avx2 makes both probes say no, as on an AVX2-only CPU (AMD Zen 3): the
    operator refuses, and bfloat16 attention takes the two matmuls (a process of its own: the
    probes are read once per process)."""
    script = textwrap.dedent("""
        import torch
        from models.layers import cpu_kernels, fused
        from tests.models.test_cpu_kernels import BOTH_DTYPES, create_pair, head_views, reference, way
        assert cpu_kernels.load()
        assert not torch.ops.pacavit.cpu_has_avx512_bf16() and not cpu_kernels.cpu_has_avx512_bf16()
        q, k, v = (head_views(1, n, 2, 48) for n in (20, 10, 10))
        try:
            cpu_kernels.attention_bf16(q, k, v)
            raise AssertionError("the operator ran")
        except RuntimeError as error:
            assert "needs a CPU with AVX512-BF16" in str(error), error
        fused.cpu_fusion_support = lambda: BOTH_DTYPES  # bfloat16 kernels without AVX512-BF16 (AVX-512 core)
        fused.cpu_has_amx_bf16 = lambda: False
        attn = create_pair("pacavit_tiny_p2cconv_100_0")[1].stage1[0].attn.bfloat16()
        with torch.inference_mode():
            assert way(lambda: attn.attend(q, k, v, 0.0)) == "matmuls"
            torch.testing.assert_close(attn.attend(q, k, v, 0.0).double(), reference(q, k, v), rtol=2e-2, atol=2e-2)
        print("refused")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "refused" in run.stdout, run.stderr[-3000:]


# -- in the model --------------------------------------------------------------------------------
def way(fn) -> str:
    """How ``fn()`` computed its attention."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = {e.key for e in prof.key_averages()}
    if KERNEL in ops:
        return "kernel"
    return "sdpa" if "aten::scaled_dot_product_attention" in ops else "matmuls"


@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (True, True, "sdpa"), (False, True, "kernel"), (False, False, "matmuls"),
], ids=["amx", "avx512_bf16", "neither"])
def test_bfloat16_attention_takes_the_way_the_probes_pick_and_all_compute_the_same(monkeypatch, amx, avx512_bf16,
                                                                                   expected):
    monkeypatch.setattr(fused, "cpu_fusion_support", lambda: BOTH_DTYPES)
    monkeypatch.setattr(fused, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx512_bf16", lambda: avx512_bf16)
    plain, fused_model = create_pair("pacavit_tiny_p2cconv_100_0")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected_logits = plain(x)
        fused_model.bfloat16()
        if expected == "kernel" and not torch.ops.pacavit.cpu_has_avx512_bf16():
            # the probe forced on a CPU without the instructions: the operator refuses, nothing crashes
            with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
                fused_model(x.bfloat16())
            return
        assert way(lambda: fused_model(x.bfloat16())) == expected
        logits = fused_model(x.bfloat16()).float()
    cosine = torch.nn.functional.cosine_similarity(logits, expected_logits)
    assert cosine.min() > 0.999, cosine


def test_a_failed_build_warns_once_and_bfloat16_attention_keeps_pytorchs_ops(tmp_path):
    # a process of its own: this one has loaded the built kernel, which cannot be unloaded
    script = textwrap.dedent("""
        import torch
        from models.layers import cpu_kernels, fused
        from tests.models.test_cpu_kernels import BOTH_DTYPES, create_pair, head_views, reference, way
        fused.cpu_fusion_support = lambda: BOTH_DTYPES
        fused.cpu_has_amx_bf16 = lambda: False
        cpu_kernels.cpu_has_avx512_bf16 = lambda: True  # on any host: the build fails first
        attn = create_pair("pacavit_tiny_p2cconv_100_0")[1].stage1[0].attn.bfloat16()
        q, k, v = (head_views(1, n, 2, 48) for n in (20, 10, 10))
        with torch.inference_mode():
            assert way(lambda: [attn.attend(q, k, v, 0.0) for _ in range(2)]) == "matmuls"
            torch.testing.assert_close(attn.attend(q, k, v, 0.0).double(), reference(q, k, v), rtol=2e-2, atol=2e-2)
        print("computed")
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "PACAVIT_KERNEL_CACHE": str(tmp_path / "kernels")}
    run = subprocess.run([sys.executable, "-W", "always", "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "computed" in run.stdout, run.stderr[-3000:]
    warned = [line for line in run.stderr.splitlines() if "CPU kernels could not be built" in line]
    assert len(warned) == 1, run.stderr[-3000:]
    assert "no-compiler: not found" in warned[0] and "tools/build_cpu_kernel.py" in warned[0]


def test_on_a_machine_it_is_not_written_for_the_build_step_says_so_and_succeeds(monkeypatch, capsys):
    """install.sh's step on ARM or macOS: nothing to build, no warning asking for a compiler."""
    from tools import build_cpu_kernel

    monkeypatch.setattr(cpu_kernels, "buildable", lambda: False)
    monkeypatch.setattr(cpu_kernels, "load", lambda: pytest.fail("a build was tried"))
    assert build_cpu_kernel.main() == 0
    assert "not needed here (x86-64 Linux code)" in capsys.readouterr().out
