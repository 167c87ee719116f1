"""The oneDNN fused CPU kernels compute what the plain PyTorch ops compute, and only where they may."""
import pytest
import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from models import fused_kernels
from models.layers import conv_act, linear_act



def fused_ops_run(fn) -> set:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("mkldnn::")}


def plain_linear_act(x, weight, bias, act):
    y = torch.nn.functional.linear(x, weight, bias)
    return y if act is None else act(y)


@pytest.mark.parametrize("act", [None, nn.GELU(), nn.GELU(approximate="tanh")])
def test_linear_act_matches_plain_ops(act):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 37, 24), torch.randn(40, 24), torch.randn(40)
    plain = plain_linear_act(x, weight, bias, act)
    with torch.no_grad():
        assert fused_ops_run(lambda: linear_act(x, weight, bias, act)) == {"mkldnn::_linear_pointwise"}
        torch.testing.assert_close(linear_act(x, weight, bias, act), plain, rtol=1e-5, atol=1e-5)
        no_bias = linear_act(x, weight, None, act)
        torch.testing.assert_close(no_bias, plain_linear_act(x, weight, None, act), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_conv_act_matches_plain_ops_and_keeps_channels_last(kernel_size):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 11, 9).contiguous(memory_format=torch.channels_last)
    weight, bias, pad = torch.randn(16, 1, kernel_size, kernel_size), torch.randn(16), kernel_size // 2
    plain = nn.functional.gelu(nn.functional.conv2d(x, weight, bias, padding=pad, groups=16))
    with torch.no_grad():
        fused_conv = lambda: conv_act(x, weight, bias, (pad, pad), 16, nn.GELU())  # noqa: E731
        assert fused_ops_run(fused_conv) == {"mkldnn::_convolution_pointwise"}
        fused = fused_conv()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused.is_contiguous(memory_format=torch.channels_last)


def test_unfusable_activation_falls_back():
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():
        assert fused_ops_run(lambda: linear_act(x, weight, None, nn.ReLU())) == set()
    torch.testing.assert_close(linear_act(x, weight, None, nn.ReLU()), torch.relu(x @ weight.T))


@pytest.mark.parametrize(
    "name",
    ["pacavit_tiny_p2cconv_100_0", "pacavit_small_p2cmlp_100_0", "pacavit_small_p2clinear_100_0", "pacavit_convmixer_tiny_100"],
)
def test_model_outputs_agree_with_plain_path(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in fused_ops_run(lambda: model(x))
        fused = model(x)
        with fused_kernels(False):
            assert fused_ops_run(lambda: model(x)) == set()
            plain = model(x)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_training_and_float64_use_plain_ops():
    torch.manual_seed(0)
    model = timm.create_model("pacavit_tiny_p2cconv_100_0", num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    assert fused_ops_run(lambda: model(x).sum().backward()) == set()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert fused_ops_run(lambda: model.double()(x.double())) == set()


def test_bfloat16_inference_agrees():
    torch.manual_seed(0)
    model = timm.create_model("pacavit_tiny_p2cconv_100_0", num_classes=10).eval().to(torch.bfloat16)
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        fused = model(x)
        with fused_kernels(False):
            plain = model(x)
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.05, atol=0.05)
