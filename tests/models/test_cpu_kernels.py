"""The project's bfloat16 CPU kernels (models/csrc): they build on any x86-64 host; where the CPU has
AVX512-BF16 the attention, the depthwise conv (with shortcut and GELU) and the LayerNorm compute
within bfloat16 rounding of float64, elsewhere every operator refuses; a fused model takes them
where the probe says, and a failed build leaves PyTorch's and oneDNN's ops with one warning."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from models.layers import cpu_kernels, fused

from tests.conftest import REPO
from tests.models.test_fused import BOTH_DTYPES, create_pair, needs_onednn_bf16

# built by ./install.sh; otherwise the first test builds them (about 25 s)
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
    probes are read once per process).  The whole bf16 model runs its fused layers' oneDNN kernels
    where oneDNN has bfloat16 ones (an AVX-512 core) and the plain ops where it has none (a real
    AVX2-only CPU, where oneDNN refuses bfloat16 whatever the probe says)."""
    script = textwrap.dedent("""
        import torch
        from models.layers import cpu_kernels, fused
        from tests.models.test_cpu_kernels import BOTH_DTYPES, create_pair, head_views, pacavit_ops, reference, way
        assert cpu_kernels.load()
        assert not torch.ops.pacavit.cpu_has_avx512_bf16() and not cpu_kernels.cpu_has_avx512_bf16()
        q, k, v = (head_views(1, n, 2, 48) for n in (20, 10, 10))
        x = torch.randn(1, 4, 4, 32).bfloat16().permute(0, 3, 1, 2)
        for run in (lambda: cpu_kernels.attention_bf16(q, k, v),
                    lambda: cpu_kernels.depthwise_conv_bf16(x, torch.randn(32, 1, 3, 3), None, True, True),
                    lambda: cpu_kernels.layer_norm_bf16(x.permute(0, 2, 3, 1), torch.ones(32), torch.zeros(32), 1e-6)):
            try:
                run()
                raise AssertionError("an operator ran")
            except RuntimeError as error:
                assert "needs a CPU with AVX512-BF16" in str(error), error
        onednn_support = fused.cpu_fusion_support()
        fused.cpu_fusion_support = lambda: BOTH_DTYPES  # bfloat16 kernels without AVX512-BF16 (AVX-512 core)
        fused.cpu_has_amx_bf16 = lambda: False
        attn = create_pair("pacavit_tiny_p2cconv_100_0")[1].stage1[0].attn.bfloat16()
        with torch.inference_mode():
            assert way(lambda: attn.attend(q, k, v, 0.0)) == "matmuls"
            torch.testing.assert_close(attn.attend(q, k, v, 0.0).double(), reference(q, k, v), rtol=2e-2, atol=2e-2)
            if torch.bfloat16 not in onednn_support:
                fused.cpu_fusion_support = lambda: onednn_support
            plain, fused_model = create_pair("pacavit_tiny_p2cconv_100_0")
            images = torch.randn(1, 3, 64, 64)
            expected = plain(images)
            fused_model.bfloat16()
            assert pacavit_ops(lambda: fused_model(images.bfloat16())) == set()
            assert torch.nn.functional.cosine_similarity(fused_model(images.bfloat16()).float(), expected).min() > 0.999
        print("refused")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "refused" in run.stdout, run.stderr[-3000:]


# -- the depthwise conv (with its shortcut and GELU) ----------------------------------------------
def channels_last_image(B, C, H, W, scale=1.0):
    """A (B, C, H, W) view of (B, H * W, C) tokens, as the MLP hands them to its conv."""
    return (torch.randn(B, H * W, C) * scale).bfloat16().view(B, H, W, C).permute(0, 3, 1, 2)


def depthwise_reference(x, weight, bias, residual, gelu):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                 padding=weight.shape[-1] // 2, groups=x.shape[1])
    y = y + x.double() if residual else y
    return F.gelu(y) if gelu else y


def or_refusal(run):
    """``run()`` on a CPU with AVX512-BF16; elsewhere (e.g. AMD Zen 3) the operator must refuse with an
    error that says why: None."""
    if torch.ops.pacavit.cpu_has_avx512_bf16():
        return run()
    with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
        run()
    return None


# (batch, channels, height, width, kernel, shortcut, GELU): the MLP's 3x3 conv (9 inner columns: a tile
# of 8 and one), the clustering's 7x7, tiles of 8 with a remainder of 3, 5x5 (tiles of 4 and one), an
# image smaller than the kernel (every pixel at a border), one pixel, no image
DEPTHWISE_SHAPES = [
    (2, 384, 9, 11, 3, True, True),
    (1, 96, 8, 8, 7, False, True),
    (1, 64, 20, 21, 3, True, False),
    (1, 32, 6, 13, 5, False, True),
    (2, 32, 3, 2, 7, True, False),
    (1, 32, 1, 1, 3, False, False),
    (0, 32, 4, 4, 3, True, True),
]


@pytest.mark.parametrize("B,C,H,W,K,residual,gelu", DEPTHWISE_SHAPES)
def test_the_depthwise_kernel_computes_conv_shortcut_and_gelu_within_bfloat16_rounding_or_refuses(
        B, C, H, W, K, residual, gelu):
    torch.manual_seed(0)
    x, weight, bias = channels_last_image(B, C, H, W), torch.randn(C, 1, K, K) * 0.3, torch.randn(C)
    out = or_refusal(lambda: cpu_kernels.depthwise_conv_bf16(x, weight, bias, residual, gelu))
    if out is not None:
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)  # the MLP's tokens again, without a copy
        torch.testing.assert_close(out.double(), depthwise_reference(x, weight, bias, residual, gelu),
                                   rtol=1e-2, atol=1e-2)


def test_a_bfloat16_weight_without_bias_is_the_same_float32_weight_and_a_zero_bias():
    torch.manual_seed(0)
    x, weight = channels_last_image(1, 64, 5, 12), (torch.randn(64, 1, 3, 3) * 0.3).bfloat16()
    out = or_refusal(lambda: cpu_kernels.depthwise_conv_bf16(x, weight, None, True, True))
    if out is not None:
        torch.testing.assert_close(out, cpu_kernels.depthwise_conv_bf16(x, weight.float(), torch.zeros(64), True, True),
                                   rtol=0, atol=0)


def test_its_gelu_is_the_exact_gelu_rounded_to_bfloat16_over_the_whole_range():
    """An identity kernel makes the output GELU(x): every finite bfloat16 value up to 1e4 in magnitude,
    against the float64 erf GELU: within bfloat16 rounding of it, but for the negative tail from
    -4 to -5.75 (|GELU| < 1.3e-4), where |x| times the fit's 2.2e-7 leaves it up to 2e-6 off;
    0 below -5.75.  Where |GELU| >= 1e-6 (not the tail, not subnormals) the results that are not the
    correctly rounded one (a tie of the rounding) are at most twice as many as PyTorch's (0.4%, 0.3%)."""
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # every bfloat16
    values = values[torch.isfinite(values) & (values.float().abs() <= 1e4)]
    values = torch.cat([values, values.new_zeros(-len(values) % 32)])
    x = values.view(1, -1, 1, 32).permute(0, 3, 1, 2)  # channels_last, one pixel per 32 values
    identity = torch.zeros(32, 1, 3, 3)
    identity[:, :, 1, 1] = 1.0
    out = or_refusal(lambda: cpu_kernels.depthwise_conv_bf16(x, identity, None, False, True))
    if out is not None:
        exact = F.gelu(x.double())
        error = (out.double() - exact).abs()
        assert (error <= 2**-8 * exact.abs() + 2e-6).all(), x[error > 2**-8 * exact.abs() + 2e-6]
        assert (out[x < -5.75] == 0).all()
        normal = exact.abs() >= 1e-6
        off = [(y != exact.bfloat16())[normal].float().mean() for y in (out, F.gelu(x))]
        assert off[0] <= 2 * off[1], off


def test_its_shortcut_is_exact_where_onednn_rounds_1_plus_w_to_bfloat16():
    """The MLP's conv adds its input: folded into the centre tap, 1 + w in bfloat16 (oneDNN's kernel)
    loses 8 bits of w; the kernel keeps the weights in float32, and its mean error is lower."""
    if torch.bfloat16 not in fused.cpu_fusion_support():
        pytest.skip("this CPU has no oneDNN bfloat16 kernels to compare with")
    torch.manual_seed(0)
    x, weight, bias = channels_last_image(2, 384, 14, 14), torch.randn(384, 1, 3, 3) * 0.05, torch.randn(384) * 0.1
    out = or_refusal(lambda: cpu_kernels.depthwise_conv_bf16(x, weight, bias, True, True))
    if out is not None:
        folded = (weight + torch.nn.functional.pad(torch.ones(384, 1, 1, 1), (1, 1, 1, 1))).bfloat16()
        onednn = torch.ops.mkldnn._convolution_pointwise(x, folded, bias.bfloat16(), [1, 1], [1, 1], [1, 1], 384,
                                                         "gelu", [], "none")
        expected = depthwise_reference(x, weight, bias, True, True)
        kernel_error, onednn_error = ((o.double() - expected).abs().mean() for o in (out, onednn))
        assert kernel_error < 0.8 * onednn_error, (kernel_error, onednn_error)


@pytest.mark.parametrize("change,message", [
    (lambda x, w, b: (x.float(), w, b), "4-d bfloat16 CPU tensor"),
    (lambda x, w, b: (x.contiguous(), w, b), "channels_last"),
    (lambda x, w, b: (channels_last_image(1, 48, 4, 4), w[:48], b[:48]), "multiple of 32 channels"),
    (lambda x, w, b: (x, torch.randn(64, 1, 4, 4), b), "K = 3, 5 or 7"),
    (lambda x, w, b: (x, torch.randn(64, 1, 9, 9), b), "K = 3, 5 or 7"),
    (lambda x, w, b: (x, w[:32], b), "K = 3, 5 or 7"),
    (lambda x, w, b: (x, w, b[:3]), "bias of 64 floats"),
])
def test_inputs_the_depthwise_kernel_cannot_take_get_an_error_that_says_why(change, message):
    x, weight, bias = channels_last_image(1, 64, 4, 4), torch.randn(64, 1, 3, 3), torch.randn(64)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.depthwise_conv_bf16(*change(x, weight, bias), True, True)


# -- the LayerNorm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,offset", [((2, 67, 96), 0.0), ((1, 5, 384), 0.0), ((3, 32), 0.0), ((1, 0, 64), 0.0),
                                          ((2, 49, 320), 1000.0)], ids=["stage1", "stage4", "2d", "empty", "far"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-affine", "bf16-affine"])
def test_the_layer_norm_kernel_is_as_close_to_float64_as_pytorchs(shape, offset, dtype):
    """Statistics in float32 (the variance about the mean: tokens far from zero keep it)."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + offset).bfloat16()
    weight, bias = torch.randn(shape[-1]).to(dtype), torch.randn(shape[-1]).to(dtype)
    out = or_refusal(lambda: cpu_kernels.layer_norm_bf16(x, weight, bias, 1e-6))
    if out is not None:
        expected = F.layer_norm(x.double(), shape[-1:], weight.double(), bias.double(), 1e-6)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=2e-2)
        if x.numel():
            pytorch = F.layer_norm(x, shape[-1:], weight.bfloat16(), bias.bfloat16(), 1e-6)
            assert (out.double() - expected).abs().mean() <= 1.05 * (pytorch.double() - expected).abs().mean()


@pytest.mark.parametrize("change,message", [
    (lambda x, w, b: (x.float(), w, b), "contiguous bfloat16 CPU tensor"),
    (lambda x, w, b: (x.transpose(0, 1), w, b), "contiguous bfloat16 CPU tensor"),
    (lambda x, w, b: (x[..., :48].contiguous(), w[:48], b[:48]), "multiple of 32 channels"),
    (lambda x, w, b: (x, w[:32], b), "weight and a bias of 64 floats"),
])
def test_inputs_the_layer_norm_kernel_cannot_take_get_an_error_that_says_why(change, message):
    x, weight, bias = torch.randn(3, 5, 64).bfloat16(), torch.randn(64), torch.randn(64)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.layer_norm_bf16(*change(x, weight, bias), 1e-6)


# -- in the model --------------------------------------------------------------------------------
def all_ops(fn) -> set:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def pacavit_ops(fn) -> set:
    """The project's kernels that ``fn()`` runs."""
    return {op for op in all_ops(fn) if op.startswith("pacavit::") and op != "pacavit::cpu_has_avx512_bf16"}


def way(fn) -> str:
    """How ``fn()`` computed its attention."""
    ops = all_ops(fn)
    if KERNEL in ops:
        return "kernel"
    return "sdpa" if "aten::scaled_dot_product_attention" in ops else "matmuls"


def model_with_forced_probes(monkeypatch, amx: bool, avx512_bf16: bool):
    """(plain, fused) PaCa-Tiny and a batch of images, the CPU probes answering as told (any host)."""
    monkeypatch.setattr(fused, "cpu_fusion_support", lambda: BOTH_DTYPES)
    monkeypatch.setattr(fused, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx512_bf16", lambda: avx512_bf16)
    plain, fused_model = create_pair("pacavit_tiny_p2cconv_100_0")
    torch.manual_seed(0)
    return plain, fused_model, torch.randn(2, 3, 64, 64)


@needs_onednn_bf16
@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (True, True, "sdpa"), (False, True, "kernel"), (False, False, "matmuls"),
], ids=["amx", "avx512_bf16", "neither"])
def test_bfloat16_attention_takes_the_way_the_probes_pick_and_all_compute_the_same(monkeypatch, amx, avx512_bf16,
                                                                                   expected):
    plain, fused_model, x = model_with_forced_probes(monkeypatch, amx, avx512_bf16)
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


