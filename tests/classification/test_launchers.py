"""End-to-end runs of train_timm.sh / validate.sh / benchmark.sh on a tiny colour dataset (CPU)."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

import models  # noqa: F401  (registers the pacavit_* names with timm)

from runtime.run_folder import resume_point
from tests.run_folder_checks import TwoNodes, check_sigterm_stop, wait_until_free

from .cls_helpers import CLS_DIR, MODEL, run, run_folder, train_cmd, write_colour_dataset

pytestmark = pytest.mark.slow


def read_summary(folder):
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_run(cls_env):
    """Two epochs of PaCa-Tiny through the launcher, from a folder other than classification/."""
    result = run(train_cmd("e2e", "t1", "--epochs", 2), cls_env, cwd=CLS_DIR.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, run_folder(cls_env, "e2e", "t1")


def test_training_writes_logs_checkpoints_and_curves(finished_run, cls_env):
    result, done_dir = finished_run
    assert (done_dir / "FINISHED").is_file() and f"training finished: {done_dir}" in result.stdout
    assert [row["epoch"] for row in read_summary(done_dir)] == ["0", "1"]
    for name in ("last.pth.tar", "model_best.pth.tar", "args.yaml", "train.log", "training_curves.png"):
        assert (done_dir / name).is_file(), name
    log = (done_dir / "train.log").read_text()
    assert "img/s" in log and "eta epoch" in log and "lr " in log
    # class folder names in label order, for tools that show predictions by name
    checkpoint = torch.load(done_dir / "model_best.pth.tar", weights_only=True)
    assert checkpoint["class_names"] == ["class0", "class1", "class2"]


@pytest.mark.parametrize("compile_flag", ["--no-compile", "--compile"])
def test_validate_reproduces_the_trainers_last_evaluation(finished_run, cls_env, tmp_path, compile_flag):
    _, done_dir = finished_run
    last_eval = read_summary(done_dir)[-1]
    results = tmp_path / "val.json"
    checkpoint_url = (done_dir / "last.pth.tar").as_uri()  # file://..., through the URL route of the loader
    result = run([CLS_DIR / "validate.sh", MODEL, checkpoint_url, "TINY", 32, 0, 1,
                  "--crop-pct", "1.0", "--results-file", results, compile_flag], cls_env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(results.read_text())
    assert metrics["images"] == 9 and metrics["num_classes"] == 3
    assert metrics["top1"] == pytest.approx(float(last_eval["eval_top1"]), abs=1e-3)
    assert metrics["top5"] == pytest.approx(float(last_eval["eval_top5"]), abs=1e-3)
    assert metrics["loss"] == pytest.approx(float(last_eval["eval_loss"]), abs=1e-3)


def test_validate_stopped_by_sigterm_says_so_in_its_own_line(finished_run, cls_env, tmp_path):
    _, done_dir = finished_run
    log = tmp_path / "validate.log"
    with open(log, "w") as out:
        job = subprocess.Popen([str(c) for c in (CLS_DIR / "validate.sh", MODEL, done_dir / "last.pth.tar", "TINY",
                                                 32, 0, 1)],
                               env=cls_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.time() + 60
        while "torch.distributed.run" not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # torchrun has started its worker, which is still importing torch
        assert job.poll() is None, "validation ended before it could be interrupted"
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=120)
    output = log.read_text()
    assert job.returncode == 143
    assert "SignalException" not in output and "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1] == "stopped by SIGTERM: the evaluation did not finish; launch it again"


def test_finished_experiment_is_never_retrained(finished_run, cls_env):
    _, done_dir = finished_run
    before = (done_dir / "last.pth.tar").stat().st_mtime_ns
    again = run(train_cmd("e2e", "t1", "--epochs", 2), cls_env)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    remove = run(train_cmd("e2e", "t1", "--epochs", 2, "--yes", remove_old=1), cls_env)
    assert remove.returncode != 0 and "never retrained or overwritten" in remove.stderr
    assert (done_dir / "last.pth.tar").stat().st_mtime_ns == before


def test_sigterm_saves_a_recovery_checkpoint_and_the_resumed_run_is_exact(cls_env, tmp_path):
    epochs, steps_per_epoch = 3, 2  # 18 training images, batch 9
    run_dir = done_dir = run_folder(cls_env, "resume", "t1")
    flags = ("--epochs", epochs, "--model-ema")
    log = tmp_path / "preempted.log"
    with open(log, "w") as out:
        job = subprocess.Popen([str(c) for c in train_cmd("resume", "t1", *flags)], env=cls_env,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "last.pth.tar").exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert job.poll() is None, "training ended before it could be interrupted"
    finally:
        # as a scheduler preempting the job: SIGTERM to the launcher's group, torchrun passes it on
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=120)
    wait_until_free(run_dir)
    assert job.returncode == 143
    # epoch 1 was saved; the worker stopped after the first step of epoch 2 (the next check)
    recovery = run_dir / "recovery-1-1.pth.tar"
    check_sigterm_stop(log.read_text(), recovery, "continue it with Resume=1 (Remove_old=0)")
    assert resume_point("classification", run_dir, report=pytest.fail) == recovery
    saved = torch.load(recovery, weights_only=True)
    assert (saved["epoch"], saved["epoch_steps_done"]) == (1, 1)
    assert saved["epoch_partial"]["images"] == 9 and saved["epoch_partial"]["loss"] > 0  # the one step it trained
    assert not (run_dir / "FINISHED").exists()

    refused = run(train_cmd("resume", "t1", *flags), cls_env)
    assert refused.returncode != 0 and "Resume=1" in refused.stderr

    resumed = run(train_cmd("resume", "t1", *flags, resume=1), cls_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "continuing at epoch 2 after its step 1" in (done_dir / "train.log").read_text()
    assert [int(row["epoch"]) for row in read_summary(done_dir)] == list(range(epochs))
    assert (done_dir / "FINISHED").is_file() and not list(done_dir.glob("recovery-*"))
    final = torch.load(done_dir / "last.pth.tar", weights_only=True)
    assert final["epoch"] == epochs - 1 and "epoch_steps_done" not in final
    # the optimizer state came back: AdamW's step count covers every update of every epoch once
    steps = {int(state["step"]) for state in final["optimizer"]["state"].values()}
    assert steps == {epochs * steps_per_epoch}
    # and the weights are those of the uninterrupted run
    straight = run(train_cmd("straight", "t1", *flags), cls_env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = torch.load(run_folder(cls_env, "straight", "t1") / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in expected[key].items():
            assert torch.equal(final[key][name], tensor), f"{key}.{name}"
    # and so is the summary: the resumed epoch's loss covers its steps before the stop too
    losses = lambda folder: [float(row["train_loss"]) for row in read_summary(folder)]  # noqa: E731
    assert losses(done_dir) == pytest.approx(losses(run_folder(cls_env, "straight", "t1")), rel=1e-5)


def test_remove_old_needs_yes_and_never_prompts(cls_env):
    run_dir = run_folder(cls_env, "keep", "t1")
    run_dir.mkdir(parents=True)
    precious = run_dir / "last.pth.tar"
    precious.write_bytes(b"old run")
    result = run(train_cmd("keep", "t1", remove_old=1), cls_env)
    assert result.returncode != 0 and "--yes" in result.stderr
    assert precious.read_bytes() == b"old run"


def test_missing_dataset_folder_is_reported_by_every_launcher(cls_env):
    train = run(train_cmd("none", "t1", dataset="NO_SUCH_SET"), cls_env)
    validate = run([CLS_DIR / "validate.sh", MODEL, "pretrained", "NO_SUCH_SET", 32, 0, 1], cls_env)
    for result in (train, validate):
        assert result.returncode != 0
        assert "NO_SUCH_SET" in result.stderr and "make_digits_dataset.py" in result.stderr


def test_unknown_model_and_mismatched_checkpoint_are_clear_errors(finished_run, cls_env, tmp_path):
    _, done_dir = finished_run
    data_dir = os.path.join(cls_env["PACAVIT_DATASETS"], "TINY")
    validate = [sys.executable, CLS_DIR / "validate.py", "--data-dir", data_dir, "--img-size", 32]
    unknown = run(validate + ["--model", "pacavit_tiny_p2cconv_100", "--checkpoint", done_dir / "last.pth.tar"],
                  cls_env)
    assert unknown.returncode == 2
    assert "unknown model 'pacavit_tiny_p2cconv_100'" in unknown.stderr and "Did you mean" in unknown.stderr
    other_arch = run(validate + ["--model", "pacavit_base_p2cconv_100_0", "--checkpoint", done_dir / "last.pth.tar"],
                     cls_env)
    assert other_arch.returncode == 2
    assert "another architecture" in other_arch.stderr and "Traceback" not in other_arch.stderr
    # a validation set of two of its three classes is scored through the names the checkpoint stores
    two_classes = write_colour_dataset(tmp_path / "TWO", {"val": 1})
    shutil.rmtree(two_classes / "val" / "class2")
    subset = run(validate[:2] + ["--data-dir", two_classes, "--model", MODEL, "--img-size", 32,
                                 "--checkpoint", done_dir / "last.pth.tar"], cls_env)
    assert subset.returncode == 0 and "(2 images" in subset.stderr + subset.stdout, subset.stderr[-2000:]
    (two_classes / "val" / "class1").rename(two_classes / "val" / "zebra")  # a class it never saw
    other_classes = run(validate[:2] + ["--data-dir", two_classes, "--model", MODEL,
                                        "--checkpoint", done_dir / "last.pth.tar"], cls_env)
    assert other_classes.returncode == 2 and "was trained on other classes" in other_classes.stderr
    assert "has zebra, which are not among its 3 (class0, class1, class2)" in other_classes.stderr


def test_benchmark_appends_rows_matching_the_model_zoo_and_plots_latency(cls_env):
    csv_path = os.path.join(cls_env["PACAVIT_WORK_DIRS"], "classification", "all_benchmark_results.csv")
    args = ["-b", 1, "--iters", 1, "--warmup", 0, "--compare", "--peers", "pvt_v2_b1", "--img-sizes", "32,64"]
    result = run([CLS_DIR / "benchmark.sh", MODEL, 224, 1000, 0, *args], {**cls_env, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["model"] for row in rows] == [MODEL, "pvt_v2_b1"]
    paca = rows[0]
    # the seed's ImageNet table: PaCa-Tiny 12.2M parameters, 3.2 GFLOPs at 224x224
    assert float(paca["params_M"]) == pytest.approx(12.2, abs=0.05)
    assert float(paca["gflops"]) == pytest.approx(3.2, abs=0.05)
    assert float(paca["infer_img_per_s"]) > 0 and float(paca["train_img_per_s"]) > 0
    assert (paca["img_size"], paca["num_classes"], paca["device"].startswith("cpu")) == ("224", "1000", True)
    assert paca["omp_wait_policy"] == "PASSIVE"  # the user's own choice is kept
    assert float(rows[1]["params_M"]) == pytest.approx(14.0, abs=0.05)
    assert os.path.getsize(os.path.join(os.path.dirname(csv_path), "latency_vs_resolution.png")) > 0


def test_speed_report_makes_the_performance_section_in_one_command(cls_env, tmp_path):
    csv_path = tmp_path / "speed.csv"
    quick = ["-b", 1, "--iters", 1, "--train-iters", 1, "--min-round-seconds", 0, "--warmup", 0, "--rounds", 1,
             "--img-sizes", "32,64", "--results-csv", csv_path,
             "--low-precision-models", f"{MODEL},convnext_tiny"]
    env = {k: v for k, v in cls_env.items() if k not in ("OMP_WAIT_POLICY", "PACA_CHOSE_PASSIVE")}
    result = run([CLS_DIR / "speed_report.sh", 0, *quick], env)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(csv_path, newline="") as f:
        all_rows = list(csv.DictReader(f))
    paca = [MODEL, "pacavit_small_p2cconv_100_0", "pacavit_base_p2cconv_100_0"]
    # one process per row: PaCa with its fused kernels and with the plain ops; convnext never claims them
    expected_rows = [(name, "fp32", fused) for name in paca for fused in ("True", "False")]
    expected_rows.append(("convnext_tiny", "fp32", "False"))
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # bf16 rows where the CPU has the kernels
        expected_rows += [(name, precision, fused) for precision in ("autocast-bf16", "bf16")
                          for name, fused in ((MODEL, "True"), (MODEL, "False"), ("convnext_tiny", "False"))]
    assert [(row["model"], row["precision"], row["fused_kernels"]) for row in all_rows] == expected_rows
    assert all(row["host"] and row["isa"] and row["rounds"] == "1" for row in all_rows)
    # one process measures at a time: OpenMP's default waiting, not the CPU launchers' passive one
    assert {row["omp_wait_policy"] for row in all_rows} == {"default"}
    rows = {row["model"]: row for row in all_rows if row["plain_ops"] == "False" and row["precision"] == "fp32"}
    assert float(rows["convnext_tiny"]["infer_efficiency"]) == 1.0
    for row in rows.values():
        # efficiency = this model's GFLOP/s over convnext_tiny's in the same round (one round here),
        # for inference and training; the exact seconds are in ms_per_batch (img/s is rounded coarser)
        ref = rows["convnext_tiny"]
        for phase in ("infer", "train"):
            expected = (float(row["gflops"]) / float(row[f"{phase}_ms_per_batch"])) / (
                float(ref["gflops"]) / float(ref[f"{phase}_ms_per_batch"]))
            assert float(row[f"{phase}_efficiency"]) == pytest.approx(expected, abs=2e-3)
    plain_ops = [row for row in all_rows if row["plain_ops"] == "True"]
    # training is timed with and without the fused layers (the float32 training kernel), in fp32 only
    for row in plain_ops:
        assert float(row["infer_efficiency"]) > 0
        assert (float(row["train_efficiency"]) > 0) if row["precision"] == "fp32" else row["train_img_per_s"] == ""
    for curve_model in (MODEL, "pvt_v2_b1", "convnext_tiny"):
        assert f"round 1/1 {curve_model} backbone at 64x64" in result.stderr
    with open(tmp_path / "latency_vs_resolution.csv", newline="") as f:
        points = [(row["model"], row["img_size"], row["rounds"]) for row in csv.DictReader(f)]
    assert points == [(name, size, "1") for name in (MODEL, "pvt_v2_b1", "convnext_tiny") for size in ("32", "64")]
    for png in ("efficiency.png", "latency_vs_resolution.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png


def test_compiled_training_keeps_plain_parameter_names(cls_env):
    result = run(train_cmd("compiled", "t1", "--epochs", 1, "--compile"), cls_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    done_dir = run_folder(cls_env, "compiled", "t1")
    state = torch.load(done_dir / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(timm.create_model(MODEL, num_classes=3).state_dict())


def test_two_nodes_train_one_run_to_the_end(cls_env, tmp_path):
    """Two launchers of one run (NNODES=2, one process each) on this host, one shared work dir:
    node 0 alone takes the folder, and the training's rank 0 marks it FINISHED at the end."""
    done_dir = run_folder(cls_env, "nodes", "t1")
    nodes = TwoNodes(train_cmd("nodes", "t1", "--epochs", 1), cls_env, tmp_path)
    assert nodes.wait() == [0, 0], nodes.output(0)[-3000:] + nodes.output(1)[-3000:]
    assert f"training finished: {done_dir}" in nodes.output(0) and "training finished" not in nodes.output(1)
    assert (done_dir / "FINISHED").is_file() and (done_dir / "last.pth.tar").is_file()
    assert "2 process(es)" in (done_dir / "train.log").read_text()
    assert [row["epoch"] for row in read_summary(done_dir)] == ["0"]


