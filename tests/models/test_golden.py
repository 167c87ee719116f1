"""The backbone against the official implementation: parameter names/shapes, counts and outputs."""
import json

import pytest
import timm
import torch

import models
from models.paca_vit import create_downstream
from tests.conftest import GOLDEN
from tests.fixtures.golden.weights import deterministic_state_dict, golden_input

MANIFESTS = sorted(p.stem for p in (GOLDEN / "manifests").glob("pacavit_*.json"))
WITH_OUTPUTS = sorted(p.stem for p in (GOLDEN / "outputs").glob("pacavit_*.pt"))


def build(name: str) -> torch.nn.Module:
    if name.endswith("_downstream"):
        return create_downstream(name, drop_path_rate=0.0, layer_scale=None)
    return timm.create_model(name)


def manifest(name: str) -> dict:
    return json.loads((GOLDEN / "manifests" / f"{name}.json").read_text())


def test_every_variant_has_a_manifest():
    names = set(models.VARIANTS) | {f"{n}_downstream" for n in models.VARIANTS if n != "pacavit_small_p2clinear_100_0"}
    assert names == set(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_state_dict_matches_official(name):
    expected = manifest(name)
    model = build(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: shape for k, shape in expected["state_dict"]}
    # the order too: an optimizer state is matched to the parameters by position
    assert list(got) == [k for k, _ in expected["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]
    model.load_state_dict(deterministic_state_dict(model), strict=True)


@pytest.mark.parametrize("name", WITH_OUTPUTS)
def test_float64_forward_matches_official(name):
    spec = manifest(name)
    model = build(name)
    model.load_state_dict(deterministic_state_dict(model), strict=True)
    model = model.double().eval()
    with torch.no_grad():
        out = model(golden_input(spec["input"]["shape"], spec["input"]["seed"]))
    outputs = out if isinstance(out, (list, tuple)) else [out]
    golden = torch.load(GOLDEN / "outputs" / f"{name}.pt", weights_only=True)["outputs"]
    assert [list(o.shape) for o in outputs] == spec["output_shapes"]
    for got, want in zip(outputs, golden):
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)


def test_second_construction_is_identical():
    """The official code mutated shared config dicts and broke on a second construction."""
    first, second = build("pacavit_convmixer_tiny_100"), build("pacavit_convmixer_tiny_100")
    assert first.state_dict().keys() == second.state_dict().keys()
    assert models.VARIANTS["pacavit_convmixer_tiny_100"]["num_clusters"] == (100, 100, 100, 100)


@pytest.mark.parametrize("name", ["pacavit_convmixer_tiny_100", "pacavit_convmixer_tiny_100_downstream"])
def test_optimizer_state_in_official_order_resumes(name):
    """An optimizer state saved for the official parameter order steps our model."""
    model = build(name)
    buffers = {k for k, _ in model.named_buffers()}
    official = [shape for key, shape in manifest(name)["state_dict"] if key not in buffers]
    assert sum(torch.Size(s).numel() for s in official) == manifest(name)["num_params"]
    stand_in = [torch.nn.Parameter(torch.zeros(shape)) for shape in official]
    saved = torch.optim.AdamW(stand_in)
    for p in stand_in:
        p.grad = torch.ones_like(p)
    saved.step()

    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(saved.state_dict())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # a parameter at another position than officially fails here on its shape
    assert [optimizer.state[p]["exp_avg"].shape for p in model.parameters()] == [torch.Size(s) for s in official]
