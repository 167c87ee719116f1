"""End to end on the tiny synthetic ADE20K, on CPU: train_mmseg.sh, test_mmseg.sh, get_flops.py."""
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from runtime.run_folder import resume_point
from tests.run_folder_checks import (
    TwoNodes,
    check_num_workers_zero,
    check_sigterm_stop,
    refused_while_running,
    write_broken_checkpoint,
    zoo_configs,
)

REPO = Path(__file__).resolve().parents[2]
SEGMENTATION = REPO / "segmentation"
PACAHEAD_TINY = "configs/paca_vit/paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py"
UPERNET_TINY = "configs/paca_vit/upernet/upernet_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py"

# 64x64 crops of the 64x96 tiny images, data loading in the main process (persistent_workers follows
# num_workers=0 by itself), no ImageNet download (the pipeline indices are those of mmseg's ADE20K
# base config).
SMALL = [
    "model.backbone.init_cfg=None",
    "model.data_preprocessor.size=(64,64)",
    "test_dataloader.dataset.pipeline.1.scale=(96,64)",
    "test_dataloader.num_workers=0",
]
TRAIN_SMALL = SMALL + [
    "train_dataloader.dataset.pipeline.2.scale=(96,64)",
    "train_dataloader.dataset.pipeline.3.crop_size=(64,64)",
    "train_dataloader.num_workers=0",
    "train_cfg.val_interval=1000",  # evaluation is test_mmseg.sh's job here
    "default_hooks.logger.interval=1",
]


