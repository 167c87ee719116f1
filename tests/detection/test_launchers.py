"""train_mmdet.sh and its run folder: one launcher per run, run names, broken checkpoints, and
``--cfg-options *.num_workers=0`` on every zoo config."""
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from models.checkpoint import read_checkpoint
from runtime.run_folder import resume_point
from tests.run_folder_checks import (
    TwoNodes,
    check_num_workers_zero,
    check_sigterm_stop,
    refused_while_running,
    write_broken_checkpoint,
    zoo_configs,
)

from .conftest import DETECTION, TINY_CONFIG

NAME = "mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(exp, tag, remove_old=0, *others):
    return ["./train_mmdet.sh", TINY_CONFIG, remove_old, exp, tag, 0, 1, free_port(), *others]


def run(cmd, env):
    return subprocess.run([str(c) for c in cmd], env=env, cwd=DETECTION, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config", zoo_configs(DETECTION), ids=lambda p: p.stem)
def test_num_workers_zero_on_any_zoo_config(config):
    check_num_workers_zero(config, "mmdet")


def test_resume_point_skips_a_broken_latest_checkpoint(tmp_path):
    torch.save({"meta": {"epoch": 1}, "state_dict": {}, "message_hub": {}}, tmp_path / "epoch_1.pth")
    write_broken_checkpoint(tmp_path, "epoch_2.pth")
    reports = []
    assert resume_point("openmmlab", tmp_path, report=reports.append) == tmp_path / "epoch_1.pth"
    assert f"{tmp_path / 'epoch_2.pth'} is not a readable PyTorch checkpoint" in reports[0]
    assert reports[1] == f"resuming from the newest intact checkpoint of this run instead: {tmp_path / 'epoch_1.pth'}"


def test_run_names_are_checked_before_any_work(launcher_env):
    work_root = Path(launcher_env["PACAVIT_WORK_DIRS"]) / "detection"
    finished = work_root / "names" / f"{NAME}_t1"
    finished.mkdir(parents=True)
    (finished / "FINISHED").write_text("finished")
    slash = run(launch("names/", "t1/"), launcher_env)
    assert slash.returncode == 0 and "finished experiment; nothing to do" in slash.stdout, slash.stderr
    for exp, tag, message in [("names", "a/b", "Tag 'a/b' contains '/'"), ("x/y", "t1", "Exp_name 'x/y' contains '/'"),
                              ("names", "..", "Tag cannot be '..'")]:
        result = run(launch(exp, tag), launcher_env)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(p.name for p in work_root.iterdir()) == ["names"]
    assert sorted(p.name for p in (work_root / "names").iterdir()) == [f"{NAME}_t1"]


@pytest.mark.slow
def test_one_launcher_per_run_folder_and_no_resume_loop(launcher_env, tmp_path):
    work_dir = Path(launcher_env["PACAVIT_WORK_DIRS"]) / "detection" / "locks" / f"{NAME}_t1"
    no_val = ["val_cfg=None", "val_dataloader=None", "val_evaluator=None"]
    cmd = launch("locks", "t1", 1, "--cfg-options", "train_cfg.max_epochs=1000", *no_val)
    refused_while_running(cmd, work_dir, launcher_env, tmp_path, cwd=DETECTION)

    # nothing of that launch is left: the next one gets the run, whose only checkpoint is broken
    write_broken_checkpoint(work_dir, alone=True)
    result = run(launch("locks", "t1", 0), launcher_env)
    # rank 0 of the training finds it (the launcher no longer looks): a failed training, exit 1
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{work_dir / 'epoch_1.pth'} is not a readable PyTorch checkpoint" in result.stderr
    assert f"rm {work_dir / 'epoch_1.pth'} {work_dir / 'last_checkpoint'}" in result.stderr
    assert "rerun with Remove_old=0" not in result.stderr


@pytest.mark.slow
def test_two_nodes_stop_on_sigterm_and_resume_to_the_end(launcher_env, tmp_path):
    """Two launchers of one run (NNODES=2) on this host: node 0 alone removes the old run, SIGTERM
    saves a checkpoint and each launcher says so, and the relaunched nodes resume from it and finish."""
    work_dir = Path(launcher_env["PACAVIT_WORK_DIRS"]) / "detection" / "nodes" / f"{NAME}_t1"
    work_dir.mkdir(parents=True)
    (work_dir / "old.log").write_text("an unfinished earlier run")
    no_val = ["val_cfg=None", "val_dataloader=None", "val_evaluator=None"]

    def launch(remove_old, epochs):
        return ["./train_mmdet.sh", TINY_CONFIG, remove_old, "nodes", "t1", 0, 1, 0, "--yes",
                "--cfg-options", f"train_cfg.max_epochs={epochs}", *no_val]

    nodes = TwoNodes(launch(1, 1000), launcher_env, tmp_path, cwd=DETECTION, name="preempted")
    nodes.wait_for_output("Epoch(train)")
    nodes.sigterm()
    assert nodes.wait() == [143, 143]
    saved = resume_point("openmmlab", work_dir)
    assert saved.name.startswith("iter_")
    for rank in (0, 1):
        check_sigterm_stop(nodes.output(rank), saved, "rerun with Remove_old=0 to resume it")
    assert not (work_dir / "old.log").exists() and not (work_dir / "FINISHED").exists()
    # the resumed run finishes the interrupted epoch from the iteration after the saved one
    epochs = read_checkpoint(str(saved))["meta"]["epoch"] + 1
    iters_per_epoch = int(re.search(r"Epoch\(train\)\s+\[\d+\]\[\s*\d+/(\d+)\]", nodes.output(0)).group(1))

    nodes = TwoNodes(launch(0, epochs), launcher_env, tmp_path, cwd=DETECTION, name="resumed")
    assert nodes.wait() == [0, 0], nodes.output(0)[-3000:] + nodes.output(1)[-3000:]
    assert f"finished: {work_dir}" in nodes.output(0)
    assert f"node 1 done; node 0 marks {work_dir} finished" in nodes.output(1)
    assert (work_dir / "FINISHED").is_file() and (work_dir / f"epoch_{epochs}.pth").is_file()
    # as many iterations as a run never interrupted (mmengine's own loop would train that epoch again)
    assert read_checkpoint(str(work_dir / f"epoch_{epochs}.pth"))["meta"]["iter"] == epochs * iters_per_epoch


@pytest.mark.slow
def test_failures_a_resume_cannot_fix_end_with_their_cause_not_a_resume_hint(launcher_env):
    work_dir = Path(launcher_env["PACAVIT_WORK_DIRS"]) / "detection" / "hints" / f"{NAME}_t1"
    reported = run(launch("hints", "t1", 1, "--amp"), launcher_env)
    assert reported.returncode == 1
    # the worker's own error line comes last, below torchrun's failure report
    assert reported.stderr.strip().splitlines()[-2:] == [
        "training failed: error: --amp needs a CUDA device; drop --amp to train in float32 on CPU",
        f"{work_dir} is kept, but a resume would stop the same way: fix the cause and launch again",
    ]
    crashed = run(launch("hints", "t1", 1, "--cfg-options", "model.backbone.no_such_option=1"), launcher_env)
    assert crashed.returncode == 1
    last = crashed.stderr.strip().splitlines()[-1]
    assert last.startswith("training failed before its first checkpoint: TypeError: ") and "no_such_option" in last
    for result in (reported, crashed):
        assert "Remove_old=0" not in result.stderr and "resume it" not in result.stderr


def test_mistakes_in_the_command_are_one_line_before_any_folder_or_process(launcher_env, tmp_path):
    broken = tmp_path / "broken_config.py"
    broken.write_text(f"_base_ = '{DETECTION / TINY_CONFIG}'\nmodel = dict(backbone=dict(init_cfg=None)\n")
    for others, message in [
        (["--bogus"], "train_mmdet.py: error: unrecognized arguments: --bogus"),
        (["--cfg-options", "train_cfg.max_epochs=abc"],
         "error: --cfg-options train_cfg.max_epochs='abc': the config's train_cfg.max_epochs is 2, so the value must "
         "be an integer"),
        (["--cfg-options", "train_dataloader.dataset.data_root=/no/such/folder"],
         "error: dataset folder /no/such/folder (train_dataloader) not found."),
        (["--cfg-options", "auto_scale_lr=None", "--auto-scale-lr"],
         f"error: --auto-scale-lr needs auto_scale_lr.base_batch_size in {TINY_CONFIG}"),
    ]:
        result = run(launch("mistakes", "t1", 1, *others), launcher_env)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "torchrun" not in result.stdout + result.stderr  # nothing was started
    result = run(["./train_mmdet.sh", broken, 1, "mistakes", "t1", 0, 1, free_port()], launcher_env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {broken}: the config does not load (SyntaxError: "), result.stderr
    assert not (Path(launcher_env["PACAVIT_WORK_DIRS"])).exists()  # no run folder was made
    result = run(["./test_mmdet.sh", TINY_CONFIG, "missing.pth", 0, 1, free_port(), "--show-dir"], launcher_env)
    assert result.returncode == 2 and "test_mmdet.py: error: argument --show-dir: expected one argument" in result.stderr
    assert "torchrun" not in result.stdout + result.stderr
