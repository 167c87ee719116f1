"""The PaCa layers are ordinary modules: every Linear / Conv2d is called as a module, so hooks,
wrappers, LoRA and dynamic quantisation act on them; the layers script and FX-trace."""
import pytest
import timm
import torch
from torch import nn

from models.layers import CLUSTERING_LAYERS, ConvMixerTeacher, ConvMlp, PaCaAttention

SMALL = dict(depths=(2, 2, 2, 2), num_classes=10)  # every code path of the zoo rows, fewer blocks
VARIANTS = [
    "pacavit_tiny_p2cconv_100_0",
    "pacavit_small_p2cmlp_100_0",
    "pacavit_small_p2clinear_100_0",
    "pacavit_small_p2cconv_100_blockwise",
    "pacavit_convmixer_tiny_100",
]


def create(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **overrides}).eval()


def layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_hooks_fire_once_on_every_linear_and_conv(name):
    model = create(name)
    calls = {}
    for layer_name, layer in layers(model).items():
        layer.register_forward_hook(lambda m, args, out, key=layer_name: calls.__setitem__(key, calls.get(key, 0) + 1))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == {layer_name: 1 for layer_name in layers(model)}


class Muted(nn.Module):
    """A user's wrapper: runs the wrapped layer and scales its output to zero."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * 0.0


def test_a_replaced_layer_takes_effect():
    model = create("pacavit_tiny_p2cconv_100_0")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.stage1[0].attn.q = Muted(model.stage1[0].attn.q)
        model.stage1[0].mlp.dwconv.dwconv = Muted(model.stage1[0].mlp.dwconv.dwconv)
        after = model(x)
    assert model.stage1[0].attn.q.calls == model.stage1[0].mlp.dwconv.dwconv.calls == 1
    assert not torch.allclose(before, after)


def test_dynamic_quantisation_quantises_every_linear():
    model = create("pacavit_tiny_p2cconv_100_0")
    num_linear = sum(type(m) is nn.Linear for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        quantised = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        got = quantised(x)
    kinds = [type(m) for m in quantised.modules()]
    assert nn.Linear not in kinds
    assert kinds.count(torch.ao.nn.quantized.dynamic.Linear) == num_linear
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


# -- TorchScript and FX at the layer level (the whole model: test_model_api.py) ----------------
class TokensFromImage(nn.Module):
    """Feeds an NCHW image to a token layer as the model does, with ``hw`` from the shape."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        out = self.layer(x.flatten(2).transpose(1, 2), (H, W))
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(lambda kind=kind: PaCaAttention(32, 2, 5, CLUSTERING_LAYERS[kind](32, 5)), id=f"attention-{kind}")
        for kind in CLUSTERING_LAYERS
    ]
    + [
        pytest.param(lambda: PaCaAttention(32, 4), id="attention-no-clusters"),
        pytest.param(lambda: ConvMlp(32, 64), id="mlp"),
    ],
)
def test_token_layers_script_and_trace(layer):
    torch.manual_seed(0)
    module = TokensFromImage(layer()).eval()
    x = torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(torch.jit.script(module)(x), expected)
        torch.testing.assert_close(torch.fx.symbolic_trace(module)(x), expected)


def test_teacher_scripts_and_traces():
    torch.manual_seed(0)
    teacher = ConvMixerTeacher((8, 16, 24, 32), (1, 1, 1, 1), (5, 5, 5, 0)).eval()
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        logits, features = teacher(x)
        for compiled in (torch.jit.script(teacher), torch.fx.symbolic_trace(teacher)):
            got_logits, got_features = compiled(x)
            assert got_logits[3] is None and [t.shape for t in got_logits[:3]] == [(1, 5, 256), (1, 5, 64), (1, 5, 16)]
            torch.testing.assert_close(got_logits[:3], logits[:3])
            torch.testing.assert_close(got_features, features)
