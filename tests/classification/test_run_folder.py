"""What train_timm.sh does with its run folder: exact resume after a real kill, broken checkpoints,
one launcher per run, run names; and evaluation that counts every image once."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from classification import cls_common
import models  # noqa: F401  (registers the pacavit_* names with timm)
from classification.make_digits_dataset import export
from tests.run_folder_checks import refused_while_running, wait_ended, wait_gone

from .cls_helpers import CLS_DIR, MODEL, run, run_folder, train_cmd, write_colour_dataset

EPOCHS = 3


@pytest.fixture(scope="module")
def digits_env(cls_env, tmp_path_factory):
    """The project's digits, cut to 6 training and 2 validation scans per digit (60 + 20 images)."""
    root = tmp_path_factory.mktemp("digits") / "DIGITS"
    export(str(root), size=32)
    for split, keep in (("train", 6), ("val", 2)):
        for folder in (root / split).iterdir():
            for image in sorted(folder.iterdir())[keep:]:
                image.unlink()
    return dict(cls_env, PACAVIT_DATASETS=str(root.parent))


def digits_cmd(tag, resume=0):
    """Every source of randomness on: crops, mixup (numpy), drop path (torch), a loader worker."""
    return train_cmd("exact", tag, "--epochs", EPOCHS, "-b", 20, "-j", 1, "--mixup", 0.2, "--drop-path", 0.1,
                     "--model-ema", "--model-ema-decay", 0.9, resume=resume, dataset="DIGITS")


