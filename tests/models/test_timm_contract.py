"""timm's own model test suite, run for every pacavit model.

The suite is ``tests/test_models.py`` of timm 1.0.31's sdist, which ``./install.sh`` unpacks to
``.cache/timm-1.0.31/tests/``.  It runs in a subprocess on a copy of that file in which only
``FEAT_INTER_FILTERS`` gains this project's model module (timm's opt-in list for the
``forward_intermediates`` and pruning tests; no assertion is touched), beside a conftest that
imports ``models`` so that the pacavit names are registered when the file builds its parameters.

The pretrained tests load the released file names from a local folder mirror
(``PACAVIT_CHECKPOINT_BASE_URL``) instead of the network.  Its checkpoints are plain state_dicts
with the official keys and shapes, taken from the golden manifests, not from our model.
"""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import models
from models.paca_vit import RELEASED_IMAGENET
from tests.conftest import GOLDEN, REPO

TIMM_TESTS = REPO / ".cache" / "timm-1.0.31" / "tests" / "test_models.py"
MODEL_MODULE = "paca_vit"

# every model must run (and pass) each of these; the rest depend on the model's kind
EVERY_MODEL = [
    "test_model_forward",
    "test_model_backward",
    "test_model_forward_torchscript",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
    "test_model_forward_intermediates",
    "test_model_forward_intermediates_features",
    "test_prune_intermediate_layers_contract",
]

CONFTEST = """
import models  # noqa: F401  registers the pacavit_* names with timm
"""

PYTEST_INI = """[pytest]
markers =
    base
    cfg
    cfg_nonstd
    forward
    backward
    torchscript
    features
    fxforward
    fxbackward
"""


def opt_into_intermediates_tests(source: str) -> str:
    """Add the model module to the file's FEAT_INTER_FILTERS list (and change nothing else)."""
    edited, count = re.subn(r"^FEAT_INTER_FILTERS = \[\n", f"FEAT_INTER_FILTERS = [\n    '{MODEL_MODULE}',\n", source,
                            flags=re.M)
    assert count == 1, "FEAT_INTER_FILTERS not found in timm's test_models.py"
    return edited


def write_release_mirror(folder: Path):
    """The released checkpoint files, in the official layout, with arbitrary values.

    Every float tensor is a view of one shared storage, which ``torch.save`` writes once: a file
    is a few MB instead of up to 190 MB, and loads as the full state_dict.
    """
    folder.mkdir()
    for name, filename in RELEASED_IMAGENET.items():
        if (folder / filename).exists():  # two model names share one released file
            continue
        source_model = filename[len("IMNET_224_"): -len(".pth")]
        spec = json.loads((GOLDEN / "manifests" / f"{source_model}.json").read_text())["state_dict"]
        shared = torch.rand(max(torch.Size(shape).numel() for _, shape in spec))
        state_dict = {
            key: torch.tensor(0) if key.endswith("num_batches_tracked") else shared[: torch.Size(shape).numel()].view(shape)
            for key, shape in spec
        }
        torch.save(state_dict, folder / filename)


def run_timm_suite(workdir: Path) -> subprocess.CompletedProcess:
    (workdir / "test_models.py").write_text(opt_into_intermediates_tests(TIMM_TESTS.read_text()))
    (workdir / "conftest.py").write_text(CONFTEST)
    (workdir / "pytest.ini").write_text(PYTEST_INI)
    write_release_mirror(workdir / "mirror")
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_ACTIONS", "TORCH_DEVICE", "TORCH_BACKEND")}
    # GITHUB_ACTIONS would switch timm's file to another selection (and drop the pretrained tests)
    env.update(PACAVIT_CHECKPOINT_BASE_URL=str(workdir / "mirror"), PACAVIT_CHECKPOINT_CACHE=str(workdir / "cache"))
    # the file's own knob for its per-test time limits (120-360 s), which a busy 2-core host can exceed
    env.setdefault("TIMEOUT", "900")
    command = [sys.executable, "-m", "pytest", "test_models.py", "-k", "pacavit", "-c", "pytest.ini",
               "-p", "no:cacheprovider", "-q", "--tb=short", "-rfEs", "--junitxml=report.xml"]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)


def outcomes(report: Path) -> dict:
    """{test id: 'passed' | 'failed' | 'error' | 'skipped'} from pytest's junit xml."""
    result = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[case.get("name")] = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
    return result


@pytest.mark.slow
def test_timm_model_suite_passes_for_every_pacavit_model(tmp_path):
    assert TIMM_TESTS.is_file(), (
        f"{TIMM_TESTS} is missing: run ./install.sh (it unpacks timm 1.0.31's test suite there)"
    )
    proc = run_timm_suite(tmp_path)
    log = proc.stdout[-20000:] + proc.stderr[-3000:]
    assert (tmp_path / "report.xml").is_file(), log
    results = outcomes(tmp_path / "report.xml")
    not_passed = {k: v for k, v in results.items() if v != "passed"}
    assert not not_passed and proc.returncode == 0, f"{not_passed}\n{log}"

    names = sorted(models.VARIANTS)
    for test in EVERY_MODEL:
        missing = [n for n in names if not any(re.fullmatch(rf"{test}\[(\d+-)?{n}\]", t) for t in results)]
        assert not missing, f"{test} did not run for {missing}"
    for name in names:
        assert f"test_model_default_cfgs[1-{name}]" in results or f"test_model_default_cfgs_non_std[1-{name}]" in results
    released = sorted(RELEASED_IMAGENET)
    assert [n for n in released if f"test_model_load_pretrained[1-{n}]" in results] == released


def test_intermediates_opt_in_edits_only_the_filter_list():
    source = "X = 1\nFEAT_INTER_FILTERS = [\n    'vit',\n]\nY = 2\n"
    assert opt_into_intermediates_tests(source) == f"X = 1\nFEAT_INTER_FILTERS = [\n    '{MODEL_MODULE}',\n    'vit',\n]\nY = 2\n"
    assert MODEL_MODULE == models.PaCaViT.__module__.rsplit(".", 1)[-1]
