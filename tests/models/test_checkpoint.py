"""The one checkpoint loader: released files (against a local HTTP server that plays the release
site, a mirror folder or a file:// mirror), official training checkpoints, OpenMMLab Runner
checkpoints, and the exact-or-named-reinit policy."""
import argparse
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from timm.models import adapt_input_conv
from timm.utils import CheckpointSaver, ModelEmaV3

import models
from models.checkpoint import CheckpointError, RELEASE_BASE_URL, load_checkpoint, read_checkpoint, release_url
from models.paca_vit import RELEASED_IMAGENET, create_downstream

NAME = "pacavit_tiny_p2cconv_100_0"


def _official_checkpoint(name: str, wrap: str = "state_dict", seed: int = 0) -> dict:
    """A checkpoint in the layout the official trainer saved: tensors under ``state_dict``."""
    torch.manual_seed(seed)
    state = timm.create_model(name).state_dict()
    return {wrap: state, "epoch": 299, "arch": name} if wrap else state


def _same_weights(a: torch.nn.Module, b_state: dict):
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b_state[key], rtol=0, atol=0)


def test_release_url_follows_environment(monkeypatch):
    monkeypatch.delenv("PACAVIT_CHECKPOINT_BASE_URL", raising=False)
    assert release_url("x.pth") == f"{RELEASE_BASE_URL}/x.pth"
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", "http://127.0.0.1:1/mirror/")
    assert release_url("x.pth") == "http://127.0.0.1:1/mirror/x.pth"


def test_every_released_model_has_its_seed_url():
    for name, filename in RELEASED_IMAGENET.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == f"{RELEASE_BASE_URL}/{filename}"
    # The seed README links the [100,81,64,49] file for the [100,100,100,100] row as well.
    assert RELEASED_IMAGENET["pacavit_small_p2cconv_100"] == RELEASED_IMAGENET["pacavit_small_p2cconv_100_49"]


@pytest.mark.parametrize("wrap", ["state_dict", "model", ""])
def test_pretrained_downloads_caches_and_loads(release_server, tmp_path, wrap):
    ckpt = _official_checkpoint(NAME, wrap)
    torch.save(ckpt, release_server / RELEASED_IMAGENET[NAME])
    model = timm.create_model(NAME, pretrained=True)
    _same_weights(model, ckpt[wrap] if wrap else ckpt)
    cached = tmp_path / "cache" / RELEASED_IMAGENET[NAME]
    assert cached.is_file()
    # Second time: served from the cache even with the server gone.
    (release_server / RELEASED_IMAGENET[NAME]).unlink()
    _same_weights(timm.create_model(NAME, pretrained=True), ckpt[wrap] if wrap else ckpt)


def test_pretrained_with_new_class_count_reinitialises_head(release_server):
    ckpt = _official_checkpoint(NAME)
    torch.save(ckpt, release_server / RELEASED_IMAGENET[NAME])
    model = timm.create_model(NAME, pretrained=True, num_classes=10)
    assert model.head.weight.shape == (10, 384)
    torch.testing.assert_close(model.stage1[0].attn.q.weight, ckpt["state_dict"]["stage1.0.attn.q.weight"])


def test_features_only_loads_pretrained(release_server):
    ckpt = _official_checkpoint(NAME)
    torch.save(ckpt, release_server / RELEASED_IMAGENET[NAME])
    features = timm.create_model(NAME, pretrained=True, features_only=True)
    torch.testing.assert_close(features.model.norm4.weight, ckpt["state_dict"]["norm4.weight"])
    assert [f.shape[1] for f in features(torch.randn(1, 3, 64, 64))] == [96, 192, 320, 384]


def test_local_file_via_overlay_and_checkpoint_path(tmp_path):
    ckpt = _official_checkpoint(NAME, seed=1)
    path = tmp_path / "local.pth"
    torch.save(ckpt, path)
    _same_weights(timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), ckpt["state_dict"])
    _same_weights(timm.create_model(NAME, checkpoint_path=str(path)), ckpt["state_dict"])


