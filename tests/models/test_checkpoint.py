"""The one checkpoint loader: released files (against a local HTTP server that plays the release
site, a mirror folder or a file:// mirror), official training checkpoints, OpenMMLab Runner
checkpoints, and the exact-or-named-reinit policy."""
import argparse
import codecs
import fcntl
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models import adapt_input_conv
from timm.utils import CheckpointSaver, ModelEmaV3

from models.checkpoint import (
    RELEASE_BASE_URL,
    CheckpointError,
    cache_path,
    load_checkpoint,
    read_checkpoint,
    release_url,
    verify_checkpoint,
)
from models.paca_vit import RELEASED_IMAGENET, create_downstream
from runtime import cli

NAME = "pacavit_tiny_p2cconv_100_0"

# the class map of an ImageNet folder, for validate.build_model (the released files store no names)
IMAGENET_FOLDERS = {f"n{index:08d}": index for index in range(1000)}


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
    cached = cache_path(release_url(RELEASED_IMAGENET[NAME]))
    assert cached.startswith(str(tmp_path / "cache")) and os.path.isfile(cached)
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
    assert not list((tmp_path / "cache").glob("**/*.pth")), "a bad download must not stay in the cache"


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


def test_the_refusal_names_only_what_is_not_allowed(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"state_dict": {}, "extra": np.array([print], dtype=object)}, path)  # code inside a numpy array
    with pytest.raises(CheckpointError, match="weights_only") as refused:
        read_checkpoint(str(path))
    asked = str(refused.value).split("(it asks for ")[1].split(")")[0]
    assert "builtins.print" in asked and "multiarray" not in asked  # numpy's array rebuilding is allowed


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


def test_downstream_pretrained_shorthand(release_server):
    ckpt = _official_checkpoint(NAME)
    torch.save(ckpt, release_server / RELEASED_IMAGENET[NAME])
    backbone = create_downstream(NAME, init_cfg=dict(type="Pretrained", checkpoint="pretrained"))
    assert backbone.checkpoint_source() == release_url(RELEASED_IMAGENET[NAME])
    backbone.init_weights()
    torch.testing.assert_close(backbone.norm1.weight, ckpt["state_dict"]["norm1.weight"])
    with pytest.raises(CheckpointError, match="no released ImageNet checkpoint"):
        create_downstream("pacavit_convmixer_tiny_100", pretrained="pretrained").init_weights()


def test_downstream_old_imagenet_word_is_one_clear_error():
    backbone = create_downstream(NAME, init_cfg=dict(type="Pretrained", checkpoint="imagenet"))
    with pytest.raises(CheckpointError, match="'imagenet' is now spelled 'pretrained'.*checkpoint='pretrained'"):
        backbone.init_weights()


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
    from classification import validate

    for use_ema, expected in ((False, weights), (True, ema_weights)):
        args = argparse.Namespace(model=NAME, checkpoint=str(path), use_ema=use_ema, data_dir="DATA", split="val")
        _same_weights(validate.build_model(args, IMAGENET_FOLDERS)[0], expected)


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
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
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


def test_reinit_takes_one_name_as_a_string(tmp_path, caplog):
    path = tmp_path / "imnet.pth"
    torch.save(_official_checkpoint(NAME), path)
    with caplog.at_level(logging.WARNING):
        report = load_checkpoint(timm.create_model(NAME, num_classes=10), path, reinit="head")
    assert report.reinitialised == ["head.weight", "head.bias"] and "reinit=('head',)" in caplog.text
    clusters = timm.create_model(NAME, num_classes=10, num_clusters=(50, 100, 100, 0))
    with pytest.raises(CheckpointError, match=r"; only head may differ here"):
        load_checkpoint(clusters, path, reinit="head")


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
    backbone = create_downstream(NAME, pretrained="pretrained")
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


# ---------------------------------------------------------------------------------------------
# Integrity: checksums of the zip records, checked before anything is unpickled


