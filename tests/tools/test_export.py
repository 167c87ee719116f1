"""Deployment export: ONNX through torch.onnx's dynamo exporter (dynamic batch and image size,
checked in onnxruntime), torch.export for every clustering kind, and tools/export_onnx.py end to end.

Small inputs (64 pixels for the export, 96x128 for the second check) keep the exports fast; the
models are the zoo rows, or rows with fewer blocks where only the code path matters.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch

import models
from models.paca_vit import RELEASED_IMAGENET
from tools import export_onnx

REPO = Path(__file__).resolve().parents[2]

Dim = torch.export.Dim
DYNAMIC = {"x": {0: Dim("batch"), 2: Dim("height", min=33), 3: Dim("width", min=33)}}


def run_onnx(path, images: torch.Tensor) -> list:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})


def input_dims(path) -> list:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.slow
def test_onnx_export_has_dynamic_batch_and_size_and_agrees_with_onnxruntime(tmp_path):
    # the ConvMixer-teacher backbone (one block per stage): teacher, clustering and four outputs in one graph
    backbone = models.create_downstream("pacavit_convmixer_tiny_100", depths=(1, 1, 1, 1), teacher_depths=(1, 1, 1, 1))
    backbone.eval()
    path = export_onnx.export(backbone, tmp_path / "backbone.onnx", img_size=64)
    assert input_dims(path) == ["batch", 3, "height", "width"]

    for shape in [(1, 3, 64, 64), (3, 3, 96, 128)]:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = backbone(images)
        got = run_onnx(path, images)
        assert [o.shape for o in got] == [tuple(e.shape) for e in expected]
        for ort_out, torch_out in zip(got, expected):
            np.testing.assert_allclose(ort_out, torch_out.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("pacavit_tiny_p2cconv_100_0", {}),
        ("pacavit_small_p2cmlp_100_0", dict(depths=(1, 1, 1, 1))),
        ("pacavit_small_p2clinear_100_0", dict(depths=(1, 1, 1, 1))),
        ("pacavit_small_p2cconv_100_blockwise", dict(depths=(1, 1, 2, 1))),
        ("pacavit_convmixer_tiny_100", dict(depths=(1, 1, 1, 1), teacher_depths=(1, 1, 1, 1))),
    ],
)
def test_torch_export_with_dynamic_shapes_matches_eager(name, overrides):
    model = timm.create_model(name, **overrides).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=DYNAMIC)
    images = torch.randn(3, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_export_command_writes_a_checked_file_of_a_finetuned_checkpoint(tmp_path):
    name = "pacavit_tiny_p2cconv_100_0"
    trained = timm.create_model(name, num_classes=10).eval()
    class_names = [f"digit_{i}" for i in range(10)]
    checkpoint = tmp_path / "model_best.pth.tar"
    # the layout of a training checkpoint (timm's CheckpointSaver, plus the class folder names)
    torch.save({"epoch": 3, "arch": name, "state_dict": trained.state_dict(), "class_names": class_names}, checkpoint)

    out = tmp_path / "exported" / "digits.onnx"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_onnx.py"), name, "--checkpoint", str(checkpoint),
         "--out", str(out), "--img-size", "64", "--opset", "18"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert "agrees with PyTorch at 1x3x64x64 and 3x3x96x128" in result.stdout

    saved = onnx.load(str(out), load_external_data=False)
    assert {p.domain: p.version for p in saved.opset_import}[""] == 18
    metadata = {p.key: p.value for p in saved.metadata_props}
    assert metadata["model_name"] == name and json.loads(metadata["class_names"]) == class_names
    images = torch.randn(2, 3, 80, 112)
    (logits,) = run_onnx(out, images)
    with torch.no_grad():
        np.testing.assert_allclose(logits, trained(images).numpy(), rtol=1e-3, atol=1e-4)


def test_export_loads_the_checkpoint_class_count_names_and_ema_weights(tmp_path):
    name = "pacavit_tiny_p2cconv_100_0"
    trained, ema = timm.create_model(name, num_classes=3), timm.create_model(name, num_classes=3)
    checkpoint = tmp_path / "last.pth.tar"
    torch.save(
        {"state_dict": trained.state_dict(), "state_dict_ema": ema.state_dict(), "class_names": ["a", "b", "c"]},
        checkpoint,
    )
    for use_ema, source in ((False, trained), (True, ema)):
        model, class_names = export_onnx.build_model(name, str(checkpoint), use_ema=use_ema)
        assert class_names == ["a", "b", "c"] and model.num_classes == 3 and not model.training
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_export_takes_the_released_pretrained_file_for_classifier_and_backbone(tmp_path, monkeypatch):
    name = "pacavit_tiny_p2cconv_100_0"
    released = timm.create_model(name)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.save(released.state_dict(), mirror / RELEASED_IMAGENET[name])
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", str(mirror))  # a folder mirror: no network
    monkeypatch.setenv("PACAVIT_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    expected = released.state_dict()
    for model_name in (name, name + export_onnx.DOWNSTREAM):
        model, class_names = export_onnx.build_model(model_name, "pretrained")
        assert class_names is None and not model.training
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_export_command_rejects_unknown_names_and_tiny_sizes(capsys):
    with pytest.raises(SystemExit, match="unknown model 'pacavit_huge'.*pacavit_tiny_p2cconv_100_0"):
        export_onnx.main(["pacavit_huge"])
    with pytest.raises(SystemExit):
        export_onnx.main(["pacavit_tiny_p2cconv_100_0", "--img-size", "16"])
    assert "--img-size must be at least 33" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--opset", "17"], "--opset must be 18 to"),
    (["--opset", "99"], "--opset must be 18 to"),
    (["--out", "notes.txt"], "--out notes.txt is not an .onnx file name, e.g. --out notes.onnx"),
])
def test_export_command_rejects_opsets_it_cannot_write_and_other_files(flags, message, capsys):
    with pytest.raises(SystemExit):
        export_onnx.main(["pacavit_tiny_p2cconv_100_0", *flags])
    assert message in capsys.readouterr().err


def test_a_failed_check_leaves_no_file_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    monkeypatch.setattr(export_onnx, "export", lambda model, path, *args: path.write_bytes(b"a new export"))

    def disagree(model, path, shapes):
        raise AssertionError(f"{path} disagrees with PyTorch")

    monkeypatch.setattr(export_onnx, "check", disagree)
    with pytest.raises(AssertionError, match="model.onnx.partial disagrees"):
        export_onnx.main(["pacavit_tiny_p2cconv_100_0", "--out", str(out), "--img-size", "64"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and out.read_bytes() == b"an earlier export"
