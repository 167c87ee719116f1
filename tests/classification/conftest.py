import os

import pytest

from .cls_helpers import write_colour_dataset


@pytest.fixture(scope="session")
def cls_env(tmp_path_factory):
    """Environment for the launchers: data and work_dirs roots in tmp, one CPU thread per process
    (the CI machine's cores are shared; oversubscribed OpenMP threads slow everything down)."""
    base = tmp_path_factory.mktemp("cls")
    write_colour_dataset(base / "datasets" / "TINY")
    env = dict(os.environ, PACAVIT_DATASETS=str(base / "datasets"), PACAVIT_WORK_DIRS=str(base / "work_dirs"),
               PACAVIT_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PACAVIT_YES", None)
    return env