def test_nodes_that_do_not_share_the_work_dir_all_stop_with_the_cause(cls_env, tmp_path):
    """Each node with a work dir of its own (a path on a local disk): every node stops with the same
    error once they have met, instead of node 1 failing alone and node 0 waiting for it."""
    own = [tmp_path / f"node{rank}_work_dirs" for rank in (0, 1)]
    nodes = TwoNodes(train_cmd("unshared", "t1", "--epochs", 1), cls_env, tmp_path,
                     per_node=[{"PACAVIT_WORK_DIRS": str(folder)} for folder in own])
    assert nodes.wait(timeout=300) == [1, 1], nodes.output(0)[-3000:] + nodes.output(1)[-3000:]
    for rank in (0, 1):
        last = nodes.output(rank).strip().splitlines()
        failed = next(line for line in last if line.startswith("training failed: error: the nodes do not share"))
        assert f"the run folder {own[0]}" in failed or f"the run folder {own[1]}" in failed, failed
        assert "set PACAVIT_WORK_DIRS, or --output, to a folder on a shared file system" in failed
        assert "resume would stop the same way" in last[-1]
    assert not list(own[0].rglob("*.pth.tar")) and not list(own[0].rglob(".node0-*"))


def test_a_failure_a_resume_cannot_fix_ends_with_its_error_not_a_resume_hint(cls_env, tmp_path):
    missing = tmp_path / "no_such_checkpoint.pth.tar"
    result = run(train_cmd("hints", "t1", "--resume", missing), cls_env)
    assert result.returncode == 1
    failed, kept = result.stderr.strip().splitlines()[-2:]
    assert failed.startswith("training failed: error: ") and str(missing) in failed
    assert kept.endswith("is kept, but a resume would stop the same way: fix the cause and launch again")
    assert "Resume=1" not in result.stderr
