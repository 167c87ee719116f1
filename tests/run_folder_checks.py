"""Checks of the training launchers' run folders, shared by the classification, detection and
segmentation tests.

:func:`refused_while_running` starts a launcher and, while it trains, checks that relaunches on
the same run are refused at each stage of its death (launcher killed, then torchrun killed,
leaving an orphaned worker), until nothing of it is left.
"""
import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import torch

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")

LAUNCHER_LOCK = ".launcher.lock"
WORKERS_LOCK = ".workers.lock"


def holders(path: Path) -> list:
    """Pids of the processes that have ``path`` open."""
    target = os.path.realpath(path)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # the process ended or is not ours
            continue
    return pids


def is_locked(path: Path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def wait_unlocked(path: Path, timeout=10) -> None:
    """Wait for the flock on ``path`` to go: a killed process shows as a zombie (what wait_gone
    waits for) while its other threads are still closing its files."""
    deadline = time.time() + timeout
    while is_locked(path):
        assert time.time() < deadline, f"{path} is still locked"
        time.sleep(0.1)


def wait_for(condition, job, log: Path, what: str, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert job.poll() is None, f"the launcher ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid) -> bool:
    """The process exists and has not ended (a zombie has ended, its parent just has not reaped it)."""
    return _stat_fields(pid)[0] != "Z"


def wait_gone(pids, timeout=30) -> None:
    deadline = time.time() + timeout
    while any(alive(pid) for pid in pids):
        assert time.time() < deadline, f"processes {pids} did not end"
        time.sleep(0.1)


def wait_ended(job: subprocess.Popen, timeout: float) -> int:
    """``job``'s exit code (it was started with ``start_new_session``); after ``timeout`` seconds, a
    failure naming the processes of its session that are still there, i.e. what keeps it going."""
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        left = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            state, ppid, _, session = _stat_fields(proc.name)[:4]
            if session == str(job.pid):
                try:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:  # it ended meanwhile
                    continue
                left.append(f"pid {proc.name} ppid {ppid} state {state}: {command[:300]}")
        raise AssertionError(f"{job.args[0]} has not ended after {timeout} s; its session still has:\n"
                             + "\n".join(left)) from None


def _stat_fields(pid) -> list:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ...; a process that is
    gone reads as a zombie with no parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ["Z", "0", "0", "0"]


def relaunch(cmd, env, cwd=None) -> subprocess.CompletedProcess:
    started = time.time()
    result = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    result.seconds = time.time() - started
    return result


def refused_while_running(cmd, run_dir: Path, env, tmp_path: Path, cwd=None) -> None:
    """Start ``cmd`` (a training launcher) and check every relaunch is refused while any of its
    processes lives.  Returns once all of them are dead; the run folder is left as they left it."""
    log = tmp_path / "first_launcher.log"
    with open(log, "w") as out:
        job = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    launcher_lock, workers_lock = run_dir / LAUNCHER_LOCK, run_dir / WORKERS_LOCK
    everything = []
    try:
        wait_for(lambda: launcher_lock.is_file() and launcher_lock.read_text(), job, log, "the lock is taken")
        wait_for(lambda: is_locked(workers_lock), job, log, "the training process holds its lock")
        workers = holders(workers_lock)
        everything = [job.pid, *holders(launcher_lock), *workers]

        second = relaunch(cmd, env, cwd)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another launcher (pid {job.pid} " in second.stderr
        assert "started " in second.stderr and os.path.basename(str(cmd[0])) in second.stderr
        # at once: only the argument check (a Python process importing torch) comes before the lock; it took
        # 12 s on a 2-core Zen 1 VM beside the running training, and over 30 s once with more work on the
        # host.  A launcher that waited for the first run (1000 epochs) would meet relaunch's timeout instead
        assert second.seconds < 90

        # the launcher dies (kill -9): torchrun, which inherited its lock, keeps the run
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        torchruns = [pid for pid in holders(launcher_lock) if pid not in workers]
        assert torchruns, "torchrun should still hold the launcher's lock"
        third = relaunch(cmd, env, cwd)
        assert third.returncode == 2 and "in use by another launcher" in third.stderr, third.stderr
        assert all(f"pid {pid}:" in third.stderr for pid in torchruns), third.stderr

        # torchrun dies too: its worker, orphaned in its own session, still holds the workers' lock.
        # The worker is frozen first so that it outlives torchrun whatever torchrun's death does to
        # it (a broken output pipe, say); SIGKILL still ends it below.
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        kill(torchruns)
        wait_gone(torchruns)
        wait_unlocked(launcher_lock)
        assert all(Path(f"/proc/{pid}").exists() for pid in workers), "the worker should outlive torchrun"
        fourth = relaunch(cmd, env, cwd)
        assert fourth.returncode == 2, fourth.stdout + fourth.stderr
        assert "training processes of an earlier launch" in fourth.stderr, fourth.stderr
        assert all(f"pid {pid}:" in fourth.stderr for pid in workers), fourth.stderr
    finally:
        kill(everything)
        job.wait()
        wait_gone(everything)
        # a worker killed while forking a data-loader process leaves a child that still holds the
        # lock for a moment: end whatever holds it until nothing does
        deadline = time.time() + 60
        while (left := holders(workers_lock) + holders(launcher_lock)) and time.time() < deadline:
            kill(left)
            wait_gone(left)
    wait_unlocked(launcher_lock)
    wait_unlocked(workers_lock)


def zoo_configs(task_dir: Path):
    return sorted(p for p in (task_dir / "configs").rglob("*.py") if "_base_" not in p.parts)


def check_num_workers_zero(config, scope):
    """The config with every loader at num_workers=0 gives DataLoader arguments it accepts."""
    from runtime.openmmlab import _prepare_environment, load_config

    cfg = load_config(str(config), scope, {f"{name}.num_workers": 0 for name in LOADERS})
    _prepare_environment(cfg, "none")
    for name in LOADERS:
        loader = cfg.get(name)
        if loader:
            torch.utils.data.DataLoader(range(2), num_workers=loader.num_workers,
                                        persistent_workers=loader.get("persistent_workers", False))


def write_broken_checkpoint(work_dir: Path, name="epoch_1.pth", alone: bool = False):
    """A Runner checkpoint cut short while saving, named by mmengine's ``last_checkpoint`` pointer;
    ``alone``: as the run's only checkpoint (a killed launch may have saved others first)."""
    if alone:
        for checkpoint in work_dir.glob("*.pth"):
            checkpoint.unlink()
    (work_dir / name).write_bytes(b"PK\x03\x04 cut short")
    (work_dir / "last_checkpoint").write_text(str(work_dir / name))


def wait_until_free(run_dir: Path, timeout=120) -> None:
    """Wait for the processes of a stopped launch to end (torchrun outlives a signalled launcher
    shell by the time it takes to stop its workers); until then the run is busy."""
    deadline = time.time() + timeout
    while is_locked(run_dir / LAUNCHER_LOCK) or is_locked(run_dir / WORKERS_LOCK):
        assert time.time() < deadline, f"the processes of {run_dir} did not end"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Two nodes on one host: two launchers of one run (NNODES=2, NODE_RANK 0 and 1) meeting at
# 127.0.0.1, sharing the work dir as nodes share a file system.


class TwoNodes:
    """Node 0 and node 1 launchers of ``cmd``, each in its own session with its output in a file;
    ``per_node``: each node's own environment variables on top of ``env``."""

    def __init__(self, cmd, env, tmp_path: Path, cwd=None, name="nodes", per_node=({}, {})):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.logs = [tmp_path / f"{name}_node{rank}.log" for rank in (0, 1)]
        started = {}
        # node 1 first: it must not touch the run folder node 0 owns, whenever it starts
        for rank in (1, 0):
            node_env = dict(env, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            **per_node[rank])
            with open(self.logs[rank], "w") as out:
                started[rank] = subprocess.Popen([str(c) for c in cmd], env=node_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.jobs = [started[0], started[1]]

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout=600) -> list:
        """Both launchers' exit codes, once both have ended."""
        try:
            return [job.wait(timeout=timeout) for job in self.jobs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the two nodes did not finish:\n{self.output(0)[-3000:]}\n{self.output(1)[-3000:]}")

    def wait_for_output(self, pattern: str, rank=0, timeout=300) -> None:
        """Wait until node ``rank``'s output shows ``pattern`` (training logs come from node 0 only)."""
        deadline = time.time() + timeout
        while pattern not in self.output(rank):
            ended = [job.poll() is not None for job in self.jobs]
            assert not any(ended), f"a node ended before '{pattern}':\n{self.output(0)[-3000:]}"
            assert time.time() < deadline, f"timed out waiting for '{pattern}':\n{self.output(0)[-3000:]}"
            time.sleep(0.2)

    def sigterm(self) -> None:
        """What a scheduler does before preempting the job: SIGTERM to each launcher's process group."""
        for job in self.jobs:
            os.killpg(job.pid, signal.SIGTERM)

    def kill(self) -> None:
        for job in self.jobs:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def check_sigterm_stop(output: str, checkpoint: Path, hint: str) -> None:
    """A launcher stopped by SIGTERM ends with its own line, naming the checkpoint to resume from
    and how, without the traceback torchrun prints for the signal."""
    assert "SignalException" not in output and "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: "), output[-3000:]
    assert last.endswith(f"is kept, with {checkpoint.name} to resume from: {hint}"), last
