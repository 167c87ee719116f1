"""capture_maps records the attention that each block really applied, for every clustering kind."""
import pytest
import timm
import torch

import models
from models import capture_maps, fuse_for_cpu
from models.layers import PaCaAttention

# conv, mlp and linear clustering, clusters computed in every block, the ConvMixer teacher's clusters
MODELS = [
    "pacavit_tiny_p2cconv_100_0",
    "pacavit_small_p2cmlp_100_0",
    "pacavit_small_p2clinear_100_0",
    "pacavit_small_p2cconv_100_blockwise",
    "pacavit_convmixer_tiny_100",
]


def _applied_attention(model: torch.nn.Module, x: torch.Tensor):
    """Run ``model`` under capture_maps and keep, per block, what ``v`` produced and what reached ``proj``."""
    seen = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, PaCaAttention):
            handles.append(module.v.register_forward_hook(lambda m, a, out, n=name: seen.setdefault(n, {}).update(v=out)))
            handles.append(module.proj.register_forward_pre_hook(lambda m, a, n=name: seen[n].update(mixed=a[0])))
    try:
        with torch.no_grad(), capture_maps(model) as maps:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return maps, list(seen.values())


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", MODELS)
def test_captured_attention_is_what_the_block_applied(name, fused):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    if fused:
        model = fuse_for_cpu(model)
    maps, applied = _applied_attention(model, torch.randn(2, 3, 64, 64))
    assert len(maps) == len(applied) == sum(isinstance(m, PaCaAttention) for m in model.modules())
    for record, block in zip(maps, applied):
        attention, v = record["attention"], block["v"]
        heads = attention.shape[1]
        # the block's attention output is its weights times the values, heads side by side
        mixed = attention @ v.unflatten(-1, (heads, -1)).transpose(1, 2)
        torch.testing.assert_close(mixed.transpose(1, 2).flatten(2), block["mixed"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
        if record["assignments"] is not None:
            assert attention.shape[-1] == record["assignments"].shape[1]  # one weight per cluster


def test_capture_maps_leaves_no_hooks_behind():
    model = timm.create_model("pacavit_tiny_p2cconv_100_0", num_classes=10).eval()
    with torch.no_grad(), capture_maps(model):
        model(torch.randn(1, 3, 64, 64))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert models.capture_maps is capture_maps


def test_gradient_checkpointing_records_each_block_once():
    torch.manual_seed(0)
    model = timm.create_model("pacavit_tiny_p2cconv_100_0", num_classes=10, depths=(1, 1, 2, 1)).train()
    model.set_grad_checkpointing(True)
    with capture_maps(model) as maps:
        model(torch.randn(1, 3, 64, 64)).sum().backward()  # the backward runs each block again
    assert [(r["stage"], r["block"]) for r in maps] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
