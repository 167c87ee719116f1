"""tools/predict.py end to end, on CPU, with photos the project does not ship (scikit-learn's
china.jpg and flower.jpg, a generated picture), a broken file and paths with spaces."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from timm.data import ImageNetInfo

from tools import predict
from tools import predict_tasks
from .conftest import GENERATED_SIZE, REPO

MODEL = "pacavit_tiny_p2cconv_100_0"
DET_CONFIG = REPO / "detection" / "configs" / "tiny_coco" / "mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py"
SEG_CONFIG = (REPO / "segmentation" / "configs" / "paca_vit" / "paca_head"
              / "pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py")
SEG_SMALL = ["--cfg-options", "test_dataloader.dataset.pipeline.1.scale=(192,128)"]  # short side 128, on CPU
DIGITS = [f"digit {k}" for k in range(10)]


# -- checkpoints ----------------------------------------------------------------------------------
def classifier_checkpoint(path, num_classes: int, class_names=None, seed: int = 0, data_config=None):
    """A checkpoint as timm's CheckpointSaver writes it (``args`` is an argparse.Namespace);
    ``class_names`` and ``data_config`` as train_timm.sh adds them."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=num_classes)
    checkpoint = dict(epoch=3, arch=MODEL, state_dict=model.state_dict(), version=2, metric=50.0,
                      args=argparse.Namespace(model=MODEL, num_classes=num_classes))
    if class_names is not None:
        checkpoint["class_names"] = class_names
    if data_config is not None:
        checkpoint["data_config"] = data_config
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def detection_checkpoint(tmp_path_factory):
    """A Mask R-CNN trained for one iteration by the tiny COCO pipeline: mmengine's Runner file."""
    root = tmp_path_factory.mktemp("detection")
    subprocess.run([sys.executable, "detection/make_tiny_coco.py", "--out", root / "coco_tiny", "--train", "4",
                    "--val", "2"], cwd=REPO, check=True, capture_output=True)
    env = dict(os.environ, PACAVIT_DATASETS=str(root), OMP_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "train_mmdet.py", DET_CONFIG, "--work-dir", root / "work", "--cfg-options",
         "train_cfg.max_epochs=1", "val_cfg=None", "val_dataloader=None", "val_evaluator=None"],
        cwd=REPO / "detection", env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "work" / "epoch_1.pth"


@pytest.fixture(scope="session")
def segmentation_checkpoint(tmp_path_factory):
    """The PaCa-Tiny + PaCa head zoo model with random weights, saved as a bare state_dict (as the
    released files are: no class names inside)."""
    from mmseg.registry import MODELS

    cfg = predict_tasks.openmmlab_config(str(SEG_CONFIG), "mmseg", {"model.backbone.init_cfg": None})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("segmentation") / "pacahead_random.pth"
    torch.save(MODELS.build(cfg.model).state_dict(), path)
    return path


# -- checks ---------------------------------------------------------------------------------------
def read_run(out, photos):
    """predictions.json, with its entries checked against the inputs: input order, sizes, outputs."""
    document = json.loads((out / "predictions.json").read_text())
    entries = {os.path.basename(e["image"]): e for e in document["images"]}
    assert [os.path.basename(e["image"]) for e in document["images"]] == \
        ["china.jpg", "broken.jpg", "generated.webp", "flower.jpg"]
    assert "error" in entries["broken.jpg"] and "outputs" not in entries["broken.jpg"]
    assert not (out / "broken.png").exists()
    sizes = {"china.jpg": (640, 427), "flower.jpg": (640, 427), "generated.webp": GENERATED_SIZE}
    for name, (width, height) in sizes.items():
        assert (entries[name]["width"], entries[name]["height"]) == (width, height)
        assert entries[name]["outputs"][0] == name.rsplit(".", 1)[0] + ".png"
    return document, entries


def picture_size(out, stem):
    with Image.open(out / f"{stem}.png") as image:
        return image.size


def inputs(photos):
    return [photos["china"], str(photos["folder"])]