def worker_pids(run_dir):
    """The train_timm.py processes writing into ``run_dir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"train_timm.py" in b" ".join(cmdline) and str(run_dir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def summary_without_times(folder):
    with open(folder / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if not k.endswith("epoch_time")} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_one(digits_env):
    straight = run(digits_cmd("straight"), digits_env)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    straight_done = run_folder(digits_env, "exact", "straight", dataset="DIGITS")

    run_dir = done_dir = run_folder(digits_env, "exact", "killed", dataset="DIGITS")
    job = subprocess.Popen([str(c) for c in digits_cmd("killed")], env=digits_env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "last.pth.tar").exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, "training ended before it could be killed"
        for pid in worker_pids(run_dir):  # kill -9 the training process itself, mid-run
            os.kill(pid, signal.SIGKILL)
        assert wait_ended(job, timeout=120) != 0
        # the killed processes and their loader workers (killed with them) take a moment to go
        wait_gone(worker_pids(run_dir))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    saved_epoch = torch.load(run_dir / "last.pth.tar", weights_only=True)["epoch"]
    assert saved_epoch < EPOCHS - 1 and not (run_dir / "FINISHED").exists()

    # the last checkpoint is found truncated (a full disk while saving): the run goes on from the
    # newest intact one, and still ends exactly where the uninterrupted run ended
    last = run_dir / "last.pth.tar"
    data = last.read_bytes()
    last.unlink()  # a new file: the kept checkpoint-N.pth.tar is a hard link to the same data
    last.write_bytes(data[: len(data) // 2])
    resumed = run(digits_cmd("killed", resume=1), digits_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{last} is not a readable PyTorch checkpoint" in resumed.stderr
    fallback = run_dir / f"checkpoint-{saved_epoch}.pth.tar"
    assert f"resuming from the newest intact checkpoint of this run instead: {fallback}" in resumed.stderr

    expected = torch.load(straight_done / "last.pth.tar", weights_only=True)
    final = torch.load(done_dir / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert expected[key].keys() == final[key].keys()
        assert all(torch.equal(expected[key][name], final[key][name]) for name in expected[key]), key
    assert summary_without_times(done_dir) == summary_without_times(straight_done)
    assert final["class_names"] == [str(digit) for digit in range(10)]


def test_no_intact_checkpoint_names_the_files_to_delete(cls_env):
    run_dir = run_folder(cls_env, "broken", "t1")
    run_dir.mkdir(parents=True)
    (run_dir / "last.pth.tar").write_bytes(b"PK\x03\x04 cut short")
    result = run(train_cmd("broken", "t1", resume=1), cls_env)
    # the training's rank 0 finds it (the launcher only passes --auto-resume): a failed training
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{run_dir / 'last.pth.tar'} is not a readable PyTorch checkpoint" in result.stderr
    assert f"rm {run_dir / 'last.pth.tar'}" in result.stderr
    assert "Continue it with Resume=1" not in result.stderr  # no advice that would fail the same way


@pytest.mark.slow
def test_one_launcher_per_run_folder(cls_env, tmp_path):
    cmd = train_cmd("busy", "t1", "--epochs", 1000)
    run_dir = run_folder(cls_env, "busy", "t1")
    refused_while_running(cmd, run_dir, cls_env, tmp_path)
    # nothing of the first launch is left: its lock files no longer keep anyone out
    after = run(cmd, cls_env)
    assert after.returncode == 2 and "exists: pass Resume=1" in after.stderr, after.stderr


def test_run_names_are_checked_before_any_work(cls_env):
    done_dir = run_folder(cls_env, "names", "t1")
    done_dir.mkdir(parents=True)
    (done_dir / "FINISHED").write_text("finished")
    # tab completion's trailing slash is dropped: this is the finished run above
    slash = run(train_cmd("names/", "t1/", dataset="TINY/"), cls_env)
    assert slash.returncode == 0 and f"{done_dir} is a finished experiment; nothing to do" in slash.stdout, slash.stderr
    for exp, tag, dataset, message in [("names", "a/b", "TINY", "Tag 'a/b' contains '/'"),
                                       ("names", "t1", "sub/TINY", "Dataset_name 'sub/TINY' contains '/'"),
                                       ("a/b", "t1", "TINY", "Exp_name 'a/b' contains '/'"),
                                       ("names", "..", "TINY", "Tag cannot be '..'"),
                                       ("names", "/", "TINY", "Tag is empty")]:
        result = run(train_cmd(exp, tag, dataset=dataset), cls_env)
        assert result.returncode == 2 and message in result.stderr, (tag, result.stderr)
    work_dirs = Path(cls_env["PACAVIT_WORK_DIRS"]) / "classification"
    assert not (work_dirs / "a").exists() and not list(work_dirs.glob("names/*_a")), "nothing may be created"


@pytest.fixture
def val_with_a_corrupt_image(tmp_path):
    """35 readable validation images and one corrupt one."""
    root = write_colour_dataset(tmp_path / "CORRUPT", {"train": 1, "val": 12})
    broken = root / "val" / "class1" / "5.png"
    broken.write_bytes(broken.read_bytes()[:40])  # a PNG cut short
    return root, broken


def test_evaluation_stops_at_an_unreadable_image_and_names_it(val_with_a_corrupt_image):
    root, broken = val_with_a_corrupt_image
    loader = cls_common.build_eval_loader(str(root), "val", dict(input_size=(3, 32, 32), interpolation="bilinear",
                                                                   mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                                                                   crop_mode="center"), 8, 0)
    model = timm.create_model(MODEL, num_classes=3)
    with pytest.raises(cls_common.UsageError, match=f"cannot read image {broken}"):
        cls_common.evaluate(model, loader, torch.device("cpu"))


@pytest.mark.slow
def test_validate_never_counts_a_neighbour_in_place_of_a_corrupt_image(val_with_a_corrupt_image, cls_env, tmp_path):
    root, broken = val_with_a_corrupt_image
    weights = tmp_path / "weights.pth"
    torch.save(timm.create_model(MODEL, num_classes=3).state_dict(), weights)
    result = run([sys.executable, CLS_DIR / "validate.py", "--model", MODEL, "--checkpoint", weights,
                  "--data-dir", root, "--img-size", 32, "-j", 1], cls_env)  # the error crosses a worker
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: cannot read image {broken}" in result.stderr and "Traceback" not in result.stderr
    assert "36 images" not in result.stdout + result.stderr
    shutil.move(broken, tmp_path / "removed.png")  # what the message says to do
    fixed = run([sys.executable, CLS_DIR / "validate.py", "--model", MODEL, "--checkpoint", weights,
                 "--data-dir", root, "--img-size", 32, "-j", 1], cls_env)
    assert fixed.returncode == 0 and "(35 images" in fixed.stdout + fixed.stderr, fixed.stderr
