"""One run-folder life for the three tasks (runtime/run_folder.py and runtime/launch_common.sh):
the layout, the FINISHED mark, the resume point chosen once by rank 0 without unpickling, and the
rendezvous port every launcher takes the same way."""
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime import run_folder
from runtime.run_folder import agreed_resume_point, is_finished, mark_finished, resume_point, run_folder_path

REPO = Path(__file__).resolve().parents[2]


def launch_common(script, env=None, *args):
    """Run ``script`` in bash after sourcing launch_common.sh."""
    return subprocess.run(["bash", "-c", f"source {REPO}/runtime/launch_common.sh\n{script}", "lifecycle", *args],
                          env=env or dict(os.environ), capture_output=True, text=True, timeout=60)


def _training_checkpoint(path, epoch):
    torch.save({"epoch": epoch, "state_dict": {"w": torch.full((4,), float(epoch))}, "optimizer": {}}, path)


def test_launchers_and_python_share_one_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("PACAVIT_WORK_DIRS", str(tmp_path))
    shell = launch_common('paca_run_dir "$1" "$2" "$3" "$4"', None, "detection", "cvpr23", "mask_rcnn_x", "try1")
    assert shell.stdout.strip() == str(run_folder_path("detection", "cvpr23", "mask_rcnn_x", "try1"))
    assert run_folder_path("classification", "e", "IMNET_224_m", "t") == tmp_path / "classification/e/IMNET_224_m_t"


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_a_finished_run_is_never_retrained_or_removed(tmp_path, node_rank):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth.tar").write_bytes(b"weights")
    mark_finished(run)
    assert is_finished(run)
    env = dict(os.environ, PACAVIT_YES="1", NODE_RANK=node_rank, NNODES="2", MASTER_ADDR="127.0.0.1")
    again = launch_common('paca_prepare_experiment "$1" 0; echo "not reached"', env, str(run))
    assert again.returncode == 0 and f"{run} is a finished experiment; nothing to do" in again.stdout
    assert "not reached" not in again.stdout
    removed = launch_common('paca_prepare_experiment "$1" 1', env, str(run))
    assert removed.returncode == 2 and "is never retrained or overwritten" in removed.stderr
    assert sorted(p.name for p in run.iterdir()) == ["FINISHED", "last.pth.tar"]


def test_a_run_the_official_layout_moved_to_training_finished_counts_as_finished(tmp_path):
    run = tmp_path / "exp" / "IMNET_224_pacavit_tiny_p2cconv_100_0_t1"
    moved = tmp_path / "exp" / "TrainingFinished" / run.name
    moved.mkdir(parents=True)
    (moved / "model_best.pth.tar").write_bytes(b"weights")
    again = launch_common('paca_prepare_experiment "$1" 0; echo "not reached"', dict(os.environ, PACAVIT_YES="1"), str(run))
    assert again.returncode == 0 and f"{run} was trained to the end and moved to {moved}" in again.stdout
    assert "nothing to do" in again.stdout and "not reached" not in again.stdout
    removed = launch_common('paca_prepare_experiment "$1" 1', dict(os.environ, PACAVIT_YES="1"), str(run))
    assert removed.returncode == 2 and "is never retrained or overwritten" in removed.stderr
    assert not run.exists() and [p.name for p in moved.iterdir()] == ["model_best.pth.tar"]


def test_resume_0_refuses_an_existing_run_and_other_nodes_leave_the_folder_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("an earlier run")
    refused = launch_common('paca_prepare_experiment "$1" 0 0', None, str(run))
    assert refused.returncode == 2 and f"{run} exists: pass Resume=1 to continue it" in refused.stderr
    fresh = tmp_path / "fresh"
    node1 = launch_common('paca_prepare_experiment "$1" 1 1; echo "lock=$PACAVIT_RUN_LOCK"',
                          dict(os.environ, NODE_RANK="1", NNODES="2", MASTER_ADDR="10.0.0.1"), str(fresh))
    assert node1.returncode == 0 and f"lock={fresh}/.workers.lock" in node1.stdout
    assert not fresh.exists(), "only node 0 creates, locks and removes the run folder"


