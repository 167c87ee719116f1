"""The cluster output layer is named once (``named_cluster_outputs`` / ``find_cluster_output_layers``)
and used, by module, by the checkpoint loader's "clustering" group, the fused CPU transform and the
ADE20K lr multiplier; the state_dict keys stay the official ones.  All clustering kinds."""
import json

import pytest
import timm
import torch

import models
from models.checkpoint import load_checkpoint
from models.layers import find_cluster_output_layers
from models.layers.fused import ChannelMajorConv2d, ChannelMajorLinear

from tests.conftest import REPO

SMALL = dict(depths=(1, 1, 2, 1))
# per kind: a model of that kind, where its output layers sit (official keys), and their class
KINDS = {
    "conv": ("pacavit_tiny_p2cconv_100_0", "stage{s}.0.attn.clustering.clustering.4", torch.nn.Conv2d),
    "mlp": ("pacavit_small_p2cmlp_100_0", "stage{s}.0.attn.clustering.clustering.2", torch.nn.Linear),
    "linear": ("pacavit_small_p2clinear_100_0", "stage{s}.0.attn.clustering.clustering.0", torch.nn.Linear),
    "teacher": ("pacavit_convmixer_tiny_100", "paca_teacher.to_clusters{s}", torch.nn.Conv2d),
}
FUSED_CLASS = {torch.nn.Conv2d: ChannelMajorConv2d, torch.nn.Linear: ChannelMajorLinear}


def expected_paths(kind):
    name, pattern, _ = KINDS[kind]
    stages = [s + 1 for s, m in enumerate(models.VARIANTS[name]["num_clusters"]) if m > 0]
    return name, [pattern.format(s=s) for s in stages]


@pytest.mark.parametrize("kind", KINDS)
def test_found_by_module_at_the_official_keys(kind):
    name, paths = expected_paths(kind)
    model = timm.create_model(name, **SMALL)
    found = list(find_cluster_output_layers(model))
    assert [path for path, _, _ in found] == paths
    assert {k for _, k, _ in found} == {kind}
    for path, _, layer in found:
        assert layer is model.get_submodule(path) and type(layer) is KINDS[kind][2]
        assert layer.weight.shape[0] == 100  # it outputs the M cluster logits
    # the official state_dict keys (golden manifest) are unchanged
    manifest = json.loads((REPO / "tests/fixtures/golden/manifests" / f"{name}.json").read_text())
    assert {f"{p}.weight" for p in paths} <= {key for key, _ in manifest["state_dict"]}


@pytest.mark.parametrize("kind", KINDS)
def test_loader_reinitialises_exactly_the_output_layers(kind, tmp_path):
    """ImageNet weights into a backbone with 200 clusters: only the output layers are re-initialised."""
    name, paths = expected_paths(kind)
    path = tmp_path / "imnet.pth"
    torch.save({"state_dict": timm.create_model(name, **SMALL).state_dict()}, path)
    clusters = tuple(200 if m else 0 for m in models.VARIANTS[name]["num_clusters"])
    backbone = models.create_downstream(name, downstream_cluster_num=clusters, **SMALL)
    report = load_checkpoint(backbone, path, reinit=("head", "clustering"))
    assert sorted(report.reinitialised) == sorted(f"{p}.{t}" for p in paths for t in ("weight", "bias")
                                                 if f"{p}.{t}" in backbone.state_dict())
    assert len(report.loaded) == len(backbone.state_dict()) - len(report.reinitialised)


@pytest.mark.parametrize("kind", ["conv", "mlp", "linear"])
def test_fused_transform_swaps_the_output_layer_in_place(kind, monkeypatch):
    from models.layers import fused

    monkeypatch.setattr(fused, "cpu_fusion_support", lambda: frozenset({torch.float32}))
    name, paths = expected_paths(kind)
    model = timm.create_model(name, **SMALL).eval()
    keys = list(model.state_dict())
    models.fuse_for_cpu(model)
    assert list(model.state_dict()) == keys
    assert [path for path, _, _ in find_cluster_output_layers(model)] == paths
    for path, _, layer in find_cluster_output_layers(model):
        assert type(layer) is FUSED_CLASS[KINDS[kind][2]]