def test_downstream_loads_imagenet_weights_with_new_cluster_numbers(tmp_path, caplog):
    ckpt = _official_checkpoint(NAME)
    ckpt["state_dict"] = {f"module.{k}": v for k, v in ckpt["state_dict"].items()}  # DDP-saved
    path = tmp_path / "imnet.pth"
    torch.save(ckpt, path)
    backbone = create_downstream(NAME, downstream_cluster_num=[200, 200, 200, 0], init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    fresh = backbone.stage1[0].attn.clustering.clustering[4].weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        backbone.init_weights()
    assert "stage1.0.attn.clustering.clustering.4.weight (100, 96, 1, 1)->(200, 96, 1, 1)" in caplog.text
    torch.testing.assert_close(backbone.stage1[0].attn.clustering.clustering[4].weight, fresh)
    torch.testing.assert_close(backbone.stage1[0].attn.q.weight, ckpt["state_dict"]["module.stage1.0.attn.q.weight"])
    assert [o.shape[1:] for o in backbone(torch.randn(1, 3, 45, 71))] == [
        (96, 12, 18), (192, 6, 9), (320, 3, 5), (384, 2, 3)
    ]


def test_downstream_loads_from_url_and_mmdet_prefixes(release_server):
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in _official_checkpoint(NAME)["state_dict"].items()}}
    torch.save(ckpt, release_server / "mask_rcnn.pth")
    backbone = create_downstream(NAME, pretrained=release_url("mask_rcnn.pth"))
    backbone.init_weights()
    torch.testing.assert_close(backbone.norm2.bias, ckpt["state_dict"]["backbone.norm2.bias"])


def test_html_page_instead_of_checkpoint(release_server, tmp_path):
    (release_server / RELEASED_IMAGENET[NAME]).write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(CheckpointError, match="HTML"):
        timm.create_model(NAME, pretrained=True)
    assert not list((tmp_path / "cache").glob("*.pth")), "a bad download must not stay in the cache"


def test_missing_url_is_a_clear_error(release_server):
    with pytest.raises(CheckpointError, match="could not download"):
        load_checkpoint(timm.create_model(NAME), release_url("does_not_exist.pth"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "broken.pth"
    torch.save(_official_checkpoint(NAME), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\x01garbage" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="broken.pth"):
        read_checkpoint(str(path))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "hook": print}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(str(path))


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(_official_checkpoint("pacavit_small_p2cconv_100_0"), path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(timm.create_model(NAME), str(path))
    path = tmp_path / "base.pth"
    torch.save(_official_checkpoint("pacavit_base_p2cconv_100_0"), path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(timm.create_model("pacavit_small_p2cconv_100_0"), str(path))


def test_variant_without_release_says_so():
    with pytest.raises(RuntimeError, match="no released ImageNet checkpoint"):
        timm.create_model("pacavit_convmixer_tiny_100", pretrained=True)


def test_downstream_imagenet_shorthand(release_server):
    ckpt = _official_checkpoint(NAME)
    torch.save(ckpt, release_server / RELEASED_IMAGENET[NAME])
    backbone = create_downstream(NAME, init_cfg=dict(type="Pretrained", checkpoint="imagenet"))
    assert backbone.checkpoint_source() == release_url(RELEASED_IMAGENET[NAME])
    backbone.init_weights()
    torch.testing.assert_close(backbone.norm1.weight, ckpt["state_dict"]["norm1.weight"])
    with pytest.raises(CheckpointError, match="no released ImageNet checkpoint"):
        create_downstream("pacavit_convmixer_tiny_100", pretrained="imagenet").init_weights()


# ---------------------------------------------------------------------------------------------
# Official training checkpoints (timm's CheckpointSaver with args and EMA)


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A checkpoint as the official trainer writes it: timm's CheckpointSaver(args=Namespace) with
    optimizer state and EMA weights that differ from the model's."""
    folder = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model = timm.create_model(NAME)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = ModelEmaV3(model, decay=0.5)
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean().backward()
    optimizer.step()
    ema.update(model)
    args = argparse.Namespace(model=NAME, lr=1e-3, epochs=300, mean=(0.485, 0.456, 0.406), input_size=None, amp=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder))
    saver.save_checkpoint(0, metric=12.5)
    path = folder / "model_best.pth.tar"
    return path, {k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in ema.module.state_dict().items()}


def test_official_training_checkpoint_reads_with_its_args(training_checkpoint):
    path, _, _ = training_checkpoint
    checkpoint = read_checkpoint(path)
    assert {"epoch", "arch", "state_dict", "optimizer", "version", "metric", "state_dict_ema", "args"} <= set(checkpoint)
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"].model == NAME
    assert checkpoint["optimizer"]["state"], "the optimizer state comes back too (resume)"


@pytest.mark.parametrize("use_ema", [False, True])
def test_official_training_checkpoint_loads_weights_or_ema(training_checkpoint, use_ema):
    path, weights, ema_weights = training_checkpoint
    expected = ema_weights if use_ema else weights
    assert not torch.equal(weights["head.weight"], ema_weights["head.weight"])
    model = timm.create_model(NAME)
    report = load_checkpoint(model, path, use_ema=use_ema)
    _same_weights(model, expected)
    assert report.use_ema is use_ema and not report.reinitialised and len(report.loaded) == len(expected)


def test_official_training_checkpoint_through_timm_backbone_and_validate(training_checkpoint, repo_root, monkeypatch):
    path, weights, ema_weights = training_checkpoint
    _same_weights(timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), weights)
    backbone = create_downstream(NAME, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    torch.testing.assert_close(backbone.norm4.weight, weights["norm4.weight"], rtol=0, atol=0)
    monkeypatch.syspath_prepend(str(repo_root / "classification"))
    import validate

    for use_ema, expected in ((False, weights), (True, ema_weights)):
        args = argparse.Namespace(model=NAME, checkpoint=str(path), use_ema=use_ema, data_dir="DATA", split="val")
        _same_weights(validate.build_model(args, num_classes=1000), expected)


def test_use_ema_without_ema_weights_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(_official_checkpoint(NAME), path)
    with pytest.raises(CheckpointError, match=r"plain\.pth.*no EMA weights"):
        load_checkpoint(timm.create_model(NAME), path, use_ema=True)


class _WritesMarker:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("route", ["read", "load", "timm", "backbone"])
def test_code_hidden_in_the_args_namespace_is_refused(tmp_path, route):
    marker = tmp_path / "PWNED"
    checkpoint = _official_checkpoint(NAME)
    checkpoint["args"] = argparse.Namespace(model=NAME, lr=0.1, hook=_WritesMarker(marker))
    path = tmp_path / "evil.pth.tar"
    torch.save(checkpoint, path)
    load = {
        "read": lambda: read_checkpoint(path),
        "load": lambda: load_checkpoint(timm.create_model(NAME), path),
        "timm": lambda: timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))),
        "backbone": lambda: create_downstream(NAME, pretrained=str(path)).init_weights(),
    }[route]
    with pytest.raises(CheckpointError) as error:
        load()
    assert not marker.exists()
    message = str(error.value)
    assert str(path) in message and "system" in message
    assert "Only if you trust the file" in message and f"torch.load('{path}', weights_only=False)" in message


