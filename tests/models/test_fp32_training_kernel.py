"""The project's float32 depthwise-conv training kernel (models/csrc/fp32_depthwise.cpp): where the CPU has
AVX-512, or AVX2 and FMA, its forward and gradients agree with PyTorch's conv + shortcut + GELU in float64 to
float32 rounding, for any split of the rows between threads; elsewhere it refuses.  A fused PaCa model trains
with it where the probe says, with the plain model's gradients, and keeps PyTorch's ops under autocast,
without gradients, and on a CPU without either.  The AVX2 code (what AMD Zen 3 runs) and the refusal are
checked on any host, in processes where ``ATEN_CPU_CAPABILITY`` sets the probes, as it does ATen's."""
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
from tests.models.test_fused import create_pair

BUILT = cpu_kernels.load()
FORWARD, BACKWARD = "pacavit::depthwise_conv_fp32", "pacavit::depthwise_conv_fp32_backward"


def image(B, C, H, W):
    """A channels_last (B, C, H, W) view of (B, H * W, C) tokens, as the MLP hands them to its conv."""
    return torch.randn(B, H * W, C).view(B, H, W, C).permute(0, 3, 1, 2)


def reference(x, weight, bias, residual, gelu):
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    y = y + x if residual else y
    return F.gelu(y) if gelu else y


def output_and_gradients(run, x, weight, bias, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + (() if bias is None else (bias,))]
    run(*leaves[:2], leaves[2] if bias is not None else None).backward(grad_y)
    return [run(*leaves[:2], leaves[2] if bias is not None else None).detach()] + [t.grad for t in leaves]


REFUSAL = "needs a CPU with AVX-512 or AVX2 and FMA"


def kernel_or_refusal(run):
    """``run()`` on a CPU with AVX-512 or AVX2; elsewhere the operator must refuse with an error that says
    why: None."""
    if torch.ops.pacavit.float32_instruction_set():
        return run()
    with pytest.raises(RuntimeError, match=REFUSAL):
        run()
    return None


def test_the_python_probe_names_the_instruction_set_the_operators_choose():
    assert torch.ops.pacavit.float32_instruction_set() == (cpu_kernels.float32_instruction_set() or "")
    assert cpu_kernels.float32_available() == bool(cpu_kernels.float32_instruction_set())


# (batch, channels, height, width, kernel, shortcut, GELU, bias): the MLP's 3x3 conv with its shortcut and
# GELU, the clustering's 7x7 with GELU, 5x5, no bias, images smaller than the kernel (every pixel at a
# border), one pixel, one row
DEPTHWISE_SHAPES = [
    (2, 48, 9, 11, 3, True, True, True),
    (1, 96, 8, 8, 7, False, True, True),
    (2, 32, 6, 13, 5, True, False, True),
    (3, 16, 5, 4, 3, False, True, False),
    (1, 16, 2, 3, 7, True, True, True),
    (2, 16, 1, 1, 3, False, True, True),
    (1, 32, 1, 9, 5, True, True, True),
]


@pytest.mark.parametrize("threads", [1, 3], ids=["1-thread", "3-threads"])
@pytest.mark.parametrize("B,C,H,W,K,residual,gelu,has_bias", DEPTHWISE_SHAPES)
def test_forward_and_gradients_agree_with_float64_or_the_kernel_refuses(B, C, H, W, K, residual, gelu, has_bias,
                                                                         threads):
    """3 threads split the rows inside images, where each thread recomputes its neighbours' border rows."""
    x, weight = image(B, C, H, W), torch.randn(C, 1, K, K) * 0.3
    bias = torch.randn(C) if has_bias else None
    grad_y = image(B, C, H, W)
    expected = output_and_gradients(lambda *t: reference(*t, residual, gelu),
                                    *(None if t is None else t.double() for t in (x, weight, bias, grad_y)))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel_or_refusal(lambda: output_and_gradients(
            lambda *t: cpu_kernels.depthwise_conv_fp32(*t, residual, gelu), x, weight, bias, grad_y))
    finally:
        torch.set_num_threads(previous)
    if got is None:
        return
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].shape == x.shape
    for value, want in zip(got, expected):  # y, dx, dweight, dbias: float32 sums of up to B*H*W terms
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_its_gelu_and_gelu_derivative_are_the_exact_ones_over_the_whole_range():
    """With a zero kernel and the shortcut the layer is GELU(x + bias): its output and dx are the exact
    GELU's and derivative's to float32 rounding, from far below the fit's range (0) to far above (x)."""
    x = torch.linspace(-12, 12, 16 * 1501).view(1, 1501, 1, 16).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    weight, bias = torch.zeros(16, 1, 3, 3), torch.zeros(16)
    got = kernel_or_refusal(lambda: output_and_gradients(
        lambda *t: cpu_kernels.depthwise_conv_fp32(*t, True, True), x, weight, bias, torch.ones_like(x)))
    if got is None:
        return
    exact = x.double().requires_grad_()
    F.gelu(exact).backward(torch.ones_like(exact))
    torch.testing.assert_close(got[0].double(), F.gelu(x.double()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1].double(), exact.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change,message", [
    (lambda x, w, b: (x.double(), w, b), "4-d float32 CPU tensor"),
    (lambda x, w, b: (x.contiguous(), w, b), "channels_last"),
    (lambda x, w, b: (image(1, 24, 4, 4), w[:24], b[:24]), "multiple of 16 channels"),
    (lambda x, w, b: (x, torch.randn(32, 1, 4, 4), b), "K = 3, 5 or 7"),
    (lambda x, w, b: (x, w.bfloat16(), b), "K = 3, 5 or 7"),
    (lambda x, w, b: (x, w, b[:3]), "bias of 32 float32 values"),
])
def test_inputs_it_cannot_take_get_an_error_that_says_why(change, message):
    x, weight, bias = image(1, 32, 4, 4), torch.randn(32, 1, 3, 3), torch.randn(32)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.depthwise_conv_fp32(*change(x, weight, bias), True, True)


