"""Fixtures of the detection tests: the tiny synthetic COCO set and the environment of a launcher run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DETECTION = REPO / "detection"

TINY_CONFIG = "configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py"


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory) -> Path:
    """A datasets folder holding coco_tiny/ (4 training and 2 validation images)."""
    root = tmp_path_factory.mktemp("datasets")
    subprocess.run(
        [sys.executable, str(DETECTION / "make_tiny_coco.py"), "--out", str(root / "coco_tiny"),
         "--train", "4", "--val", "2"],
        check=True, capture_output=True,
    )
    return root


@pytest.fixture()
def launcher_env(datasets_root, tmp_path) -> dict:
    """Environment that keeps a launcher run on CPU, out of the repo's work_dirs/ and datasets/."""
    return {
        **os.environ,
        "PACAVIT_DATASETS": str(datasets_root),
        "PACAVIT_WORK_DIRS": str(tmp_path / "work_dirs"),
        "PACAVIT_DEVICE": "cpu",
        "OMP_NUM_THREADS": "2",
    }