# ---------------------------------------------------------------------------------------------
# OpenMMLab Runner checkpoints, whatever was imported before


def _runner_checkpoint(path, state_dict):
    """The layout mmengine's Runner saves: meta with numpy values, message_hub with HistoryBuffers."""
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("paca-test-runner-ckpt")
    for step in range(3):
        hub.update_scalar("train/loss", 1.0 / (step + 1))
    hub.update_info("iter", np.int64(3))
    torch.save({
        "meta": {"epoch": 1, "iter": 3, "seed": np.int64(7), "hist": np.arange(3), "dataset_meta": {"classes": ("a",)}},
        "state_dict": state_dict,
        "message_hub": hub.state_dict(),
    }, path)


def test_runner_checkpoint_loads_after_a_plain_import_models(tmp_path):
    torch.manual_seed(3)
    weights = timm.create_model(NAME).state_dict()
    state = {f"backbone.{k}": v for k, v in weights.items()} | {"neck.lateral.weight": torch.zeros(4, 4)}
    _runner_checkpoint(tmp_path / "runner.pth", state)
    torch.save(weights["norm3.weight"], tmp_path / "expected.pt")
    script = f"""
import sys, torch
import models
names = lambda: {{getattr(g, "__name__", "") for g in torch.serialization.get_safe_globals()}}
assert "HistoryBuffer" not in names()
backbone = models.create_downstream("{NAME}", downstream_cluster_num=[200, 200, 200, 0],
                                    init_cfg=dict(type="Pretrained", checkpoint=r"{tmp_path / 'runner.pth'}"))
backbone.init_weights()
assert torch.equal(backbone.norm3.weight, torch.load(r"{tmp_path / 'expected.pt'}"))
checkpoint = models.read_checkpoint(r"{tmp_path / 'runner.pth'}")
assert checkpoint["message_hub"]["log_scalars"]["train/loss"].mean() > 0
assert "HistoryBuffer" not in names(), "allowed while reading only, not process-wide"
assert not {{"mmdet_custom", "mmseg_custom"}} & set(sys.modules)
print("OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=str(models.__path__[0].rsplit(os.sep, 1)[0])))
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# The policy: exact, or named layers re-initialised (and said)


def test_exact_unless_the_layer_is_named(tmp_path, caplog):
    path = tmp_path / "imnet.pth"
    torch.save(_official_checkpoint(NAME), path)
    model = timm.create_model(NAME, num_classes=10)
    with pytest.raises(CheckpointError, match=r"imnet\.pth does not fit .*head\.weight: checkpoint \(1000, 384\) vs model \(10, 384\)"):
        load_checkpoint(model, path)
    with caplog.at_level(logging.WARNING):
        report = load_checkpoint(model, path, reinit=("head",))
    assert report.reinitialised == ["head.weight", "head.bias"]
    assert "head.weight (1000, 384)->(10, 384)" in caplog.text and "re-initialised" in caplog.text
    assert len(report.loaded) == len(model.state_dict()) - 2
    # a resized layer that is not named still stops the load
    clusters = timm.create_model(NAME, num_classes=10, num_clusters=(50, 100, 100, 0))
    with pytest.raises(CheckpointError, match=r"stage1\.0\.attn\.clustering.*only head may differ"):
        load_checkpoint(clusters, path, reinit=("head",))
    report = load_checkpoint(clusters, path, reinit=("head", "clustering"))
    assert [k for k in report.reinitialised if "clustering" in k] == ["stage1.0.attn.clustering.clustering.4.weight"]


def test_unexpected_tensors_are_an_error_unless_named(tmp_path):
    checkpoint = _official_checkpoint(NAME)
    checkpoint["state_dict"]["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"unexpected 1 \(e\.g\. extra\.weight\)"):
        load_checkpoint(timm.create_model(NAME), path)
    assert load_checkpoint(timm.create_model(NAME), path, reinit=("extra",)).dropped == ["extra.weight"]


def test_detector_checkpoint_into_a_backbone_keeps_the_backbone_part(tmp_path):
    weights = {k: v for k, v in _official_checkpoint(NAME)["state_dict"].items() if not k.startswith("head.")}
    state = {f"backbone.{k}": v for k, v in weights.items()}
    state |= {"neck.fpn_convs.0.conv.weight": torch.zeros(1), "rpn_head.rpn_cls.bias": torch.zeros(1)}
    path = tmp_path / "mask_rcnn.pth"
    torch.save({"state_dict": state}, path)
    backbone = create_downstream(NAME)
    report = load_checkpoint(backbone, path, reinit=("head", "clustering"))
    assert sorted(report.dropped) == ["neck.fpn_convs.0.conv.weight", "rpn_head.rpn_cls.bias"]
    assert not report.reinitialised
    _same_weights(backbone, weights)


# ---------------------------------------------------------------------------------------------
# Sources: mirrors, file:// URLs, folders given by mistake


@pytest.fixture(params=["folder", "file_url", "http"])
def mirror(request, tmp_path, monkeypatch):
    """The release mirrored as a plain folder, a file:// URL or an HTTP server on 127.0.0.1."""
    if request.param == "http":
        return request.getfixturevalue("release_server")
    root = tmp_path / "mirror dir"  # a space, as real paths have
    root.mkdir()
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", str(root) if request.param == "folder" else root.as_uri())
    monkeypatch.setenv("PACAVIT_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    return root


def test_mirror_as_folder_file_url_or_http(mirror):
    ckpt = _official_checkpoint(NAME, seed=4)
    torch.save(ckpt, mirror / RELEASED_IMAGENET[NAME])
    _same_weights(timm.create_model(NAME, pretrained=True), ckpt["state_dict"])
    backbone = create_downstream(NAME, pretrained="imagenet")
    backbone.init_weights()
    torch.testing.assert_close(backbone.norm2.weight, ckpt["state_dict"]["norm2.weight"], rtol=0, atol=0)


def test_missing_file_in_a_mirror_folder_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", str(tmp_path))
    with pytest.raises(CheckpointError, match=f"not found: {tmp_path}/{RELEASED_IMAGENET[NAME]} .*BASE_URL mirrors"):
        timm.create_model(NAME, pretrained=True)


def test_a_directory_is_not_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(_official_checkpoint(NAME), run / "last.pth.tar")
    for source in (run, run.as_uri()):
        with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file.*last\.pth\.tar"):
            load_checkpoint(timm.create_model(NAME), source)


# ---------------------------------------------------------------------------------------------
# Other input channels: the stem is adapted from the RGB checkpoint, as timm does for its models


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_adapts_the_stem_of_an_rgb_checkpoint(tmp_path, in_chans):
    ckpt = _official_checkpoint(NAME)
    path = tmp_path / "rgb.pth"
    torch.save(ckpt, path)
    model = timm.create_model(NAME, in_chans=in_chans, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    state = model.state_dict()
    stem = "patch_embed.proj.0.weight"
    assert state[stem].shape[1] == in_chans
    torch.testing.assert_close(state[stem], adapt_input_conv(in_chans, ckpt["state_dict"][stem]))
    _same_weights(model, {**ckpt["state_dict"], stem: state[stem]})
    assert model.eval()(torch.randn(1, in_chans, 64, 64)).shape == (1, 1000)
