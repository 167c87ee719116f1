"""DataLoader workers that end when the process they load for is killed.

A PyTorch worker notices its parent's death by comparing ``os.getppid()`` with the parent pid it
reads only after the loader's ``worker_init_fn`` has run.  A parent killed in that gap (the OOM
killer or ``kill -9`` while an epoch's workers start) leaves a worker that takes its new parent
for the old one and waits for batches forever, holding the launcher's output pipe (the launcher
never returns) and the run folder's lock (no relaunch).  :func:`end_with_parent`, run first in
every worker that the process forks or spawns itself, closes the gap on Linux: the kernel kills
the worker when its parent dies, and a parent already dead ends the worker at once.
"""
import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Callable, Optional

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHANED_EXIT_CODE = 3


def end_with_parent() -> None:
    """In a process that ``multiprocessing`` started with ``fork`` or ``spawn`` (its parent is the
    process that started it): be killed with that process (Linux; elsewhere PyTorch's own check is
    all there is)."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent.pid:  # it died before the signal was armed
        os._exit(ORPHANED_EXIT_CODE)


class EndWithParent:
    """A loader's ``worker_init_fn``: :func:`end_with_parent`, then the loader's own init (kept
    picklable for the ``spawn`` start method)."""

    def __init__(self, init_fn: Optional[Callable[[int], None]] = None):
        self.init_fn = init_fn

    def __call__(self, worker_id: int) -> None:
        end_with_parent()
        if self.init_fn is not None:
            self.init_fn(worker_id)


def _start_method(data_loader) -> str:
    context = data_loader.multiprocessing_context  # None: multiprocessing's default
    if context is not None:
        return context.get_start_method()
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def end_workers_with_parent(loader):
    """``loader`` (a DataLoader, or timm's PrefetchLoader around one) with workers that end with
    this process; returned for chaining.  Only for workers this process starts itself (``fork``,
    ``spawn``): a ``forkserver`` worker is the server's child, which PyTorch's own check watches."""
    data_loader = getattr(loader, "loader", loader)
    if _start_method(data_loader) in ("fork", "spawn") and not isinstance(data_loader.worker_init_fn, EndWithParent):
        data_loader.worker_init_fn = EndWithParent(data_loader.worker_init_fn)
    return loader