@needs_onednn_bf16
@pytest.mark.parametrize("avx512_bf16", [True, False], ids=["avx512_bf16", "without"])
def test_a_bfloat16_model_takes_the_depthwise_and_layer_norm_kernels_where_the_probe_says(monkeypatch, avx512_bf16):
    """With the probe on (a CPU with AVX512-BF16): the MLP's and the clustering's convs, the LayerNorms
    and the attention run the project's kernels; under autocast the LayerNorms keep PyTorch's op (it
    returns float32 there).  Off: none of them; the logits agree with float32 both ways."""
    plain, fused_model, x = model_with_forced_probes(monkeypatch, False, avx512_bf16)
    kernels = {"pacavit::attention_bf16", "pacavit::depthwise_conv_bf16", "pacavit::layer_norm_bf16"}
    with torch.inference_mode():
        expected = plain(x)
        if avx512_bf16 and not torch.ops.pacavit.cpu_has_avx512_bf16():
            with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fused_model(x)
            return
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert pacavit_ops(lambda: fused_model(x)) == (kernels - {"pacavit::layer_norm_bf16"} if avx512_bf16
                                                          else set())
            under_autocast = fused_model(x)
        fused_model.bfloat16()
        assert pacavit_ops(lambda: fused_model(x.bfloat16())) == (kernels if avx512_bf16 else set())
        as_bf16_model = fused_model(x.bfloat16())
    for logits in (under_autocast, as_bf16_model):
        assert torch.nn.functional.cosine_similarity(logits.float(), expected).min() > 0.999


@needs_onednn_bf16
def test_a_conv_the_kernel_does_not_compute_keeps_onednn(monkeypatch):
    """GELU's tanh approximation, and "valid" padding, are not the kernel's: oneDNN's kernel runs."""
    monkeypatch.setattr(fused, "cpu_fusion_support", lambda: BOTH_DTYPES)
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx512_bf16", lambda: True)
    x = channels_last_image(1, 32, 6, 6)
    for conv, act in ((torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.GELU(approximate="tanh")),
                      (torch.nn.Conv2d(32, 32, 3, padding=0, groups=32), torch.nn.GELU())):
        layer = fused.FusedConv2d(conv.bfloat16(), act)
        assert not layer.own_kernel_fits
        with torch.inference_mode():
            assert "mkldnn::_convolution_pointwise" in all_ops(lambda: layer(x))
            torch.testing.assert_close(layer(x).float(), act(conv(x)).float(), rtol=2e-2, atol=2e-2)
