"""End to end on the tiny synthetic COCO set, on CPU: train through train_mmdet.sh, resume from the
Runner's own checkpoint (torch.load weights_only=True), evaluate with test_mmdet.sh."""
import json
import math
import subprocess
import sys

import pytest
import torch
from mmdet.datasets import CocoDataset

from .conftest import DETECTION, TINY_CONFIG
from runtime.openmmlab import train_main

NAME = "mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco_t1"


def run(cmd, env, expect_ok=True):
    result = subprocess.run([str(c) for c in cmd], env=env, cwd=DETECTION, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == expect_ok, output[-4000:]
    return output


def logged_losses(work_dir):
    """Every loss value in the Runner's scalar logs."""
    losses = []
    for scalars in work_dir.glob("*/vis_data/scalars.json"):
        for line in scalars.read_text().splitlines():
            losses += [v for k, v in json.loads(line).items() if k.startswith("loss")]
    return losses


def test_tiny_coco_is_read_by_mmdet_unchanged(datasets_root):
    dataset = CocoDataset(
        data_root=str(datasets_root / "coco_tiny"), ann_file="annotations/instances_train2017.json",
        data_prefix=dict(img="train2017/"), pipeline=[],
    )
    assert len(dataset) == 4 and len(dataset.metainfo["classes"]) == 80
    instances = [i for sample in dataset for i in sample["instances"]]
    assert instances and all(len(i["mask"][0]) >= 6 and i["bbox"][2] > i["bbox"][0] for i in instances)


@pytest.mark.slow
def test_train_resume_and_test(launcher_env, tmp_path):
    work_dir = tmp_path / "work_dirs" / "detection" / "smoke" / NAME
    no_val = ["val_cfg=None", "val_dataloader=None", "val_evaluator=None"]

    # one epoch through the launcher: the run is marked finished and never retrained
    run(["./train_mmdet.sh", TINY_CONFIG, 1, "smoke", "t1", 0, 1, 29631,
         "--cfg-options", "train_cfg.max_epochs=1", *no_val], launcher_env)
    assert (work_dir / "epoch_1.pth").is_file() and (work_dir / "FINISHED").is_file()
    losses = logged_losses(work_dir)
    assert losses and all(math.isfinite(v) for v in losses)
    output = run(["./train_mmdet.sh", TINY_CONFIG, 1, "smoke", "t1", 0, 1, 29631, "--yes"], launcher_env,
                 expect_ok=False)
    assert "finished experiment" in output

    # a second epoch resumes from epoch_1.pth, message hub and optimizer state included; a direct
    # python run marks its work dir FINISHED as the launcher's does
    (work_dir / "FINISHED").unlink()
    output = run([sys.executable, "train_mmdet.py", TINY_CONFIG, "--work-dir", work_dir,
                  "--cfg-options", "train_cfg.max_epochs=2", *no_val], launcher_env)
    assert "resumed epoch: 1" in output
    assert (work_dir / "epoch_2.pth").is_file() and (work_dir / "FINISHED").is_file()

    show_dir = tmp_path / "show"
    output = run(["./test_mmdet.sh", TINY_CONFIG, work_dir / "epoch_2.pth", 0, 1, 29632,
                  "--show-dir", show_dir], launcher_env)
    for metric in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_75"):
        assert f"{metric}: " in output
    assert len(list(show_dir.rglob("*.png"))) == 2


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--amp"], {}, "--amp needs a CUDA device"),
        ([], {"PACAVIT_DATASETS": "/nonexistent"}, "dataset folder /nonexistent/coco_tiny/ .* not found"),
    ],
    ids=["amp-on-cpu", "missing-dataset"],
)
def test_clear_errors_before_any_work(extra, env, message, monkeypatch, tmp_path):
    if extra == ["--amp"] and torch.cuda.is_available():
        pytest.skip("--amp is allowed where CUDA is available")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=message):
        train_main("mmdet", "detection", [str(DETECTION / TINY_CONFIG), "--work-dir", str(tmp_path), *extra])
    assert not any(tmp_path.iterdir())