# -- classification ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_classify_with_class_names_from_training(photos, tmp_path, capsys):
    checkpoint = classifier_checkpoint(tmp_path / "model best.pth.tar", 10, DIGITS)
    out = tmp_path / "out dir"
    code = predict.main(["classify", *inputs(photos), "--model", MODEL, "--checkpoint", str(checkpoint),
                         "--out", str(out), "--clusters", "--batch-size", "2", "--device", "cpu"])
    assert code == 1  # the broken image, reported by name
    err = capsys.readouterr().err
    assert f"skipped {photos['folder'] / 'broken.jpg'}" in err
    document, entries = read_run(out, photos)
    assert document["task"] == "classify" and document["class_names"] == DIGITS
    for name, entry in entries.items():
        if name == "broken.jpg":
            continue
        scores = [p["score"] for p in entry["top5"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5
        assert all(p["class_name"] == DIGITS[p["label"]] for p in entry["top5"])
        width, height = entry["width"], entry["height"]
        # the photo, then the model's square input crop with the clusters, at the photo's height
        assert picture_size(out, os.path.splitext(name)[0]) == (width + height, height)


def test_classify_takes_the_input_size_the_checkpoint_was_evaluated_at(tmp_path):
    trained_at_32 = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25), crop_pct=1.0, crop_mode="center")
    checkpoint = classifier_checkpoint(tmp_path / "digits.pth.tar", 10, DIGITS, data_config=trained_at_32)
    classifier = predict_tasks.Classifier(MODEL, str(checkpoint), "cpu")
    assert classifier.data_config == trained_at_32 and classifier.header()["input_size"] == [3, 32, 32]
    assert predict_tasks.Classifier(MODEL, str(checkpoint), "cpu", img_size=48).header()["input_size"] == [3, 48, 48]
    older = classifier_checkpoint(tmp_path / "older.pth.tar", 10, DIGITS)  # before train_timm.py stored it
    assert predict_tasks.Classifier(MODEL, str(older), "cpu").header()["input_size"] == [3, 224, 224]


def test_an_image_the_pre_processing_cannot_take_is_skipped_with_why_and_the_others_predicted(tmp_path, capsys,
                                                                                              caplog):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(tmp_path / "in" / "photo.png")
    # scaled to a 248-px shorter side it would be 248x4960000 (1230 MP): minutes and gigabytes in Pillow
    Image.fromarray(rng.integers(0, 255, (1, 20_000, 3), np.uint8)).save(tmp_path / "in" / "panorama.png")
    out = tmp_path / "out"
    code = predict.main(["classify", str(tmp_path / "in"), "--model", MODEL, "--out", str(out), "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    why = ("it is 20000x1 pixels: the classifier's pre-processing scales its shorter side to 248 px before the "
           "centre crop, which makes it 4960000x248 (1230 MP), beyond Pillow's limit of 89 MP for one image: crop "
           "it to at most 1454:1 (longer side : shorter side)")
    assert f"skipped {tmp_path / 'in' / 'panorama.png'}: {why}" in err
    assert ("1 of 2 images could not be read or taken by the model and were skipped: "
            f"{tmp_path / 'in' / 'panorama.png'}") in caplog.text
    entries = {os.path.basename(e["image"]): e for e in json.loads((out / "predictions.json").read_text())["images"]}
    assert entries["panorama.png"] == dict(image=str(tmp_path / "in" / "panorama.png"), error=why)
    assert len(entries["photo.png"]["top5"]) == 5 and (out / "photo.png").exists()
    assert not (out / "panorama.png").exists()


def test_the_longest_shapes_the_pre_processing_takes(tmp_path):
    classifier = predict_tasks.Classifier(MODEL, None, "cpu")
    assert classifier.unfit(1, 1454) is None and classifier.unfit(1454, 1) is None  # 248x360592: 89.4 MP
    assert "at most 1454:1" in classifier.unfit(1, 1455)
    assert classifier.unfit(10_000, 14_000) is None  # large photos are scaled down, not refused
    trained_at_32 = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3,
                         crop_pct=1.0, crop_mode="center")
    checkpoint = classifier_checkpoint(tmp_path / "digits.pth.tar", 10, DIGITS, data_config=trained_at_32)
    assert "at most 87381:1" in predict_tasks.Classifier(MODEL, str(checkpoint), "cpu").unfit(1, 87_382)
    # detection's test pipeline fits the image into 192x128 keeping its aspect ratio: 1x385 would be 0 px high
    detector = predict_tasks.Detector(str(DET_CONFIG), None, "cpu")
    assert detector.unfit(1, 384) is None and detector.unfit(384, 1) is None
    assert detector.unfit(1, 385) == ("the test pipeline resizes it to fit 192x128 keeping its aspect ratio, which "
                                      "makes it 192x0 pixels: crop it to at most 384:1 (longer side : shorter side)")
    assert "makes it 0x192 pixels" in detector.unfit(385, 1)


