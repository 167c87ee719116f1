"""The whole PaCa-Tiny segmentors (PaCa head, UperNet) against the official pipeline on a photo.

``tests/fixtures/golden/downstream/segmentors_pacavit_tiny_flower.pt`` holds the official backbone's
(and PaCa head's) per-pixel logits and class map inside the zoo configs through mmseg / mmcv (see
``tests/fixtures/golden/README.md`` and the shared golden README's "downstream/" section).
"""
import os

import pytest
import sklearn
import torch
from mmengine.config import Config
from mmseg.apis import inference_model, init_model

from tests.conftest import GOLDEN, REPO
from tests.fixtures.golden.weights import deterministic_state_dict

CONFIGS = {
    "pacahead": "paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py",
    "upernet": "upernet/upernet_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py",
}
FLOWER = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "flower.jpg")
TEST_SCALE = (448, 336)  # the golden README's Resize scale for the segmentors


def golden_config(head: str) -> Config:
    """The zoo config as the golden files were made: no backbone checkpoint, the test pipeline
    without annotations and at the golden scale."""
    cfg = Config.fromfile(str(REPO / "segmentation/configs/paca_vit" / CONFIGS[head]))
    cfg.model.backbone.init_cfg = None
    cfg.test_pipeline = [step for step in cfg.test_pipeline if step.type != "LoadAnnotations"]
    for step in cfg.test_pipeline:
        if step.type == "Resize":
            step.scale = TEST_SCALE
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("head", sorted(CONFIGS))
def test_segmentor_reproduces_official_logits(head):
    model = init_model(golden_config(head), checkpoint=None, device="cpu")
    model.load_state_dict(deterministic_state_dict(model, torch.float32), strict=True)
    model.eval()
    result = inference_model(model, FLOWER)
    official = torch.load(GOLDEN / "downstream" / "segmentors_pacavit_tiny_flower.pt", weights_only=True)[head]

    torch.testing.assert_close(result.seg_logits.data[:, ::8, ::8], official["logits"], rtol=0, atol=1e-3)
    classes = result.pred_sem_seg.data[0]
    assert classes.shape == official["classes"].shape
    assert torch.equal(classes.to(torch.uint8), official["classes"])
