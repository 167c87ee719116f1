"""The life of a training run folder, the same for every task: where it lives, which checkpoint
it resumes from, the workers' lock and the mark of a finished run.

* Layout: ``<work_dirs>/<task>/<Exp_name>/<subject>_<Tag>/`` (:func:`run_folder_path`), the subject being
  ``<Dataset>_<Img_size>_<Model>`` for classification and the config's name for detection and
  segmentation.  The launchers build the same path (``paca_run_dir`` in launch_common.sh).
* Locks: one launcher per folder (``paca_lock_run`` in launch_common.sh); training processes
  started with or without a launcher hold the folder too (:func:`claim_run_folder`).
* Shared: every node of a distributed run must see the same folder
  (:func:`check_shared_run_folder`, once the nodes have met).
* Resume: rank 0 alone chooses the run's newest checkpoint whose zip records pass their CRC32
  check (``models.checkpoint.verify_checkpoint``, nothing unpickled) and tells every rank of every
  node (:func:`agreed_resume_point`).  A truncated or corrupt one (a full disk, a copy cut short)
  is named and the one before it is taken; when none is intact the error names the files to delete,
  so a relaunch never meets the same broken file again.
* Finished: rank 0 writes ``FINISHED`` (:func:`mark_finished`) when training returns, whoever
  started it (launcher or plain ``python``); nothing retrains a folder that has it.

``python -m runtime.run_folder resume-point classification|openmmlab RUN_DIR`` prints the file a
resume would start from (nothing for a fresh start) and exits 2 when no intact checkpoint is left;
the launchers use it only to word their last message after a failure.
"""
import argparse
import fcntl
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import List, Optional

import torch

from models.checkpoint import CheckpointError, verify_checkpoint

WORKERS_LOCK_ENV = "PACAVIT_RUN_LOCK"
# the lock files of launch_common.sh (paca_lock_run): the launcher's own, and its workers'
LAUNCHER_LOCK, WORKERS_LOCK = ".launcher.lock", ".workers.lock"
FINISHED_MARK = "FINISHED"
REPO_ROOT = Path(__file__).resolve().parents[1]
_held_locks = []  # open lock files, kept for the life of the process


def _hold_shared(path) -> None:
    lock = open(path, "a")
    fcntl.flock(lock, fcntl.LOCK_SH)
    _held_locks.append(lock)


def claim_run_folder(folder, option: str = "--output") -> None:
    """Take the run folder ``folder`` (made if missing) for this training process until it exits.

    Under a launcher, share the workers lock it names: the launcher's own lock lives in torchrun,
    which does not hand it to its workers, and this one keeps a relaunch out while a worker
    orphaned by a killed launcher still trains.  Started without a launcher (``python`` or a bare
    ``torchrun``), refuse what a launcher refuses, a finished run and a folder a launcher is
    training in, then hold the same workers lock, which keeps launchers out meanwhile (every rank
    shares it, so the ranks of one run do not exclude each other).  ``option`` names the
    command-line option that chose the folder, for the message.
    """
    launched = os.environ.get(WORKERS_LOCK_ENV)
    if launched:
        # the folder of node 0's launcher; another node may not see it yet (or ever, where the
        # work dirs are not shared: check_shared_run_folder says so once all nodes have met)
        Path(launched).parent.mkdir(parents=True, exist_ok=True)
        _hold_shared(launched)
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_finished(folder):
        raise SystemExit(f"error: {folder} is a finished run ({FINISHED_MARK}) and is never retrained or "
                         f"overwritten: choose another {option}, or delete it by hand to train again")
    with open(folder / LAUNCHER_LOCK, "a+") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            probe.seek(0)
            owner = probe.read().strip() or "details not written yet"
            raise SystemExit(f"error: {folder} is in use by a launcher ({owner}): wait for it to finish, "
                             f"or choose another {option}") from None
    _hold_shared(folder / WORKERS_LOCK)


