"""Run folders of the training launchers: which checkpoint to resume from, and the workers' lock.

A launcher resumes a run from its newest checkpoint that actually loads.  A truncated or corrupt
one (a full disk, a copy cut short) is named, and the run continues from the newest intact
checkpoint before it; when none is intact the error names the files to delete, so a relaunch
never meets the same broken file again.  The launchers call this before starting torchrun::

    python -m runtime.run_folder resume-point classification|openmmlab RUN_DIR

which prints the file to resume from (nothing for a fresh start) and exits 2 when no intact
checkpoint is left.
"""
import argparse
import fcntl
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from models.checkpoint import CheckpointError, read_checkpoint

WORKERS_LOCK_ENV = "PACAVIT_RUN_LOCK"
_held_locks = []  # open lock files, kept for the life of the process


def hold_workers_lock() -> None:
    """Share the run folder's workers lock (named by the launcher) until this process exits.

    The launcher's own lock lives in torchrun, which does not hand it to its workers; holding
    this one keeps a relaunch out while a worker orphaned by a killed launcher still trains.
    """
    path = os.environ.get(WORKERS_LOCK_ENV)
    if not path:
        return
    lock = open(path, "a")
    fcntl.flock(lock, fcntl.LOCK_SH)
    _held_locks.append(lock)


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


def _is_training_checkpoint(checkpoint, task: str) -> bool:
    if not isinstance(checkpoint, dict):
        return False
    if task == "classification":
        return "epoch" in checkpoint and "state_dict" in checkpoint and "optimizer" in checkpoint
    return "state_dict" in checkpoint and "meta" in checkpoint


def resume_point(task: str, run_dir, report=print) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that loads, or None when the run has none yet.

    Each broken one is reported (``report``); CheckpointError when none is intact.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = openmmlab_candidates(run_dir) if task == "openmmlab" else classification_candidates(run_dir)
    broken = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(str(path))
        except CheckpointError as err:
            report(f"error: {err}")
            broken.append(path)
            continue
        if not _is_training_checkpoint(checkpoint, task):
            report(f"error: {path} is not a training checkpoint of this run (no optimizer state or epoch)")
            broken.append(path)
            continue
        if broken:
            report(f"resuming from the newest intact checkpoint of this run instead: {path}")
        return path
    if broken:
        extra = [run_dir / "last_checkpoint"] if (run_dir / "last_checkpoint").is_file() else []
        files = " ".join(str(p) for p in broken + extra)
        raise CheckpointError(
            f"no intact checkpoint is left in {run_dir}. Delete the broken file(s) to start this run again "
            f"from scratch in the same folder: rm {files}  (or relaunch with Remove_old=1 --yes)"
        )
    return None


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