@pytest.mark.slow
def test_classify_pretrained_gets_imagenet_names_through_the_loader(photos, release_server, tmp_path):
    classifier_checkpoint(release_server / f"IMNET_224_{MODEL}.pth", 1000, seed=1)
    image = photos["folder"] / "generated.webp"
    out = tmp_path / "out"
    assert predict.main(["classify", str(image), "--model", MODEL, "--checkpoint", "pretrained",
                         "--out", str(out), "--device", "cpu"]) == 0
    document = json.loads((out / "predictions.json").read_text())
    (entry,) = document["images"]
    assert document["random_weights"] is False and document["checkpoint"].endswith(f"IMNET_224_{MODEL}.pth")
    names = ImageNetInfo().label_descriptions()
    assert all(p["class_name"] == names[p["label"]] for p in entry["top5"])
    assert picture_size(out, "generated") == GENERATED_SIZE
    assert len(list((tmp_path / "cache").glob(f"*/IMNET_224_{MODEL}.pth"))) == 1  # cached under its URL's hash


@pytest.mark.slow
def test_classify_checkpoint_without_class_names_uses_indices_said_once(photos, tmp_path):
    checkpoint = classifier_checkpoint(tmp_path / "old.pth.tar", 10)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "tools/predict.py", "classify", *inputs(photos), "--model", MODEL, "--checkpoint",
         checkpoint, "--out", out, "--batch-size", "1", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("stores no class names") == 1
    assert f"could not be read or taken by the model and were skipped: {photos['folder'] / 'broken.jpg'}" \
        in result.stderr
    document, entries = read_run(out, photos)
    assert document["class_names"] is None
    assert all(p["class_name"] == f"class {p['label']}" for p in entries["china.jpg"]["top5"])
    assert picture_size(out, "china") == (640, 427)


def test_clear_errors_before_any_prediction(photos, tmp_path, segmentation_checkpoint, caplog):
    out = tmp_path / "out"
    assert predict.main(["classify", str(tmp_path / "missing.jpg"), "--model", MODEL, "--out", str(out)]) == 2
    assert "no such file or folder" in caplog.text
    assert predict.main(["classify", photos["china"], "--model", "pacavit_tiny", "--out", str(out)]) == 2
    assert "unknown model 'pacavit_tiny'" in caplog.text
    # a segmentor's checkpoint given to a classifier
    assert predict.main(["classify", photos["china"], "--model", MODEL, "--checkpoint", str(segmentation_checkpoint),
                         "--out", str(out)]) == 2
    assert "has no classifier" in caplog.text
    assert not out.exists()


