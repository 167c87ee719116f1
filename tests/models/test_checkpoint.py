"""Released-checkpoint loading, against a local HTTP server that plays the release site."""
import functools
import http.server
import logging
import threading

import pytest
import timm
import torch

import models
from models.checkpoint import CheckpointError, RELEASE_BASE_URL, load_checkpoint_file, load_pretrained, release_url
from models.paca_vit import RELEASED_IMAGENET, create_downstream

NAME = "pacavit_tiny_p2cconv_100_0"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def release_server(tmp_path, monkeypatch):
    """Serve ``tmp_path/release`` on 127.0.0.1 as the release prefix; cache into ``tmp_path/cache``."""
    root = tmp_path / "release"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("PACAVIT_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    yield root
    server.shutdown()
    server.server_close()


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
        load_pretrained(timm.create_model(NAME), release_url("does_not_exist.pth"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "broken.pth"
    torch.save(_official_checkpoint(NAME), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\x01garbage" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_checkpoint_file(str(path))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "hook": print}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint_file(str(path))


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(_official_checkpoint("pacavit_small_p2cconv_100_0"), path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_pretrained(timm.create_model(NAME), str(path))
    path = tmp_path / "base.pth"
    torch.save(_official_checkpoint("pacavit_base_p2cconv_100_0"), path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_pretrained(timm.create_model("pacavit_small_p2cconv_100_0"), str(path))


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