def check_shared_run_folder(folder, option: str = "--output", patience: float = 10.0) -> None:
    """Stop every rank with one error when the nodes of a distributed run do not see one run folder.

    Rank 0 alone saves checkpoints and logs and chooses the resume point, which every rank then
    loads: a work dir local to each node would fail only at the first resume, or leave the other
    nodes' ranks missing files.  Rank 0 writes a file of its own into ``folder`` and every rank looks
    for it (for up to ``patience`` seconds: a network file system may show a new file late); all
    ranks learn the answer, so none is left waiting for the others.  One node: nothing to check.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() == int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())):
        return
    folder = Path(folder)
    probe = [None]
    if dist.get_rank() == 0:
        probe[0] = f".node0-{uuid.uuid4().hex}"
        (folder / probe[0]).write_text(socket.gethostname())
    dist.broadcast_object_list(probe, src=0)
    deadline = time.monotonic() + patience
    while not (seen := (folder / probe[0]).is_file()) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), seen))
    if dist.get_rank() == 0:
        (folder / probe[0]).unlink()
    blind = [f"rank {rank} on {host}" for rank, (host, saw) in enumerate(views) if not saw]
    if blind:
        raise SystemExit(f"error: the nodes do not share the run folder {folder}: what rank 0 on "
                         f"{views[0][0]} writes there does not appear for {', '.join(blind)}. Every node must "
                         f"see one work dir (node 0 saves the checkpoints that all nodes resume from): set "
                         f"PACAVIT_WORK_DIRS, or {option}, to a folder on a shared file system, the same on "
                         f"every node")


def _numbered(run_dir: Path, pattern: str) -> List[Path]:
    """Files matching ``pattern`` (one ``(\\d+)`` group), highest number first."""
    regex = re.compile(pattern)
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := regex.fullmatch(p.name))]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def classification_candidates(run_dir: Path) -> List[Path]:
    """train_timm.py's checkpoints, newest first: the recovery checkpoint a SIGTERM saved (its
    epoch's next checkpoint removes it), last, then the kept epochs, then the best."""
    recovery = sorted(run_dir.glob("recovery-*.pth.tar"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return [p for p in [*recovery, run_dir / "last.pth.tar", *_numbered(run_dir, r"checkpoint-(\d+)\.pth\.tar"),
                        run_dir / "model_best.pth.tar"] if p.is_file()]


def openmmlab_candidates(run_dir: Path) -> List[Path]:
    """mmengine Runner checkpoints, newest first: the one ``last_checkpoint`` names, then by number."""
    pointer = run_dir / "last_checkpoint"
    named = []
    if pointer.is_file():
        target = Path(pointer.read_text().strip())
        # the pointer holds the path the file had when written; the folder may have moved since
        named = [run_dir / target.name] if not target.is_file() else [target]
    numbered = _numbered(run_dir, r"(?:epoch|iter)_(\d+)\.pth")
    return [p for p in dict.fromkeys(named + numbered) if p.is_file()]


def work_dirs_root() -> Path:
    """Experiments root: ``$PACAVIT_WORK_DIRS`` or the repo's ``work_dirs``."""
    return Path(os.environ.get("PACAVIT_WORK_DIRS") or REPO_ROOT / "work_dirs")


def run_folder_path(task: str, exp_name: str, subject: str, tag: str) -> Path:
    """``<work_dirs>/<task>/<exp_name>/<subject>_<tag>``: the one layout of every task's runs."""
    return work_dirs_root() / task / exp_name / f"{subject}_{tag}"


def is_finished(folder) -> bool:
    return (Path(folder) / FINISHED_MARK).is_file()


def mark_finished(folder) -> None:
    """Mark a run whose training returned (call on rank 0): the launchers leave it alone after this."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (Path(folder) / FINISHED_MARK).write_text(f"finished {stamp}\n")


def resume_point(task: str, folder, report=print) -> Optional[Path]:
    """The newest checkpoint of ``folder`` whose records check out, or None when it has none yet.

    Each broken one is reported (``report``); CheckpointError when none is intact.  A folder with
    files but no checkpoint (a run stopped before its first one) gets a note that it starts over.
    Nothing is unpickled: whether the file holds this run's training state is checked where it is
    loaded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = openmmlab_candidates(folder) if task == "openmmlab" else classification_candidates(folder)
    broken = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            report(f"error: {err}")
            broken.append(path)
            continue
        if broken:
            report(f"resuming from the newest intact checkpoint of this run instead: {path}")
        return path
    if broken:
        extra = [folder / "last_checkpoint"] if (folder / "last_checkpoint").is_file() else []
        files = " ".join(str(p) for p in broken + extra)
        raise CheckpointError(
            f"no intact checkpoint is left in {folder}. Delete the broken file(s) to start this run again "
            f"from scratch in the same folder: rm {files}  (or relaunch with Remove_old=1 --yes)"
        )
    # a run stopped before its first checkpoint leaves logs behind: say that it starts over
    left = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        report(f"note: {folder} holds no checkpoint yet ({shown}): this run starts from scratch there")
    return None


def agreed_resume_point(task: str, folder, requested: Optional[str] = None) -> Optional[str]:
    """Where every rank resumes: ``requested``, else :func:`resume_point` of ``folder`` (None: a
    fresh start).  Rank 0 decides and sends its answer to all ranks of all nodes: nodes that read a
    shared folder at different moments (node 0 still removing an old run, a file system's stale
    cache) would otherwise start at different steps and wait for each other forever.  No intact
    checkpoint ends every rank with the same one-line error.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    decision = [None, None]  # (checkpoint, error)
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            path = requested or resume_point(task, folder, report=lambda line: print(line, file=sys.stderr))
            decision[0] = None if path is None else str(path)
        except CheckpointError as err:
            decision[1] = f"error: {err}"
    if distributed:
        torch.distributed.broadcast_object_list(decision, src=0)
    if decision[1]:
        raise SystemExit(decision[1])
    return decision[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    point = sub.add_parser("resume-point", help="print the checkpoint to resume RUN_DIR from")
    point.add_argument("task", choices=("classification", "openmmlab"))
    point.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        path = resume_point(args.task, args.run_dir, report=lambda line: print(line, file=sys.stderr))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if path is not None:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
