"""What an ImageFolder must not do silently: symlink loops and empty class folders (refused with the
path named), 16-bit PNGs (read at their real brightness)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset

from classification import cls_common, train_timm, validate
from .cls_helpers import CLS_DIR, MODEL, write_colour_dataset

TRAIN_IMAGES = 3 * 2  # write_colour_dataset(..., {"train": 2, "val": 1})


@pytest.fixture
def data(tmp_path):
    return write_colour_dataset(tmp_path / "data", {"train": 2, "val": 1})


def test_a_link_back_up_the_tree_is_refused_with_its_path(data):
    (data / "train" / "class0" / "up").symlink_to("..")
    # what timm's walk makes of it: the images again at every level, until the path is too long
    assert len(create_dataset("", root=str(data), split="train")) > 10 * TRAIN_IMAGES
    with pytest.raises(cls_common.UsageError, match=f"{data / 'train' / 'class0' / 'up'} is a symlink loop"):
        cls_common.class_map_for(str(data), "val")


def test_a_link_to_the_split_itself_is_refused_not_made_a_class(data):
    (data / "train" / "all").symlink_to(".")
    with pytest.raises(cls_common.UsageError, match=f"{data / 'train' / 'all'} is a symlink loop: it leads back "
                                                    f"to {data / 'train'}"):
        cls_common.class_map_for(str(data), "val")
    (data / "train" / "all").unlink()
    (data / "val" / "all").symlink_to(".")  # the split being evaluated is checked as well
    with pytest.raises(cls_common.UsageError, match=f"{data / 'val' / 'all'} is a symlink loop"):
        cls_common.class_map_for(str(data), "val")


def test_a_training_split_of_another_name_is_checked_too(data):
    (data / "train").rename(data / "train_full")
    (data / "train_full" / "class0" / "up").symlink_to("..")
    with pytest.raises(cls_common.UsageError, match=f"{data / 'train_full' / 'class0' / 'up'} is a symlink loop"):
        cls_common.training_class_map(str(data), "train_full", "val")
    (data / "train_full" / "class0" / "up").unlink()
    assert cls_common.training_class_map(str(data), "train_full", "val") == {"class0": 0, "class1": 1, "class2": 2}


def test_two_links_to_one_folder_are_refused_and_a_link_elsewhere_is_fine(data, tmp_path):
    elsewhere = write_colour_dataset(tmp_path / "storage", {"extra": 1}) / "extra" / "class0"
    (data / "train" / "class3").symlink_to(elsewhere)  # class folders kept on another disk: usual
    assert cls_common.class_map_for(str(data), "val") == {f"class{k}": k for k in range(4)}
    (data / "train" / "class4").symlink_to(elsewhere)
    with pytest.raises(cls_common.UsageError, match="is the same folder as .*counted twice"):
        cls_common.class_map_for(str(data), "val")


def test_an_empty_class_folder_is_refused_with_its_path(data):
    (data / "train" / "class3").mkdir()
    (data / "train" / "class3" / "README.txt").write_text("no images here")
    with pytest.raises(cls_common.UsageError, match=f"class folder {data / 'train' / 'class3'} holds no images"):
        cls_common.class_map_for(str(data), "val")
    (data / "train" / "class3" / "README.txt").unlink()
    (data / "train" / "class3").rmdir()
    (data / "val" / "class2" / "0.png").unlink()  # a class without validation images: still learnable
    assert cls_common.class_map_for(str(data), "val") == {f"class{k}": k for k in range(3)}


@pytest.mark.slow
def test_validate_reports_a_loop_in_one_line_before_loading_the_model(data):
    (data / "val" / "class1" / "up").symlink_to("..")
    result = subprocess.run([sys.executable, "validate.py", "--data-dir", str(data), "--model", MODEL,
                             "--checkpoint", str(data / "never read.pth"), "--img-size", "32"], cwd=CLS_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {data / 'val' / 'class1' / 'up'} is a symlink loop" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluation_reads_a_16_bit_png_as_its_8_bit_original(data):
    eight_bit = np.asarray(Image.open(data / "val" / "class0" / "0.png").convert("L"))
    Image.fromarray(eight_bit.astype(np.uint16) * 257).save(data / "val" / "class0" / "0.png")  # mode I;16
    Image.fromarray(eight_bit).save(data / "val" / "class1" / "0.png")
    dataset = cls_common.EvalImageFolder(str(data / "val"), class_map=cls_common.class_map_for(str(data), "val"))
    dataset.transform = np.asarray
    by_name = {os.path.relpath(dataset.filename(i, absolute=True), data / "val"): dataset[i][0]
               for i in range(len(dataset))}
    np.testing.assert_array_equal(by_name[os.path.join("class0", "0.png")], by_name[os.path.join("class1", "0.png")])


def test_training_reads_a_16_bit_png_as_its_8_bit_original_and_skips_a_broken_image_by_name(data, caplog):
    eight_bit = np.asarray(Image.open(data / "train" / "class0" / "0.png").convert("L"))
    Image.fromarray(eight_bit.astype(np.uint16) * 257).save(data / "train" / "class0" / "0.png")  # mode I;16
    Image.fromarray(eight_bit).save(data / "train" / "class1" / "0.png")
    (data / "train" / "class2" / "0.png").write_bytes(b"<html>not an image</html>")
    dataset = cls_common.TrainImageFolder(str(data / "train"), class_map=cls_common.class_map_for(str(data), "val"))
    dataset.transform = np.asarray
    images = {os.path.relpath(dataset.filename(i, absolute=True), data / "train"): dataset[i] for i in range(len(dataset))}
    sixteen, eight = images[os.path.join("class0", "0.png")], images[os.path.join("class1", "0.png")]
    np.testing.assert_array_equal(sixteen[0], eight[0])
    assert sixteen[0].dtype == np.uint8 and sixteen[0].shape[-1] == 3 and sixteen[1] == 0
    # the broken one gives way to the next image (timm's rule), and the warning names it
    broken, following = images[os.path.join("class2", "0.png")], images[os.path.join("class2", "1.png")]
    np.testing.assert_array_equal(broken[0], following[0])
    assert f"skipped unreadable training image {data / 'train' / 'class2' / '0.png'}" in caplog.text


def _constant_classifier(path, class_names):
    """A train_timm.py-style checkpoint whose classifier always answers its first class."""
    model = timm.create_model(MODEL, num_classes=len(class_names))
    torch.nn.init.zeros_(model.head.weight)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([10.0] + [0.0] * (len(class_names) - 1)))
    torch.save({"state_dict": model.state_dict(), "class_names": class_names}, path)
    return path


def test_validate_labels_the_images_through_the_checkpoints_class_names(data, tmp_path):
    checkpoint = _constant_classifier(tmp_path / "reversed.pth", ["class2", "class1", "class0"])
    for image in (data / "val" / "class0").iterdir():
        image.unlink()
    (data / "val" / "class0").rmdir()  # a subset of the classes: class2 and class1, one image each
    results = tmp_path / "results.json"
    validate.main(["--model", MODEL, "--checkpoint", str(checkpoint), "--data-dir", str(data), "--img-size", "32",
                   "-j", "0", "--results-file", str(results)])
    scores = json.loads(results.read_text())
    assert scores["top1"] == 50.0 and scores["num_classes"] == 3  # the class2 image is the checkpoint's class 0
    shutil.rmtree(data / "train")  # a validation set alone, whose folder names are another set
    (data / "val" / "class1").rename(data / "val" / "one")
    with pytest.raises(cls_common.UsageError, match=r"reversed.pth was trained on other classes: .*val has one, "
                                                    r"which are not among its 3 \(class2, class1, class0\)"):
        validate.main(["--model", MODEL, "--checkpoint", str(checkpoint), "--data-dir", str(data), "--img-size", "32"])


def test_training_checks_the_validation_images_before_its_first_epoch(data, tmp_path, caplog):
    (data / "val" / "class2" / "0.png").write_bytes(b"<html>a saved error page</html>")
    args = ["-c", str(CLS_DIR / "configs" / "digits_demo.yml"), "--model", MODEL, "--data-dir", str(data),
            "--output", str(tmp_path / "run"), "--epochs", "1", "-b", "3", "-j", "0", "--img-size", "32"]
    with pytest.raises(cls_common.UsageError, match=r"1 validation image\(s\) cannot be read: .*class2/0.png"):
        train_timm.main(args)
    assert not (tmp_path / "run" / "summary.csv").exists()  # stopped before training
    (data / "val" / "class2" / "0.png").unlink()
    loader = cls_common.build_eval_loader(str(data), "val", dict(input_size=(3, 32, 32)), 2, 0)
    with caplog.at_level("INFO", logger="pacavit"):
        cls_common.check_evaluation_images(loader)
    assert "validation images readable: 2 checked" in caplog.text