def test_find_images_recurses_filters_and_skips_the_output_folder(tmp_path):
    folder = tmp_path / "my photos"
    for name in ("b.JPEG", "a.png", "deep/er/c.bmp", "d.webp", "e.jpg", "notes.txt", "out/old.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    found = predict.find_images([str(folder), "sklearn:flower.jpg", str(folder / "notes.txt")], folder / "out")
    assert [os.path.relpath(p, folder) for p in found[:5]] == \
        ["a.png", "b.JPEG", "d.webp", os.path.join("deep", "er", "c.bmp"), "e.jpg"]
    assert found[5].endswith(os.path.join("sklearn", "datasets", "images", "flower.jpg"))
    assert found[6] == str(folder / "notes.txt")  # named explicitly: tried, and reported if unreadable
    (folder / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        predict.find_images([str(folder / "empty")], folder / "out")


# -- detection and segmentation ------------------------------------------------------------------------
@pytest.mark.slow
def test_detect_boxes_masks_and_coco_names(photos, tmp_path, detection_checkpoint):
    from mmdet.datasets import CocoDataset

    out = tmp_path / "out"
    code = predict.main(["detect", *inputs(photos), "--config", str(DET_CONFIG), "--checkpoint",
                         str(detection_checkpoint), "--out", str(out), "--score-thr", "0", "--clusters",
                         "--device", "cpu"])
    assert code == 1
    document, entries = read_run(out, photos)
    coco = list(CocoDataset.METAINFO["classes"])
    assert document["class_names"] == coco and document["score_thr"] == 0
    for name, entry in entries.items():
        if name == "broken.jpg":
            continue
        width, height = entry["width"], entry["height"]
        assert picture_size(out, os.path.splitext(name)[0]) == (2 * width, height)  # photo | clusters
        instances = entry["instances"]
        assert instances, f"no detections at score >= 0 on {name}"
        assert [i["score"] for i in instances] == sorted((i["score"] for i in instances), reverse=True)
        for instance in instances:
            assert instance["class_name"] == coco[instance["label"]]
            x1, y1, x2, y2 = instance["bbox"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
            mask = mask_utils.decode({"size": instance["mask"]["size"], "counts": instance["mask"]["counts"].encode()})
            assert mask.shape == (height, width)
            ys, xs = np.nonzero(mask)
            if len(ys):  # the mask lies in its box
                assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1


@pytest.mark.slow
def test_segment_label_maps_fractions_and_ade20k_names(photos, tmp_path, segmentation_checkpoint):
    from mmseg.datasets import ADE20KDataset

    out = tmp_path / "out"
    code = predict.main(["segment", *inputs(photos), "--config", str(SEG_CONFIG), "--checkpoint",
                         str(segmentation_checkpoint), "--out", str(out), "--device", "cpu", "--batch-size", "4",
                         "--clusters", *SEG_SMALL])
    assert code == 1
    document, entries = read_run(out, photos)
    ade = list(ADE20KDataset.METAINFO["classes"])
    assert document["class_names"] == ade
    for name, entry in entries.items():
        if name == "broken.jpg":
            continue
        stem = os.path.splitext(name)[0]
        width, height = entry["width"], entry["height"]
        assert entry["outputs"] == [f"{stem}.png", f"{stem}_labels.png"]
        drawn_width, drawn_height = picture_size(out, stem)
        assert drawn_height == height and drawn_width > 2 * width  # photo | clusters | legend
        with Image.open(out / f"{stem}_labels.png") as image:
            assert image.mode == "L" and image.size == (width, height)
            labels = np.asarray(image)
        counts = np.bincount(labels.ravel(), minlength=len(ade))
        assert [c["label"] for c in entry["classes"]] == sorted(np.flatnonzero(counts), key=lambda k: -counts[k])
        for c in entry["classes"]:
            assert c["class_name"] == ade[c["label"]]
            assert c["fraction"] == pytest.approx(counts[c["label"]] / labels.size, abs=1e-6)
        assert sum(c["fraction"] for c in entry["classes"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["detect", "--config", "c.py", "--checkpoint", "w.pth", "--score-thr", "2"], "--score-thr is a score between 0 and 1, got 2.0"),
    (["classify", "--model", MODEL, "--device", "cuda"], "--device cuda: no CUDA GPU is visible here"),
    (["classify", "--model", MODEL, "--img-size", "0"], "--img-size must be at least 1"),
])
def test_bad_option_values_are_one_usage_line(extra, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    task, *options = extra
    with pytest.raises(SystemExit) as stop:
        predict.parse_args([task, "photo.jpg", "--out", "out", *options])
    assert stop.value.code == 2 and message in capsys.readouterr().err
