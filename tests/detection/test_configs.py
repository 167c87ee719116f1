"""Every Mask R-CNN config builds its detector and runs its backbone and FPN; weights and data point
at the released ImageNet checkpoint of the variant and at <repo>/datasets/coco."""
import re
from pathlib import Path

import pytest
import torch
from mmengine.registry import MODELS

from .conftest import DETECTION, REPO
from models.checkpoint import RELEASE_BASE_URL
from runtime.openmmlab import load_config
from models.paca_vit import RELEASED_IMAGENET, VARIANTS

CONFIGS = sorted((DETECTION / "configs" / "paca_vit").rglob("*.py"))
ZOO_CONFIG = DETECTION / "configs/paca_vit/mask_rcnn_1x/mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.py"
SEED_ROWS = [
    "tiny_p2cconv_100_0", "small_p2cconv_100_0", "small_p2cmlp_100_0", "base_p2cconv_100_0",
    "convmixer_tiny_100_0", "convmixer_small_100_0", "convmixer_base_100_0",
    "small_p2cconv_2_0", "small_p2cconv_49_0", "small_p2cconv_49_100", "small_p2cconv_100_49",
    "small_p2cconv_100", "small_p2cconv_100_blockwise",
]


def test_one_config_per_zoo_row():
    stems = {p.stem for p in CONFIGS}
    assert stems == {f"mask_rcnn_pacavit_{row}_mstrain_480_800_1x_coco" for row in SEED_ROWS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem[len("mask_rcnn_pacavit_"):-len("_mstrain_480_800_1x_coco")])
def test_config_builds_and_runs(path: Path, monkeypatch):
    monkeypatch.delenv("PACAVIT_DATASETS", raising=False)
    cfg = load_config(str(path), "mmdet")
    backbone = cfg.model.backbone
    variant = backbone.type[: -len("_downstream")]
    assert variant in VARIANTS
    assert backbone.drop_path_rate == 0.1  # every official config (tests/test_recipes.py)

    released = RELEASED_IMAGENET.get(variant)
    if released:
        assert backbone.init_cfg == dict(type="Pretrained", checkpoint="pretrained")
        assert MODELS.build(backbone).checkpoint_source() == f"{RELEASE_BASE_URL}/{released}"
    else:
        assert backbone.get("init_cfg") is None
    assert cfg.train_dataloader.dataset.data_root == str(REPO / "datasets" / "coco") + "/"
    assert cfg.test_evaluator.ann_file == str(REPO / "datasets" / "coco" / "annotations" / "instances_val2017.json")

    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).eval()
    # backbone + FPN: what differs between the configs (the heads are mmdet's, run in test_pipeline)
    with torch.no_grad():
        features = model.extract_feat(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 16 // 2**i, 16 // 2**i) for i in range(5)]


def test_training_pipeline_is_the_multi_scale_crop_recipe():
    cfg = load_config(str(CONFIGS[0]), "mmdet")
    choice = next(t for t in cfg.train_dataloader.dataset.pipeline if t.type == "RandomChoice")
    resize_only, crop_branch = choice.transforms
    scales = [(s, 1333) for s in range(480, 801, 32)]
    assert resize_only[0].scales == scales
    assert [t.type for t in crop_branch] == ["RandomChoiceResize", "RandomCrop", "RandomChoiceResize"]
    assert crop_branch[1].crop_size == (384, 600) and crop_branch[2].scales == scales
    assert cfg.optim_wrapper.optimizer == dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {"norm": dict(decay_mult=0.0)}


def test_auto_scale_lr_uses_the_official_total_batch(train_config_of):
    """--auto-scale-lr scales from the official 8 GPUs x 2 images (mmdet's 1x schedule sets 16)."""
    cfg = train_config_of(CONFIGS[0], "mmdet", "detection", "--auto-scale-lr")
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size


@pytest.mark.parametrize("option, message", [
    ("train_cfg.max_epochs=abc", "train_cfg.max_epochs='abc': the config's train_cfg.max_epochs is 12, so the value must "
                                 "be an integer"),
    ("optim_wrapper.optimizer.lr=fast", "optim_wrapper.optimizer.lr='fast': the config's optim_wrapper.optimizer.lr "
                                        "is 0.0001, so the value must be a number"),
])
def test_a_cfg_option_of_the_wrong_kind_is_one_error_line(option, message):
    from mmengine.config import DictAction

    parsed = DictAction._parse_iterable  # what --cfg-options makes of the text
    key, text = option.split("=", 1)
    with pytest.raises(SystemExit, match="^error: --cfg-options " + re.escape(message) + "$"):
        load_config(str(ZOO_CONFIG), "mmdet", {key: parsed(text)})
    tuned = load_config(str(ZOO_CONFIG), "mmdet", {"train_cfg.max_epochs": 24, "optim_wrapper.optimizer.lr": 2e-4,
                                                   "new_key.anything": "abc"})
    assert tuned.train_cfg.max_epochs == 24 and tuned.optim_wrapper.optimizer.lr == 2e-4