def run(args, env, expect_ok=True) -> str:
    result = subprocess.run(
        [str(a) for a in args], env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == expect_ok, output[-4000:]
    return output


@pytest.fixture
def env(tiny_ade, tmp_path):
    return dict(os.environ, PACAVIT_DATASETS=str(tiny_ade), PACAVIT_WORK_DIRS=str(tmp_path / "work_dirs"))


def train(config, iters, env, port, remove_old="1", expect_ok=True) -> str:
    return run(
        [SEGMENTATION / "train_mmseg.sh", config, remove_old, "ci", "tiny", "0", "1", port,
         "--cfg-options", *TRAIN_SMALL, f"train_cfg.max_iters={iters}", f"default_hooks.checkpoint.interval={iters}"],
        env, expect_ok,
    )


def logged_losses(work_dir: Path) -> list:
    """The training iterations logged by the latest run in ``work_dir``."""
    scalars = sorted(work_dir.glob("*/vis_data/scalars.json"))[-1]
    records = [json.loads(line) for line in scalars.read_text().splitlines()]
    return [r for r in records if "loss" in r]


def experiment_dir(env, config) -> Path:
    return Path(env["PACAVIT_WORK_DIRS"]) / "segmentation" / "ci" / f"{Path(config).stem}_tiny"


@pytest.mark.slow
def test_paca_head_train_resume_test_and_keep_finished(env, tmp_path, free_port):
    train(PACAHEAD_TINY, 1, env, free_port)
    work_dir = experiment_dir(env, PACAHEAD_TINY)
    assert (work_dir / "iter_1.pth").is_file() and (work_dir / "FINISHED").is_file()

    # an interrupted run (no FINISHED mark) resumes from its latest checkpoint with Remove_old=0
    (work_dir / "FINISHED").unlink()
    output = train(PACAHEAD_TINY, 2, env, free_port, remove_old="0")
    assert "resumed" in output.lower()
    assert (work_dir / "iter_2.pth").is_file() and (work_dir / "FINISHED").is_file()
    (record,) = logged_losses(work_dir)
    assert record["iter"] == 2
    for key in ("decode.loss_ce", "paca.loss_ce"):
        assert math.isfinite(record[key]) and record[key] > 0

    show_dir = tmp_path / "show"
    output = run(
        [SEGMENTATION / "test_mmseg.sh", PACAHEAD_TINY, work_dir / "iter_2.pth", "0", "1", free_port,
         "--show-dir", show_dir, "--cfg-options", *SMALL],
        env,
    )
    miou = float(re.search(r"mIoU: (\d+\.\d+)", output).group(1))
    assert 0.0 <= miou <= 100.0
    assert len(list(show_dir.rglob("*.png"))) == 2  # one per validation image

    # a finished experiment is never deleted or retrained
    output = train(PACAHEAD_TINY, 2, env, free_port, remove_old="1", expect_ok=False)
    assert "finished experiment" in output
    assert (work_dir / "iter_2.pth").is_file()


@pytest.mark.slow
def test_upernet_train(env, free_port):
    train(UPERNET_TINY, 1, env, free_port)
    work_dir = experiment_dir(env, UPERNET_TINY)
    assert (work_dir / "iter_1.pth").is_file()
    (record,) = logged_losses(work_dir)
    assert all(math.isfinite(record[key]) and record[key] > 0 for key in ("decode.loss_ce", "aux.loss_ce"))


def test_get_flops_params_of_paca_tiny_with_paca_head(capsys):
    """The seed table: PaCa-Tiny + PaCa head has 13.3M parameters."""
    from runtime.openmmlab import flops_main

    result = flops_main("mmseg", "segmentation", [str(SEGMENTATION / PACAHEAD_TINY), "--shape", "64"])
    assert abs(result["params"] / 1e6 - 13.3) <= 0.1
    assert result["flops"] > 0
    printed = float(re.search(r"params: ([\d.]+)M", capsys.readouterr().out).group(1))
    assert abs(printed - 13.3) <= 0.1


# ---------------------------------------------------------------------------------------------
# the run folder: one launcher per run, run names, broken checkpoints; num_workers=0 on the zoo


@pytest.mark.parametrize("config", zoo_configs(SEGMENTATION), ids=lambda p: p.stem)
def test_num_workers_zero_on_any_zoo_config(config):
    check_num_workers_zero(config, "mmseg")


def test_run_names_are_checked_before_any_work(env, free_port):
    work_root = Path(env["PACAVIT_WORK_DIRS"]) / "segmentation"
    finished = experiment_dir(env, PACAHEAD_TINY)
    finished.mkdir(parents=True)
    (finished / "FINISHED").write_text("finished")
    # experiment_dir's names ("ci", "tiny") given with tab completion's trailing slash
    output = run([SEGMENTATION / "train_mmseg.sh", PACAHEAD_TINY, "0", "ci/", "tiny/", "0", "1", free_port], env)
    assert "finished experiment; nothing to do" in output
    for exp, tag, message in [("ci", "a/b", "Tag 'a/b' contains '/'"), ("x/y", "tiny", "Exp_name 'x/y' contains '/'"),
                              ("ci", "", "Tag is empty")]:
        output = run([SEGMENTATION / "train_mmseg.sh", PACAHEAD_TINY, "0", exp, tag, "0", "1", free_port], env,
                     expect_ok=False)
        assert message in output
    assert [p.name for p in work_root.iterdir()] == ["ci"]
    assert [p.name for p in (work_root / "ci").iterdir()] == [finished.name]


@pytest.mark.slow
def test_one_launcher_per_run_folder_and_no_resume_loop(env, tmp_path, free_port):
    work_dir = experiment_dir(env, PACAHEAD_TINY)
    cmd = [SEGMENTATION / "train_mmseg.sh", PACAHEAD_TINY, "1", "ci", "tiny", "0", "1", free_port,
           "--cfg-options", *TRAIN_SMALL, "train_cfg.max_iters=100000"]
    refused_while_running(cmd, work_dir, env, tmp_path, cwd=REPO)

    # nothing of that launch is left: the next one gets the run, whose only checkpoint is broken
    write_broken_checkpoint(work_dir, "iter_1.pth", alone=True)
    output = run([SEGMENTATION / "train_mmseg.sh", PACAHEAD_TINY, "0", "ci", "tiny", "0", "1", free_port], env,
                 expect_ok=False)
    assert f"{work_dir / 'iter_1.pth'} is not a readable PyTorch checkpoint" in output
    assert f"rm {work_dir / 'iter_1.pth'} {work_dir / 'last_checkpoint'}" in output
    assert "rerun with Remove_old=0" not in output


@pytest.mark.slow
def test_two_nodes_stop_on_sigterm_and_resume_to_the_end(env, tmp_path):
    """Two launchers of one run (NNODES=2) on this host: node 0 alone removes the old run, SIGTERM
    saves a checkpoint and each launcher says so, and the relaunched nodes resume from it and finish."""
    work_dir = experiment_dir(env, PACAHEAD_TINY)
    work_dir.mkdir(parents=True)
    (work_dir / "old.log").write_text("an unfinished earlier run")

    def launch(remove_old, iters):
        return [SEGMENTATION / "train_mmseg.sh", PACAHEAD_TINY, remove_old, "ci", "tiny", "0", "1", "0", "--yes",
                "--cfg-options", *TRAIN_SMALL, f"train_cfg.max_iters={iters}", "default_hooks.checkpoint.interval=1000"]

    nodes = TwoNodes(launch("1", 100000), env, tmp_path, cwd=REPO, name="preempted")
    nodes.wait_for_output("Iter(train) [")
    nodes.sigterm()
    assert nodes.wait() == [143, 143]
    saved = resume_point("openmmlab", work_dir)
    iteration = int(saved.stem.split("_")[1])
    assert saved == work_dir / f"iter_{iteration}.pth" and iteration >= 1
    for rank in (0, 1):
        check_sigterm_stop(nodes.output(rank), saved, "rerun with Remove_old=0 to resume it")
    assert not (work_dir / "old.log").exists() and not (work_dir / "FINISHED").exists()

    nodes = TwoNodes(launch("0", iteration + 1), env, tmp_path, cwd=REPO, name="resumed")
    assert nodes.wait() == [0, 0], nodes.output(0)[-3000:] + nodes.output(1)[-3000:]
    assert f"finished: {work_dir}" in nodes.output(0)
    assert f"node 1 done; node 0 marks {work_dir} finished" in nodes.output(1)
    assert (work_dir / "FINISHED").is_file() and (work_dir / f"iter_{iteration + 1}.pth").is_file()
    assert [record["iter"] for record in logged_losses(work_dir)] == [iteration + 1]
