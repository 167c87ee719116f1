"""The weights of a detection run: a config's ``load_from`` fine-tunes, a resume wins over it and must
fit the config's model exactly (as test_mmdet.py requires), ``pretrained`` names the config's released file."""
from pathlib import Path

import pytest
import torch
from mmengine.registry import MODELS

from .conftest import DETECTION, TINY_CONFIG
from models.checkpoint import release_url
from runtime import openmmlab

CONFIG = DETECTION / TINY_CONFIG


@pytest.fixture(scope="module")
def detector_weights(tmp_path_factory):
    """A checkpoint of the tiny config's detector, as mmengine's Runner saves one."""
    cfg = openmmlab.load_config(str(CONFIG), "mmdet")
    cfg.model.backbone.init_cfg = None
    state_dict = MODELS.build(cfg.model).state_dict()
    path = tmp_path_factory.mktemp("weights") / "epoch_1.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": state_dict}, path)
    return path, state_dict


def test_config_load_from_fine_tunes_when_no_run_resumes(train_config_of, detector_weights, tmp_path):
    path, _ = detector_weights
    cfg = train_config_of(CONFIG, "mmdet", "detection", "--cfg-options", f"load_from={path}")
    assert cfg.load_from == str(path) and cfg.resume is False


def test_config_load_from_pretrained_is_the_released_file_and_a_missing_one_is_one_line(
        train_config_of, detector_weights, release_server, tmp_path):
    path, _ = detector_weights
    (release_server / f"{CONFIG.stem}.pth").write_bytes(path.read_bytes())
    cfg = train_config_of(CONFIG, "mmdet", "detection", "--cfg-options", "load_from=pretrained")
    assert Path(cfg.load_from).read_bytes() == path.read_bytes() and cfg.resume is False  # the cached download
    with pytest.raises(SystemExit, match=rf"^error: load_from in .*{CONFIG.name}: checkpoint file not found: "):
        train_config_of(CONFIG, "mmdet", "detection", "--cfg-options", f"load_from={tmp_path / 'missing.pth'}")


def test_a_resume_wins_over_load_from_and_is_checked(train_config_of, tmp_path, monkeypatch):
    checked = []
    monkeypatch.setattr(openmmlab, "refuse_unfit_resume", lambda model, checkpoint: checked.append(checkpoint))
    resume = str(tmp_path / "iter_8.pth")
    cfg = train_config_of(CONFIG, "mmdet", "detection", "--resume", resume,
                          "--cfg-options", f"load_from={tmp_path / 'not read when a run resumes.pth'}")
    assert cfg.load_from == resume and cfg.resume is True and checked == [resume]


def test_resume_must_fit_the_model_exactly(detector_weights, tmp_path, datasets_root, monkeypatch):
    path, state_dict = detector_weights
    cfg = openmmlab.load_config(str(CONFIG), "mmdet")
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    openmmlab.refuse_unfit_resume(model, str(path))  # its own checkpoint: accepted

    # one tensor short: mmengine's resume would load the rest and train on
    short = tmp_path / "short.pth"
    torch.save({"state_dict": dict(list(state_dict.items())[:-1])}, short)
    with pytest.raises(SystemExit, match=rf"^error: cannot resume: {short} does not fit MaskRCNN: missing 1"):
        openmmlab.refuse_unfit_resume(model, str(short))

    # through train_main: refused after the Runner is built, before any iteration
    monkeypatch.setenv("PACAVIT_DATASETS", str(datasets_root))
    work_dir = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^error: cannot resume: .*short.pth does not fit MaskRCNN"):
        openmmlab.train_main("mmdet", "detection", [str(CONFIG), "--work-dir", str(work_dir), "--resume", str(short)])
    assert not list(work_dir.glob("*.pth")) and not (work_dir / "FINISHED").exists()


def test_pretrained_names_the_configs_released_file(tmp_path):
    config = "configs/paca_vit/mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.py"
    assert openmmlab.weights_source("pretrained", config) == release_url(
        "mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.pth")
    assert openmmlab.weights_source(str(tmp_path / "own.pth"), config) == str(tmp_path / "own.pth")
