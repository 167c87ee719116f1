"""timm integration, any-size inputs, the capture hook and the FLOP counter."""
import copy

import pytest
import timm
import torch

import models
from models import capture_maps, create_downstream
from models.flops import count_flops, count_params

TINY = "pacavit_tiny_p2cconv_100_0"


def test_all_names_registered_with_timm():
    assert set(models.VARIANTS) <= set(timm.list_models("pacavit_*"))
    cfg = timm.create_model(TINY).pretrained_cfg
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == ((3, 224, 224), 0.9, "bicubic")
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD


def test_classifier_api():
    model = timm.create_model(TINY, num_classes=7, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 384)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3


@pytest.mark.parametrize("name", ["pacavit_small_p2cconv_100_blockwise", "pacavit_convmixer_tiny_100", "pacavit_small_p2cmlp_100_0"])
def test_downstream_any_input_size(name):
    backbone = create_downstream(name, out_indices=(0, 2)).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 51, 77))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 13, 20), (1, backbone.embed_dims[2], 4, 5)]


def test_features_only_out_indices():
    features = timm.create_model(TINY, features_only=True, out_indices=(1, 3))
    assert features.feature_info.channels() == [192, 384] and features.feature_info.reduction() == [8, 32]
    assert [tuple(f.shape) for f in features(torch.randn(1, 3, 64, 64))] == [(1, 192, 8, 8), (1, 384, 2, 2)]


def test_single_image_without_batch_dimension_is_named():
    model = timm.create_model(TINY).eval()
    with pytest.raises(ValueError, match=r"batch dimension is missing, pass x\.unsqueeze\(0\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\), got a tensor of shape \[64, 64\]"):
        create_downstream(TINY)(torch.randn(64, 64))


def test_meta_device_and_dtype_construction():
    model = timm.create_model(TINY, device="meta", dtype=torch.bfloat16, in_chans=1)
    assert {(t.device.type, t.dtype) for t in model.parameters()} == {("meta", torch.bfloat16)}
    model.reset_classifier(5)  # the new head follows the model, not the default device / dtype
    assert (model.head.weight.device.type, model.head.weight.dtype) == ("meta", torch.bfloat16)
    x = torch.empty(2, 1, 64, 64, device="meta", dtype=torch.bfloat16)
    assert model.in_chans == 1 and model(x).shape == (2, 5)
    assert model.forward_features(x).shape == (2, 2, 2, 384) and model.output_fmt == "NHWC"


def test_pruned_features_keep_only_the_stages_they_use():
    torch.manual_seed(0)
    model = timm.create_model("pacavit_convmixer_tiny_100").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
    names = {n.split(".")[0] for n, _ in pruned.named_parameters()}
    assert names == {"paca_teacher", "patch_embed", "stage1", "norm1", "transition1", "stage2", "norm2"}
    assert not hasattr(pruned.paca_teacher, "to_clusters3") and pruned.num_features == 192
    with torch.no_grad():
        for got, want in zip(pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True), expected):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(pruned.forward_features(x).permute(0, 3, 1, 2), expected[1])
    # as features_only builds it: every remaining parameter is used (DDP needs that)
    features = timm.create_model("pacavit_convmixer_tiny_100", features_only=True, out_indices=(0, 1))
    assert not any(n.startswith(("model.stage3", "model.stage4")) for n, _ in features.named_parameters())
    sum(f.sum() for f in features(x)).backward()
    assert [n for n, p in features.named_parameters() if p.grad is None] == []


def test_pretrained_features_load_before_pruning(tmp_path):
    checkpoint = tmp_path / "weights.pth"
    state_dict = timm.create_model(TINY).state_dict()
    state_dict["norm2.weight"] = torch.rand(192)  # not the init value, so the check below means something
    torch.save(state_dict, checkpoint)
    features = timm.create_model(
        TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), features_only=True, out_indices=(0, 1)
    )
    assert features.feature_info.channels() == [96, 192] and not hasattr(features.model, "stage3")
    torch.testing.assert_close(features.model.norm2.weight, torch.load(checkpoint)["norm2.weight"])


@pytest.mark.parametrize("name", ["pacavit_convmixer_tiny_100", TINY])
def test_torchscript_and_fx_compute_the_eager_function(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        traced = create_feature_extractor(
            model, ["head"], tracer_kwargs=dict(autowrap_functions=timm.models.get_notrace_functions())
        )
        torch.testing.assert_close(traced(x)["head"], expected)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("pacavit_convmixer_tiny_100", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad()
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_capture_maps_keeps_the_math_and_returns_assignments():
    torch.manual_seed(0)
    model = timm.create_model(TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        with capture_maps(model) as maps:
            captured = model(x)
        logits = model.stage1[0].attn.clustering(model.stage1[0].norm1_before(model.patch_embed(x).flatten(1, 2)), (16, 16))
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    assert [(m["stage"], m["block"]) for m in maps] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3), (3, 0), (3, 1)]
    first = maps[0]
    assert first["assignments"].shape == (1, 100, 16, 16) and first["attention"].shape == (1, 2, 256, 100)
    torch.testing.assert_close(first["assignments"].flatten(2), logits.softmax(dim=-1))
    torch.testing.assert_close(first["assignments"].sum(dim=(2, 3)), torch.ones(1, 100, dtype=x.dtype))
    assert maps[-1]["assignments"] is None and maps[-1]["attention"].shape == (1, 16, 4, 4)
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone after the with


def test_flops_and_params_match_the_seed_table():
    model = timm.create_model(TINY)
    assert round(count_params(model) / 1e6, 1) == 12.2
    assert round(count_flops(model, (1, 3, 224, 224)) / 1e9, 1) == 3.2


def test_flop_counter_counts_attention():
    from fvcore.nn import FlopCountAnalysis

    model = timm.create_model(TINY).eval()
    x = torch.zeros(1, 3, 224, 224)
    plain = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).total()
    # stage-wise attention over 100 clusters in stages 1-3 and over 49 patches in stage 4 (2 matmuls each)
    attention = 2 * sum(n * m * c * d for n, m, c, d in [(3136, 100, 96, 2), (784, 100, 192, 2), (196, 100, 320, 4), (49, 49, 384, 2)])
    assert count_flops(model, x) - plain == attention


def test_readme_model_zoo_is_up_to_date(repo_root):
    """The README's zoo table is what ``tools/model_zoo.py`` computes from the code today."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_zoo", repo_root / "tools" / "model_zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    readme = (repo_root / "README.md").read_text()
    assert f"{zoo.START}\n{zoo.table()}\n{zoo.END}" in readme, "run: python tools/model_zoo.py --write README.md"
