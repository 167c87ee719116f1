"""Fixtures of the segmentation tests: the official golden data, the tiny ADE20K set, a free port."""
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SEGMENTATION = REPO / "segmentation"

# CI checks the shared folder out beside the clone; a copy inside the repo works too.
GOLDEN_CANDIDATES = (REPO.parent / "shared" / "golden", REPO / "tests" / "fixtures" / "golden")
HEAD_MANIFEST = Path("manifests") / "paca_seg_head_ade20k.json"


@pytest.fixture(scope="session")
def seg_golden_dir() -> Path:
    """The folder with the official PaCa head's manifest, outputs and weights.py."""
    for candidate in GOLDEN_CANDIDATES:
        if (candidate / HEAD_MANIFEST).is_file():
            return candidate
    pytest.fail(
        "golden data of the PaCa segmentation head not found; looked for "
        + " and ".join(str(c / HEAD_MANIFEST) for c in GOLDEN_CANDIDATES)
        + ". Check out the shared folder beside the repository (../shared/golden)."
    )


@pytest.fixture(scope="session")
def golden_weights(seg_golden_dir):
    """The golden ``weights.py`` module (deterministic, key-addressed weights and inputs)."""
    spec = importlib.util.spec_from_file_location("golden_weights", seg_golden_dir / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_ade(tmp_path_factory) -> Path:
    """A tiny synthetic ADE20K: ``<root>/ADEChallengeData2016``; returns <root> (``PACAVIT_DATASETS``)."""
    root = tmp_path_factory.mktemp("datasets")
    subprocess.run([sys.executable, str(SEGMENTATION / "make_tiny_ade.py"), "--out", str(root / "ADEChallengeData2016"),
                    "--num-train", "4", "--num-val", "2", "--size", "64", "96"], check=True)
    return root


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
