"""models.create_classifier: the one classifier-plus-weights builder of validate, predict, export and the visualiser."""
import pytest
import timm
import torch

import models
from models import CheckpointError, UnknownModelError, create_classifier
from models.paca_vit import RELEASED_IMAGENET

NAME = "pacavit_tiny_p2cconv_100_0"


def _same_weights(model, state_dict):
    assert all(torch.equal(v, state_dict[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def three_classes():
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=3).state_dict()


def test_random_weights_keep_timms_default_or_the_asked_classes():
    model, weights = create_classifier(NAME)
    assert model.num_classes == 1000 and weights.source is None and weights.checkpoint == {}
    assert create_classifier(NAME, num_classes=4)[0].num_classes == 4


def test_a_file_sizes_the_classifier_and_gives_its_class_names_and_ema(tmp_path, three_classes):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in three_classes.items()}
    path = tmp_path / "last.pth.tar"
    torch.save({"state_dict": three_classes, "state_dict_ema": ema, "class_names": ["a", "b", "c"]}, path)
    model, weights = create_classifier(NAME, str(path))
    assert model.num_classes == 3 and weights.class_names == ["a", "b", "c"] and weights.source == str(path)
    _same_weights(model, three_classes)
    _same_weights(create_classifier(NAME, str(path), num_classes=3, use_ema=True)[0], ema)


def test_pretrained_is_the_released_file_through_the_mirror(release_server):
    torch.manual_seed(1)
    released = timm.create_model(NAME).state_dict()
    torch.save({"state_dict": released}, release_server / RELEASED_IMAGENET[NAME])
    model, weights = create_classifier(NAME, models.PRETRAINED)
    assert weights.source == timm.get_pretrained_cfg(NAME).url and weights.class_names is None
    _same_weights(model, released)


@pytest.mark.parametrize(
    "name, weights, num_classes, error, message",
    [
        ("pacavit_tiny_p2cconv_100", None, None, UnknownModelError, "Did you mean pacavit_tiny_p2cconv_100_0"),
        ("pacavit_convmixer_tiny_100", "pretrained", None, CheckpointError,
         "pacavit_convmixer_tiny_100 has no released ImageNet weights"),
        (NAME, "three", 10, CheckpointError, r"does not fit the 10 classes asked for \(it has 3\)"),
        (NAME, "pretrained", 10, CheckpointError, "released pacavit_tiny_p2cconv_100_0 weights classify 1000 classes"),
        (NAME, "backbone", None, CheckpointError, r"has no classifier \(head.weight\)"),
        ("pacavit_small_p2cconv_100_0", "three", None, CheckpointError, "another architecture"),
    ],
    ids=["unknown-name", "nothing-released", "other-classes", "released-other-classes", "no-classifier", "other-architecture"],
)
def test_clear_errors(tmp_path, three_classes, name, weights, num_classes, error, message):
    files = {"three": three_classes, "backbone": {k: v for k, v in three_classes.items() if not k.startswith("head.")}}
    if weights in files:
        torch.save(files[weights], tmp_path / weights)
        weights = str(tmp_path / weights)
    with pytest.raises(error, match=message):
        create_classifier(name, weights, num_classes=num_classes)


def test_a_feature_extractor_takes_a_file_without_classifier(tmp_path, three_classes):
    backbone = {k: v for k, v in three_classes.items() if not k.startswith("head.")}
    torch.save(backbone, tmp_path / "backbone.pth")
    model, _ = create_classifier(NAME, str(tmp_path / "backbone.pth"), num_classes=0)
    assert model.num_classes == 0
    _same_weights(model, backbone)