def _flip_bytes_in_largest_record(path, count=8):
    """Damage ``count`` bytes in the middle of a checkpoint's largest tensor, leaving the zip
    structure intact: torch.load still reads such a file, with wrong weights."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # local header: name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        start = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        f.seek(start)
        damaged = bytes(b ^ 0xFF for b in f.read(count))
        f.seek(start)
        f.write(damaged)


def _small_checkpoint(seed: int = 0) -> dict:
    """A checkpoint of a 64x64 linear layer: enough bytes to damage, quick to save and load."""
    torch.manual_seed(seed)
    return {"state_dict": torch.nn.Linear(64, 64).state_dict()}


def _same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_flipped_bytes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "flipped.pth"
    torch.save(_small_checkpoint(), path)
    _flip_bytes_in_largest_record(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    for load in (lambda: read_checkpoint(path), lambda: load_checkpoint(torch.nn.Linear(64, 64), path),
                 lambda: verify_checkpoint(path)):
        with pytest.raises(CheckpointError, match=rf"{path} is not a readable PyTorch checkpoint \(corrupt or truncated: Bad CRC-32"):
            load()


def test_checkpoints_saved_without_checksums_still_load(tmp_path):
    path = tmp_path / "no_crc.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(_small_checkpoint(), path)
    finally:
        torch.serialization.set_crc32_options(True)
    _same_tensors(read_checkpoint(path)["state_dict"], _small_checkpoint()["state_dict"])


def test_a_broken_cached_file_is_removed_and_fetched_again(release_site, caplog):
    ckpt = _small_checkpoint()
    torch.save(ckpt, release_site.root / RELEASED_IMAGENET[NAME])
    url = release_url(RELEASED_IMAGENET[NAME])
    read_checkpoint(url)
    cached = cache_path(url)
    _flip_bytes_in_largest_record(cached)
    with caplog.at_level(logging.WARNING):
        _same_tensors(read_checkpoint(url)["state_dict"], ckpt["state_dict"])
    assert f"{cached} (cached from {url}) is not a readable PyTorch checkpoint" in caplog.text and "downloading it again" in caplog.text
    assert release_site.requests == [f"/{RELEASED_IMAGENET[NAME]}"] * 2


def test_a_corrupt_file_on_the_server_is_not_cached(release_site, tmp_path):
    torch.save(_small_checkpoint(), release_site.root / "served.pth")
    _flip_bytes_in_largest_record(release_site.root / "served.pth")
    with pytest.raises(CheckpointError, match=rf"{release_url('served.pth')} is not a readable PyTorch checkpoint"):
        read_checkpoint(release_url("served.pth"))
    assert not _cached_files(tmp_path)


def _training_checkpoint(path, epoch, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    torch.save({"epoch": epoch, "state_dict": layer.state_dict(), "optimizer": optimizer.state_dict()}, path)


def test_resume_point_skips_a_flipped_last_checkpoint(tmp_path):
    from runtime.run_folder import resume_point

    _training_checkpoint(tmp_path / "checkpoint-1.pth.tar", 1)
    _training_checkpoint(tmp_path / "last.pth.tar", 2)
    _flip_bytes_in_largest_record(tmp_path / "last.pth.tar")
    said = []
    assert resume_point("classification", tmp_path, report=said.append) == tmp_path / "checkpoint-1.pth.tar"
    assert any(f"{tmp_path / 'last.pth.tar'} is not a readable PyTorch checkpoint" in line for line in said), said


def test_validate_refuses_a_flipped_checkpoint(tmp_path, repo_root, monkeypatch):
    path = tmp_path / "model_best.pth.tar"
    torch.save(_official_checkpoint(NAME), path)
    _flip_bytes_in_largest_record(path)
    monkeypatch.syspath_prepend(str(repo_root / "classification"))
    from classification import validate

    args = argparse.Namespace(model=NAME, checkpoint=str(path), use_ema=False, data_dir="DATA", split="val")
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable PyTorch checkpoint"):
        validate.build_model(args, IMAGENET_FOLDERS)


# ---------------------------------------------------------------------------------------------
# Downloads: keyed by the whole URL, one per machine, checked before they enter the cache


def test_same_file_name_under_different_urls_stays_apart(serve_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PACAVIT_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    sites = [serve_folder(tmp_path / name) for name in ("site1", "site2")]
    urls, expected = [], []
    for seed, (site, run) in enumerate([(sites[0], "runA"), (sites[0], "runB"), (sites[1], "runA")]):
        (tmp_path / f"site{sites.index(site) + 1}" / run).mkdir(parents=True, exist_ok=True)
        ckpt = _small_checkpoint(seed)
        torch.save(ckpt, tmp_path / f"site{sites.index(site) + 1}" / run / "model_best.pth.tar")
        urls.append(f"{site.url}/{run}/model_best.pth.tar")
        expected.append(ckpt["state_dict"])
    for _ in range(2):  # the second time from the cache
        for url, state in zip(urls, expected):
            _same_tensors(read_checkpoint(url)["state_dict"], state)
    assert sites[0].requests == ["/runA/model_best.pth.tar", "/runB/model_best.pth.tar"]
    assert sites[1].requests == ["/runA/model_best.pth.tar"]
    assert len({cache_path(url) for url in urls}) == 3
    assert all(os.path.basename(cache_path(url)) == "model_best.pth.tar" for url in urls)


def _serve_slowly(handler, pieces=20):
    """Send the file in pieces with pauses, so that simultaneous downloads overlap."""
    data = (Path(handler.directory) / handler.path.lstrip("/")).read_bytes()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    step = len(data) // pieces + 1
    for start in range(0, len(data), step):
        handler.wfile.write(data[start:start + step])
        handler.wfile.flush()
        time.sleep(0.02)


_RACING_DOWNLOADER = """
import os, sys, time
import torch
from models.checkpoint import read_checkpoint
folder, urls = sys.argv[1], sys.argv[2:]
for round_, url in enumerate(urls):
    open(os.path.join(folder, f"ready-{round_}-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(folder, f"go-{round_}")):
        time.sleep(0.005)
    print(round_, float(read_checkpoint(url)["state_dict"]["bias"][0]), flush=True)
"""


@pytest.mark.slow  # four Python processes that import torch: about a minute on two cores
def test_simultaneous_downloads_fetch_once_and_all_succeed(release_site, tmp_path, repo_root):
    rounds, processes = 4, 4
    urls, expected = [], []
    for round_ in range(rounds):
        ckpt = _small_checkpoint(round_)
        name = f"round{round_}/{RELEASED_IMAGENET[NAME]}"
        (release_site.root / name).parent.mkdir()
        torch.save(ckpt, release_site.root / name)
        release_site.answers[f"/{name}"] = _serve_slowly
        urls.append(release_url(name))
        expected.append(float(ckpt["state_dict"]["bias"][0]))
    sync = tmp_path / "sync"
    sync.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, "-c", _RACING_DOWNLOADER, str(sync), *urls], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    try:
        for round_ in range(rounds):
            deadline = time.monotonic() + 120
            while len(list(sync.glob(f"ready-{round_}-*"))) < processes and time.monotonic() < deadline:
                time.sleep(0.01)
            (sync / f"go-{round_}").touch()
        results = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (out, err) in zip(workers, results):
        assert worker.returncode == 0, err[-3000:]
        assert [float(value) for value in out.split()[1::2]] == expected
    for round_ in range(rounds):
        assert release_site.requests.count(f"/round{round_}/{RELEASED_IMAGENET[NAME]}") == 1


def test_a_process_waits_for_another_ones_download(release_site, caplog):
    torch.save(_small_checkpoint(), release_site.root / "shared.pth")
    url = release_url("shared.pth")
    os.makedirs(os.path.dirname(cache_path(url)))
    with open(cache_path(url) + ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is downloading
        reader = threading.Thread(target=read_checkpoint, args=(url,))
        with caplog.at_level(logging.WARNING):
            reader.start()
            deadline = time.monotonic() + 30
            while "waiting for it" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert f"another process is downloading {url}; waiting for it" in caplog.text
            assert not release_site.requests
        fcntl.flock(lock, fcntl.LOCK_UN)
        reader.join(30)
    assert not reader.is_alive() and release_site.requests == ["/shared.pth"]


def _stall_before_answering(handler):
    handler.server.release.wait(60)


def _send_half_the_file(handler):
    """Announce the whole file (Content-Length) and send its first half."""
    data = (Path(handler.directory) / handler.path.lstrip("/")).read_bytes()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data[: len(data) // 2])
    handler.wfile.flush()


def _stall_mid_file(handler):
    _send_half_the_file(handler)
    handler.server.release.wait(60)


def _cut_short(handler):
    _send_half_the_file(handler)
    handler.close_connection = True


def _cached_files(tmp_path):
    return [p.name for p in (tmp_path / "cache").glob("**/*") if p.is_file() and not p.name.endswith(".lock")]


@pytest.mark.parametrize("stall", [_stall_before_answering, _stall_mid_file], ids=["before", "mid-file"])
def test_a_stalled_server_times_out(release_site, tmp_path, monkeypatch, stall):
    monkeypatch.setenv("PACAVIT_DOWNLOAD_TIMEOUT", "0.5")
    torch.save(_small_checkpoint(), release_site.root / "stalled.pth")
    release_site.answers["/stalled.pth"] = stall
    errors = []

    def download():
        try:
            read_checkpoint(release_url("stalled.pth"))
        except CheckpointError as e:
            errors.append(str(e))

    reader = threading.Thread(target=download, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "the download hangs"
    message = errors[0]
    assert f"{release_url('stalled.pth')} did not answer for 0.5 s" in message and "PACAVIT_DOWNLOAD_TIMEOUT" in message
    assert not _cached_files(tmp_path)


def test_a_bad_timeout_setting_is_named(release_site, monkeypatch):
    monkeypatch.setenv("PACAVIT_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(CheckpointError, match="PACAVIT_DOWNLOAD_TIMEOUT='soon' is not a number of seconds"):
        read_checkpoint(release_url("x.pth"))


def test_a_download_cut_short_is_never_cached(release_site, tmp_path):
    ckpt = _small_checkpoint()
    torch.save(ckpt, release_site.root / "cut.pth")
    size = (release_site.root / "cut.pth").stat().st_size
    release_site.answers["/cut.pth"] = _cut_short
    with pytest.raises(CheckpointError, match=rf"download of {release_url('cut.pth')} ended after {size // 2} of {size} bytes"):
        read_checkpoint(release_url("cut.pth"))
    assert not _cached_files(tmp_path)
    del release_site.answers["/cut.pth"]  # the server recovers: the next try downloads anew
    _same_tensors(read_checkpoint(release_url("cut.pth"))["state_dict"], ckpt["state_dict"])
    assert release_site.requests == ["/cut.pth"] * 2


ERROR_BODIES = {
    "text": (b"Rate limit exceeded, try again later\n", "a text file beginning 'Rate limit exceeded"),
    "json": (b'{"message": "Not Found", "status": 404}', "a JSON document beginning '{\"message\""),
    "html": (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "an HTML/XML page beginning '<!DOCTYPE html>'"),
}


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("kind", list(ERROR_BODIES))
def test_an_error_body_with_status_200_is_refused(release_site, tmp_path, kind, bom):
    body, described = ERROR_BODIES[kind]
    (release_site.root / RELEASED_IMAGENET[NAME]).write_bytes(codecs.BOM_UTF8 * bom + body)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(release_url(RELEASED_IMAGENET[NAME]))
    message = str(error.value)
    assert message.startswith(f"{release_url(RELEASED_IMAGENET[NAME])} is {described}"), message
    assert "not a PyTorch checkpoint" in message and "weights_only" not in message
    assert not _cached_files(tmp_path)


# ---------------------------------------------------------------------------------------------
# A checkpoint of another model: one line naming the file


def test_export_onnx_names_the_file_of_another_architecture(tmp_path, repo_root, monkeypatch):
    path = tmp_path / "small.pth"
    torch.save(_official_checkpoint("pacavit_small_p2cconv_100_0"), path)
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    from tools import export_onnx

    with pytest.raises(SystemExit) as stop:
        export_onnx.main([NAME, "--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")])
    assert str(stop.value).startswith(f"error: {path} does not fit PaCaViT") and "\n" not in str(stop.value)
    assert not (tmp_path / "x.onnx").exists()


def test_resume_with_another_model_is_one_clear_line(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(repo_root / "classification"))
    from classification import train_timm

    torch.manual_seed(0)
    saved = timm.create_model(NAME, num_classes=3)
    optimizer = torch.optim.SGD(saved.parameters(), lr=0.1)
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 0, "state_dict": saved.state_dict(), "optimizer": optimizer.state_dict(),
                "class_names": ["a", "b", "c"]}, path)
    other = timm.create_model("pacavit_small_p2cconv_100_0", num_classes=3)
    args = argparse.Namespace(resume=str(path), model="pacavit_small_p2cconv_100_0", data_dir="DATA")
    resume = lambda: train_timm.resume(args, other, torch.optim.SGD(other.parameters(), lr=0.1),  # noqa: E731
                                       None, None, ["a", "b", "c"])
    with pytest.raises(SystemExit) as stop:
        cli.run_main(resume)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"error: --resume {path} does not hold the weights of --model pacavit_small_p2cconv_100_0"), err


TINY_COCO_CONFIG = "configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py"


@pytest.fixture
def tiny_coco_env(tmp_path, repo_root, monkeypatch):
    """A one-image COCO set and the environment of a CPU detection run in ``tmp_path``."""
    subprocess.run([sys.executable, str(repo_root / "detection" / "make_tiny_coco.py"), "--out",
                    str(tmp_path / "datasets" / "coco_tiny"), "--train", "1", "--val", "1"], check=True, capture_output=True)
    env = dict(PACAVIT_DATASETS=str(tmp_path / "datasets"), PACAVIT_WORK_DIRS=str(tmp_path / "work_dirs"),
               PACAVIT_DEVICE="cpu", OMP_NUM_THREADS="2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(repo_root / "detection"))  # the config's custom_imports
    return dict(os.environ)


def test_test_main_refuses_a_classification_checkpoint_before_building_the_runner(tiny_coco_env, repo_root, tmp_path):
    from runtime.openmmlab import test_main

    path = tmp_path / "imagenet.pth"
    torch.save(_official_checkpoint(NAME), path)
    with pytest.raises(SystemExit) as stop:
        test_main("mmdet", "detection", [str(repo_root / "detection" / TINY_COCO_CONFIG), str(path)])
    assert str(stop.value) == (
        f"error: {path} holds the weights of a bare backbone or classifier (no backbone.* tensors), not of a "
        f"whole MaskRCNN: evaluate a checkpoint of the detector / segmentor itself; an ImageNet classifier "
        f"initialises the backbone when training (model.backbone.init_cfg or pretrained)."
    )
    assert not (tmp_path / "work_dirs").exists(), "stopped before the Runner made its work dir"


@pytest.mark.slow
def test_test_mmdet_sh_given_a_classification_checkpoint_says_so_in_one_line(tiny_coco_env, repo_root, tmp_path):
    path = tmp_path / "imagenet.pth"
    torch.save(_official_checkpoint(NAME), path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(["./test_mmdet.sh", TINY_COCO_CONFIG, str(path), "0", "1", str(port)],
                            cwd=repo_root / "detection", env=tiny_coco_env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    worker_lines = [line for line in result.stderr.splitlines()
                    if line.strip().startswith("File ") and str(repo_root) in line and "site-packages" not in line]
    assert not worker_lines, "a traceback through the project's code: " + "\n".join(worker_lines)
    assert f"error: {path} holds the weights of a bare backbone or classifier" in result.stderr
    assert "Config:" not in result.stdout + result.stderr, "the Runner was built (and logged its config) first"