def pacavit_ops(run):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key for e in prof.key_averages() if e.key.startswith("pacavit::")}


@pytest.mark.parametrize("probe", ["avx2", None], ids=["kernel", "without"])
def test_a_fused_model_trains_with_the_kernel_where_the_probe_says_with_the_plain_models_gradients(
        monkeypatch, probe):
    """The MLP's and the clustering's depthwise convs take the kernel in a float32 training step where the
    probe says (its forward and backward), PyTorch's ops elsewhere; the loss and every gradient agree with
    the plain model's."""
    monkeypatch.setattr(cpu_kernels, "float32_instruction_set", lambda: probe)
    plain, fused_model = create_pair("pacavit_tiny_p2cconv_100_0", num_classes=5)
    plain.train(), fused_model.train()
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    if probe and not torch.ops.pacavit.float32_instruction_set():
        with pytest.raises(RuntimeError, match=REFUSAL):
            fused_model(x)
        return
    losses = {}

    def step(model):
        losses[model] = F.cross_entropy(model(x), target)
        losses[model].backward()

    step(plain)
    assert pacavit_ops(lambda: step(fused_model)) == ({FORWARD, BACKWARD} if probe else set())
    torch.testing.assert_close(losses[fused_model], losses[plain], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_without_gradients_under_autocast_and_for_other_convs_the_kernel_stays_out(monkeypatch):
    """Without gradients where oneDNN runs AVX-512 (where it does not: test_fused.py), under autocast, and
    for a conv with the tanh GELU."""
    monkeypatch.setattr(cpu_kernels, "float32_instruction_set", lambda: "avx2")
    monkeypatch.setattr(fused, "onednn_runs_avx512", lambda: True)
    _, fused_model = create_pair("pacavit_tiny_p2cconv_100_0", num_classes=5)
    fused_model.train()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert FORWARD not in pacavit_ops(lambda: fused_model(x))
    # the operator's calls counted, not profiled: on a CPU without bfloat16 convs the profiler would
    # record ATen's conv once per channel group, and take minutes
    calls = []
    operator = torch.ops.pacavit.depthwise_conv_fp32
    monkeypatch.setattr(torch.ops.pacavit, "depthwise_conv_fp32", lambda *args: calls.append(1) or operator(*args))
    fused_model(x).sum().backward()
    assert calls  # the count sees the kernel where it runs
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_model(x).float().sum().backward()
    assert not calls
    tanh_gelu = fused.FusedConv2d(torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.GELU(approximate="tanh"))
    assert not tanh_gelu.runs_own_float32_kernel(image(1, 32, 4, 4).requires_grad_())


NO_KERNEL_SCRIPT = textwrap.dedent("""
    import torch
    from models.layers import cpu_kernels
    from tests.models.test_fp32_training_kernel import REFUSAL, create_pair, image, pacavit_ops
    assert cpu_kernels.load()
    assert torch.ops.pacavit.float32_instruction_set() == "" and not cpu_kernels.float32_available()
    try:
        cpu_kernels.depthwise_conv_fp32(image(1, 16, 4, 4), torch.randn(16, 1, 3, 3), None, True, True)
        raise AssertionError("the operator ran")
    except RuntimeError as error:
        assert REFUSAL in str(error), error
    plain, fused_model = create_pair("pacavit_tiny_p2cconv_100_0", num_classes=5)
    plain.train(), fused_model.train()
    x = torch.randn(1, 3, 64, 64)
    assert pacavit_ops(lambda: fused_model(x).sum().backward()) == set()
    torch.testing.assert_close(fused_model(x), plain(x), rtol=1e-5, atol=1e-5)
    print("refused")
""")


def test_a_cpu_without_avx2_emulated_on_any_host_gets_the_refusal_and_trains_on_pytorchs_ops():
    """ATEN_CPU_CAPABILITY=default makes both probes say none; a process of its own, since the probes are
    read once per process."""
    run = subprocess.run([sys.executable, "-c", NO_KERNEL_SCRIPT], cwd=REPO,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "refused" in run.stdout, run.stderr[-3000:]


def test_the_avx2_code_passes_these_tests_on_any_host():
    """ATEN_CPU_CAPABILITY=avx2 gives the AVX2 code on an AVX-512 CPU too, as an AVX2-only one (AMD Zen 3)
    runs it: this file's kernel tests, in a process of their own.  Where this process runs the AVX2 code
    already (an AVX2-only CPU, or the limit set for the whole run), the tests above were those tests."""
    probe = subprocess.run([sys.executable, "-c", "import torch; from models.layers import cpu_kernels; "
                            "cpu_kernels.load(); print(torch.ops.pacavit.float32_instruction_set())"],
                           cwd=REPO, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, capture_output=True,
                           text=True, timeout=300)
    assert probe.stdout.split()[-1] == "avx2", probe.stderr[-2000:]
    if cpu_kernels.load() and torch.ops.pacavit.float32_instruction_set() == "avx2":
        return
    tests = "probe_names or agree_with_float64 or gelu_derivative or trains_with_the_kernel or stays_out"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", tests, __file__],
                         cwd=REPO, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