@pytest.mark.parametrize("master_port, argument, expected", [
    ("", "23900", "23900"),          # the seed's positional port
    ("29500", "23900", "29500"),     # MASTER_PORT, when set, wins in every launcher
    ("", "", None),                  # neither: a free port of this machine
])
def test_rendezvous_port(master_port, argument, expected):
    env = dict(os.environ, MASTER_PORT=master_port) if master_port else \
        {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    result = launch_common('paca_rendezvous_port "$1"', env, argument)
    assert result.returncode == 0, result.stderr
    port = result.stdout.strip()
    assert port == expected if expected else 1 <= int(port) <= 65535


@pytest.mark.parametrize("master_port, argument, origin", [("", "29x00", "port argument"), ("70000", "1", "MASTER_PORT")])
def test_a_bad_port_is_one_line_naming_where_it_came_from(master_port, argument, origin):
    env = dict(os.environ, MASTER_PORT=master_port) if master_port else \
        {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    result = launch_common('paca_rendezvous_port "$1"', env, argument)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {origin} must be a TCP port number (1-65535), got '{master_port or argument}'"


def test_resume_point_checks_records_without_unpickling(tmp_path, monkeypatch):
    _training_checkpoint(tmp_path / "checkpoint-1.pth.tar", 1)
    _training_checkpoint(tmp_path / "last.pth.tar", 2)
    data = (tmp_path / "last.pth.tar").read_bytes()
    (tmp_path / "last.pth.tar").write_bytes(data[: len(data) // 2])  # a save cut short by a full disk

    def no_unpickling(*args, **kwargs):
        raise AssertionError("resume_point must not unpickle a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    said = []
    assert resume_point("classification", tmp_path, report=said.append) == tmp_path / "checkpoint-1.pth.tar"
    assert f"{tmp_path / 'last.pth.tar'} is not a readable PyTorch checkpoint" in said[0]


def _agree(rank, init_file, cases, results):
    """Each case gives rank 0's folder and rank 1's; the ranks' answers go into ``results``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for case, folders in enumerate(cases):
        try:
            results[case, rank] = agreed_resume_point("classification", folders[rank])
        except SystemExit as stop:
            results[case, rank] = f"exit: {stop.code}"
    dist.destroy_process_group()


def test_rank_0_chooses_the_resume_point_for_every_rank(tmp_path):
    """Rank 1 reads another view of the folder (a node whose file system lags): it still resumes
    from the checkpoint rank 0 chose; no intact checkpoint on rank 0 stops both with its error."""
    ahead, behind, broken = tmp_path / "ahead", tmp_path / "behind", tmp_path / "broken"
    for folder in (ahead, behind, broken):
        folder.mkdir()
    _training_checkpoint(ahead / "last.pth.tar", 3)
    _training_checkpoint(behind / "last.pth.tar", 1)
    (broken / "last.pth.tar").write_bytes(b"PK\x03\x04 cut short")
    results = mp.Manager().dict()
    mp.spawn(_agree, args=(tmp_path / "init", [(ahead, behind), (broken, behind)], results), nprocs=2)
    assert results[0, 0] == results[0, 1] == str(ahead / "last.pth.tar")
    assert results[1, 0] == results[1, 1]
    assert results[1, 0].startswith(f"exit: error: no intact checkpoint is left in {broken}. ")


def test_a_direct_python_run_is_marked_finished_and_auto_resumes(tmp_path):
    from classification import train_timm
    from tests.classification.cls_helpers import CLS_DIR, MODEL, write_colour_dataset

    data = write_colour_dataset(tmp_path / "data", per_class={"train": 3, "val": 1})
    args = ["-c", str(CLS_DIR / "configs" / "digits_demo.yml"), "--model", MODEL, "--data-dir", str(data),
            "--output", str(tmp_path / "run"), "--epochs", "1", "-b", "9", "-j", "0", "--img-size", "32"]
    train_timm.main(args)
    output = tmp_path / "run"
    assert is_finished(output)
    saved = torch.load(output / "last.pth.tar", weights_only=True)  # what predict.py needs beside the weights
    assert saved["class_names"] == ["class0", "class1", "class2"] and saved["data_config"]["input_size"] == (3, 32, 32)
    (output / run_folder.FINISHED_MARK).unlink()
    train_timm.main([*args, "--epochs", "2", "--auto-resume"])
    assert "continuing at epoch 2" in (output / "train.log").read_text()
    assert is_finished(output)


def test_reading_a_checkpoint_keeps_the_process_wide_allow_list(tmp_path):
    """mmengine's resume loads with weights_only=True after the project's loader has read the same
    file (the resume's fit check): the loader must not take back the types registered for it."""
    from models.checkpoint import read_checkpoint, safe_globals
    from runtime.openmmlab import register_checkpoint_safe_globals

    register_checkpoint_safe_globals()
    _training_checkpoint(tmp_path / "last.pth.tar", 1)
    read_checkpoint(tmp_path / "last.pth.tar")
    assert all(g in torch.serialization.get_safe_globals() for g in safe_globals())


def test_a_folder_with_files_but_no_checkpoint_starts_over_with_a_note(tmp_path):
    said = []
    (tmp_path / ".workers.lock").touch()  # the launcher's locks alone: a fresh folder, nothing to say
    assert resume_point("classification", tmp_path, report=said.append) is None and said == []
    (tmp_path / "train.log").write_text("epoch 0 ...\n")  # stopped before its first checkpoint
    (tmp_path / "args.yaml").write_text("model: x\n")
    assert resume_point("classification", tmp_path, report=said.append) is None
    assert said == [f"note: {tmp_path} holds no checkpoint yet (args.yaml, train.log): this run starts from scratch there"]


def test_a_run_started_without_a_launcher_refuses_a_finished_or_busy_folder(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.delenv(run_folder.WORKERS_LOCK_ENV, raising=False)
    finished = tmp_path / "finished"
    finished.mkdir()
    mark_finished(finished)
    with pytest.raises(SystemExit, match=r"finished run \(FINISHED\) and is never retrained .* another --output"):
        run_folder.claim_run_folder(finished)
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / run_folder.LAUNCHER_LOCK, "w") as launcher:
        fcntl.flock(launcher, fcntl.LOCK_EX)  # a launcher training in it
        launcher.write("pid 1 on node0, started 2026-12-03T09:00:00Z: train_timm.sh ...")
        launcher.flush()
        with pytest.raises(SystemExit, match=r"in use by a launcher \(pid 1 on node0.*another --work-dir"):
            run_folder.claim_run_folder(busy, "--work-dir")


def test_a_launcher_stays_out_of_a_folder_a_direct_run_trains_in(tmp_path, monkeypatch):
    monkeypatch.delenv(run_folder.WORKERS_LOCK_ENV, raising=False)
    held = len(run_folder._held_locks)
    run_folder.claim_run_folder(tmp_path / "run")  # as rank 0 of a direct run; a second rank shares it
    run_folder.claim_run_folder(tmp_path / "run")
    try:
        env = {k: v for k, v in os.environ.items() if k != run_folder.WORKERS_LOCK_ENV}
        launcher = launch_common('paca_lock_run "$1"', env, str(tmp_path / "run"))
        assert launcher.returncode != 0 and "are still running" in launcher.stderr
    finally:
        for lock in run_folder._held_locks[held:]:
            lock.close()
        del run_folder._held_locks[held:]
    assert launch_common('paca_lock_run "$1"', env, str(tmp_path / "run")).returncode == 0  # free again
