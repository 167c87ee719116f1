"""The whole Mask R-CNN PaCa-Tiny detector against the official pipeline's detections on a photo.

``tests/fixtures/golden/downstream/mask_rcnn_pacavit_tiny_flower.pt`` holds what the official
backbone computes inside the zoo config through mmdet / mmcv (see ``tests/fixtures/golden/README.md``
and the shared golden README's "downstream/" section for how it was made).  This catches what the
backbone-only golden tests cannot: a tensor whose values are right but whose memory an mmcv op
reads differently (RoIAlign indexes its input as contiguous NCHW).
"""
import os

import pytest
import sklearn
import timm
import torch
from mmcv.ops import RoIAlign
from mmdet.apis import inference_detector, init_detector
from mmdet.structures.bbox import bbox_overlaps
from mmengine.config import Config

import models
from models.layers import fused
from models.paca_vit import create_downstream
from tests.conftest import GOLDEN, REPO
from tests.fixtures.golden.weights import deterministic_state_dict

CONFIG = (REPO / "detection/configs/paca_vit/mask_rcnn_1x"
          / "mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.py")
FLOWER = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "flower.jpg")
TEST_SCALE = (576, 432)  # the golden README's Resize scale for the detector
SMALL = dict(depths=(1, 1, 1, 1))  # every code path of the zoo rows, fewer blocks


def downstream_outputs(name: str, mode: str, monkeypatch) -> list:
    """The backbone's feature maps for a batch of 3 images in ``mode``: ``train`` (with gradients),
    ``eval``, or ``fused`` (``fuse_for_cpu`` with the oneDNN probe forced on and each
    stage run on groups of one image)."""
    torch.manual_seed(0)
    model = create_downstream(name, **SMALL)
    x = torch.randn(3, 3, 64, 96)
    if mode == "train":
        return model.train()(x)
    if mode == "fused":
        monkeypatch.setattr(fused, "cpu_fusion_support", lambda: frozenset({torch.float32}))
        model = models.fuse_for_cpu(model)
        for stage in (model.stage1, model.stage2, model.stage3, model.stage4):
            stage.tokens_per_group = 1  # groups of one image: the batch-chunked path
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("mode", ["train", "eval", "fused"])
@pytest.mark.parametrize("name", ["pacavit_tiny_p2cconv_100_0", "pacavit_convmixer_tiny_100"])
def test_downstream_maps_are_contiguous_nchw(name, mode, monkeypatch):
    """mmcv's ops index their input as contiguous NCHW: a channels_last view would be read as
    scrambled features.  RoIAlign on the maps must equal RoIAlign on a contiguous copy."""
    maps = downstream_outputs(name, mode, monkeypatch)
    rois = torch.tensor([[0, 2.0, 3.0, 40.0, 50.0], [2, 10.0, 5.0, 90.0, 60.0]])
    for level, feature in enumerate(maps):
        assert feature.is_contiguous(), f"level {level} in {mode} mode has strides {feature.stride()}"
        align = RoIAlign((7, 7), spatial_scale=1 / 2 ** (level + 2), sampling_ratio=0)
        with torch.no_grad():
            torch.testing.assert_close(align(feature, rois), align(feature.contiguous(), rois))


def test_timm_intermediates_are_contiguous_nchw():
    model = timm.create_model("pacavit_tiny_p2cconv_100_0", **SMALL).eval()
    with torch.inference_mode():
        maps = model.forward_intermediates(torch.randn(2, 3, 64, 64), intermediates_only=True)
    assert all(m.is_contiguous() for m in maps)


def golden_config() -> Config:
    """The zoo config as the golden files were made: no backbone checkpoint, every detection
    scored, the test pipeline without annotations and at the golden scale."""
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.init_cfg = None
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    pipeline = [step for step in cfg.test_dataloader.dataset.pipeline if step.type != "LoadAnnotations"]
    for step in pipeline:
        if step.type == "Resize":
            step.scale = TEST_SCALE
    cfg.test_dataloader.dataset.pipeline = pipeline
    return cfg


def unmatched(ours: dict, official: dict) -> list:
    """Indices of the official detections that no detection of ours reproduces: box IoU > 0.98,
    score within 2e-3, the same label and a mask area within 2% + 20 pixels.  Matched by content,
    since float noise may reorder near-ties."""
    iou = bbox_overlaps(official["bboxes"], ours["bboxes"])
    same = (
        (iou > 0.98)
        & ((official["scores"][:, None] - ours["scores"][None]).abs() <= 2e-3)
        & (official["labels"][:, None] == ours["labels"][None])
        & ((official["mask_area"][:, None] - ours["mask_area"][None]).abs()
           <= 0.02 * official["mask_area"][:, None] + 20)
    )
    return (~same.any(dim=1)).nonzero().flatten().tolist()


@pytest.mark.slow
def test_mask_rcnn_reproduces_official_detections():
    torch.manual_seed(0)
    model = init_detector(golden_config(), checkpoint=None, device="cpu")
    model.load_state_dict(deterministic_state_dict(model, torch.float32), strict=True)
    model.eval()
    found = inference_detector(model, FLOWER).pred_instances
    ours = dict(bboxes=found.bboxes, scores=found.scores, labels=found.labels,
                mask_area=found.masks.flatten(1).sum(dim=1).float())
    official = torch.load(GOLDEN / "downstream" / "mask_rcnn_pacavit_tiny_flower.pt", weights_only=True)

    assert len(found) == len(official["scores"]) == 100
    missing = unmatched(ours, official)
    assert not missing, f"{len(missing)} of 100 official detections not reproduced, e.g. #{missing[:5]}"
