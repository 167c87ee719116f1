"""PaCaSegHead against the official head's golden data."""
import json

import pytest
import torch
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS

import mmseg_custom  # noqa: F401  (registers the head and the segmentor)
from models import capture_maps


@pytest.fixture(scope="module")
def manifest(seg_golden_dir):
    return json.loads((seg_golden_dir / "manifests" / "paca_seg_head_ade20k.json").read_text())


@pytest.fixture(scope="module")
def golden_outputs(seg_golden_dir):
    return torch.load(seg_golden_dir / "outputs" / "paca_seg_head_ade20k.pt", weights_only=True)


def build_plain_head(manifest):
    """The golden config's head, SyncBN as plain BN (one process)."""
    cfg = dict(manifest["config"], norm_cfg=dict(type="BN", requires_grad=True))
    # in mmseg's scope: a detection test run before in the same process leaves mmdet's as the default
    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(cfg)


def build_head(manifest, golden_weights):
    """The golden config's head with the deterministic weights."""
    head = build_plain_head(manifest)
    head.load_state_dict(golden_weights.deterministic_state_dict(head), strict=True)
    return head.double()


def golden_inputs(manifest, golden_weights):
    return [golden_weights.golden_input(entry["shape"], entry["seed"]) for entry in manifest["inputs"]]


def test_state_dict_matches_official_names_and_shapes(manifest, golden_weights):
    head = build_plain_head(manifest)
    ours = {key: list(value.shape) for key, value in head.state_dict().items()}
    assert ours == {key: shape for key, shape in manifest["state_dict"]}
    assert sum(p.numel() for p in head.parameters()) == manifest["num_params"]


def test_eval_forward_matches_golden(manifest, golden_weights, golden_outputs):
    head = build_head(manifest, golden_weights).eval()
    with torch.no_grad():
        seg_logits = head(golden_inputs(manifest, golden_weights))
    assert [list(seg_logits.shape)] == manifest["output_shapes"]
    torch.testing.assert_close(seg_logits.float(), golden_outputs["outputs"][0], rtol=1e-5, atol=1e-5)


def test_train_forward_matches_golden(manifest, golden_weights, golden_outputs):
    """Training mode also returns the raw cluster logits (Dropout and BatchNorm kept in eval mode)."""
    head = build_head(manifest, golden_weights).train()
    for module in head.modules():
        if isinstance(module, (torch.nn.Dropout2d, torch.nn.modules.batchnorm._BatchNorm)):
            module.eval()
    with torch.no_grad():
        outputs = head(golden_inputs(manifest, golden_weights))
    assert [list(o.shape) for o in outputs] == manifest["train_output_shapes"]
    for ours, golden in zip(outputs, golden_outputs["train_outputs"]):
        torch.testing.assert_close(ours.float(), golden, rtol=1e-5, atol=1e-5)


def test_capture_records_assignments_without_changing_the_output(manifest, golden_weights, golden_outputs):
    head = build_head(manifest, golden_weights).eval()
    with torch.no_grad(), capture_maps(head) as records:
        seg_logits = head(golden_inputs(manifest, golden_weights))
    torch.testing.assert_close(seg_logits.float(), golden_outputs["outputs"][0], rtol=1e-5, atol=1e-5)
    (record,) = records
    height, width = manifest["output_shapes"][0][2:]
    assert record["hw"] == (height, width)
    assert record["assignments"].shape == (1, manifest["config"]["num_classes"], height, width)
    # a softmax over the pixels: each cluster's map sums to one
    torch.testing.assert_close(record["assignments"].sum(dim=(2, 3)), torch.ones(1, 150, dtype=torch.float64))


def test_attention_logits_do_not_overflow_under_float16_autocast(manifest, golden_weights):
    """The unscaled query-cluster logits sum 256 channel products: large features (here the golden
    inputs x 400) push them past float16's 65504 (inf, then NaN after the softmax), so under --amp
    they are computed in float32; the saturated attention then agrees with the float32 head."""
    head = build_head(manifest, golden_weights).float().eval()
    inputs = [400 * x.float() for x in golden_inputs(manifest, golden_weights)]
    with torch.no_grad():
        reference = head(inputs)
        with torch.autocast("cpu", dtype=torch.float16):
            mixed = head(inputs)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, rtol=0.05, atol=1.0)
