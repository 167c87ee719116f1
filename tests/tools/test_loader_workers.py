"""Loader workers end with the process they load for, even one killed while they start."""
import os
import signal
import subprocess
import sys
import time
from functools import partial

import torch
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader

from runtime.loader_workers import EndWithParent, end_with_parent, end_workers_with_parent
from tests.classification.cls_helpers import MODEL, write_colour_dataset
from tests.run_folder_checks import alive, wait_gone

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": REPO}

# A training process killed while its loader's worker starts: the worker's init returns only once the
# process is gone, before PyTorch's worker has read its parent's pid for its own check.
KILLED_WHILE_WORKER_STARTS = """
import os, sys, time
from torch.utils.data import DataLoader
from runtime.loader_workers import end_workers_with_parent

def slow_start(worker_id):
    parent = os.getppid()
    print(os.getpid(), flush=True)
    deadline = time.time() + 60
    while os.getppid() == parent and time.time() < deadline:
        time.sleep(0.01)

loader = DataLoader(range(4), num_workers=1, worker_init_fn=slow_start)
if sys.argv[1] == "guarded":
    end_workers_with_parent(loader)
next(iter(loader))
time.sleep(60)
"""

# A process whose child arms the guard only after the process is gone.
KILLED_BEFORE_GUARD = """
import multiprocessing, os, time
from runtime.loader_workers import end_with_parent

def child(parent_pid):
    print(os.getpid(), flush=True)
    while os.getppid() == parent_pid:
        time.sleep(0.01)
    end_with_parent()
    print("survived", flush=True)
    time.sleep(60)

multiprocessing.get_context("fork").Process(target=child, args=(os.getpid(),)).start()
time.sleep(60)
"""


def start(script, *args):
    return subprocess.Popen([sys.executable, "-c", script, *args], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            text=True)


def kill_parent_and_read_worker(parent):
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    return worker


def test_a_worker_starting_when_its_process_is_killed_ends_with_it():
    parent = start(KILLED_WHILE_WORKER_STARTS, "guarded")
    worker = kill_parent_and_read_worker(parent)
    wait_gone([worker], timeout=10)


def test_without_the_guard_such_a_worker_would_live_on():
    """Why the guard is there: PyTorch's own check takes the worker's new parent for the old one."""
    parent = start(KILLED_WHILE_WORKER_STARTS, "plain")
    worker = kill_parent_and_read_worker(parent)
    try:
        time.sleep(8)  # more than PyTorch's 5-s status check interval
        assert alive(worker)
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_worker_whose_process_died_before_the_guard_armed_exits_at_once():
    parent = start(KILLED_BEFORE_GUARD)
    worker = kill_parent_and_read_worker(parent)
    wait_gone([worker], timeout=10)
    assert parent.stdout.read() == ""  # it never got past end_with_parent


def test_the_guard_does_nothing_outside_a_worker():
    end_with_parent()  # the test process has no multiprocessing parent: nothing to arm, no exit


def test_loaders_keep_their_own_worker_init_and_are_wrapped_once():
    seen = []
    loader = end_workers_with_parent(end_workers_with_parent(DataLoader(range(2), num_workers=1,
                                                                        worker_init_fn=seen.append)))
    assert isinstance(loader.worker_init_fn, EndWithParent) and loader.worker_init_fn.init_fn == seen.append
    assert [int(x) for x in loader] == [0, 1]  # the workers start (and run the loader's own init there)


def test_spawned_workers_are_guarded_and_forkserver_ones_left_to_pytorch():
    spawned = end_workers_with_parent(DataLoader(range(2), num_workers=1, multiprocessing_context="spawn"))
    assert isinstance(spawned.worker_init_fn, EndWithParent)
    assert [int(x) for x in spawned] == [0, 1]  # the guard pickles, and a live parent passes it
    served = end_workers_with_parent(DataLoader(range(2), num_workers=1, multiprocessing_context="forkserver"))
    assert served.worker_init_fn is None  # the server is the worker's parent: nothing of this process to watch
    assert [int(x) for x in served] == [0, 1]


def test_every_project_loader_has_the_guard(tmp_path):
    from classification import cls_common, train_timm
    from runtime.openmmlab import RunnerWithBoundWorkers

    root = write_colour_dataset(tmp_path / "TINY", {"train": 2, "val": 1})
    data_config = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                       crop_pct=1.0, crop_mode="center")
    args = train_timm.parse_args(["--model", MODEL, "--data-dir", str(root), "--output", str(tmp_path), "-j", "1"])
    args.distributed = False  # set by the training's device setup
    dataset = cls_common.ImageDataset(str(root / "train"))
    train = train_timm.build_train_loader(args, dataset, data_config, torch.device("cpu"))
    assert isinstance(train.worker_init_fn, EndWithParent)
    assert isinstance(train.worker_init_fn.init_fn, partial)  # timm's per-worker seeding still runs
    prefetching = end_workers_with_parent(PrefetchLoader(DataLoader(range(2), num_workers=1),
                                                         device=torch.device("cpu")))
    assert isinstance(prefetching.loader.worker_init_fn, EndWithParent)  # timm's wrapper on CUDA
    evaluation = cls_common.build_eval_loader(str(root), "val", data_config, 2, 1)
    assert isinstance(evaluation.worker_init_fn, EndWithParent)
    openmmlab = RunnerWithBoundWorkers.build_dataloader(DataLoader(range(2), num_workers=1))
    assert isinstance(openmmlab.worker_init_fn, EndWithParent)
