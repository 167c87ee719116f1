"""Nothing silently lost or wrong in tools/predict.py's output folder and image reading (issue 19):
a finished run's results are never replaced without --overwrite, two runs never write into one
folder, a bad --out is one line before any model loads, and 16-bit images keep their brightness.
The same for export_onnx.py's --out."""
import errno
import json
import logging
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from runtime import images
from tools import export_onnx, predict, visualize_clusters

from .conftest import TOOLS, generated_image

MODEL = "pacavit_tiny_p2cconv_100_0"


@pytest.fixture
def grey(tmp_path):
    """The generated picture in grey, as an 8-bit PNG and its 16-bit copy (each value times 257)."""
    values = np.asarray(Image.fromarray(generated_image()).convert("L"))
    Image.fromarray(values).save(tmp_path / "grey8.png")
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"  # what Pillow makes of a 16-bit grey PNG
    return values, tmp_path / "grey8.png", tmp_path / "grey16.png"


def classify(*images, out, extra=()):
    return predict.main(["classify", *map(str, images), "--model", MODEL, "--out", str(out), "--device", "cpu",
                         *extra])


def model_must_not_load(*args):
    raise AssertionError("a model started loading: the --out check must come first")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(predict, "build_predictor", model_must_not_load)


# -- 16-bit images ---------------------------------------------------------------------------------
def test_16_and_32_bit_and_float_grey_read_as_their_8_bit_original(grey, tmp_path, caplog):
    values, eight_bit, sixteen_bit = grey
    expected = images.read_image(str(eight_bit))
    np.testing.assert_array_equal(expected, np.repeat(values[..., None], 3, axis=2))
    Image.fromarray(values.astype(np.int32) * 257, mode="I").save(tmp_path / "grey32.tif")
    Image.fromarray(values.astype(np.float32) / 255, mode="F").save(tmp_path / "float.tif")
    colour = generated_image()
    cv2.imwrite(str(tmp_path / "rgb16.png"), colour[..., ::-1].astype(np.uint16) * 257)  # 48-bit RGB
    for path in (sixteen_bit, tmp_path / "grey32.tif", tmp_path / "float.tif"):
        np.testing.assert_array_equal(images.read_image(str(path)), expected, err_msg=str(path))
    np.testing.assert_array_equal(images.read_image(str(tmp_path / "rgb16.png")), colour)
    assert "exceed" not in caplog.text
    # the cluster visualiser reads through the same function
    np.testing.assert_array_equal(visualize_clusters.load_image(str(sixteen_bit), 64),
                                  visualize_clusters.load_image(str(eight_bit), 64))


def test_values_beyond_the_bit_depth_are_stretched_with_a_warning_naming_the_file(grey, tmp_path, caplog):
    values = grey[0]
    Image.fromarray(values.astype(np.int32) * 4096 - 100_000, mode="I").save(tmp_path / "wide.tif")
    with caplog.at_level(logging.WARNING):
        stretched = images.read_image(str(tmp_path / "wide.tif"))[..., 0]
    assert f"{tmp_path / 'wide.tif'}: its I values" in caplog.text and "not what was stored" in caplog.text
    assert (stretched.min(), stretched.max()) == (0, 255)
    assert np.array_equal(np.argsort(stretched, axis=None, kind="stable"), np.argsort(values, axis=None, kind="stable"))


@pytest.mark.slow
def test_a_16_bit_png_is_predicted_as_its_8_bit_version(grey, tmp_path):
    _, eight_bit, sixteen_bit = grey
    assert classify(eight_bit, sixteen_bit, out=tmp_path / "out") == 0
    first, second = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert first["top5"] == second["top5"]


# -- the output folder ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_finished_run_is_kept_unless_overwrite_and_then_replaced_whole(grey, tmp_path, monkeypatch, caplog):
    _, eight_bit, sixteen_bit = grey
    out = tmp_path / "out"
    assert classify(eight_bit, out=out) == 0
    finished = (out / "predictions.json").read_bytes()

    real_build = predict.build_predictor
    monkeypatch.setattr(predict, "build_predictor", model_must_not_load)
    assert classify(sixteen_bit, out=out) == 2
    assert f"{out} holds the results of an earlier run (predictions.json); pass --overwrite" in caplog.text
    assert (out / "predictions.json").read_bytes() == finished and (out / "grey8.png").is_file()

    monkeypatch.setattr(predict, "build_predictor", real_build)
    assert classify(sixteen_bit, out=out, extra=["--overwrite"]) == 0
    (entry,) = json.loads((out / "predictions.json").read_text())["images"]
    assert entry["image"] == str(sixteen_bit)
    assert sorted(p.name for p in out.iterdir()) == ["grey16.png", "predictions.json"]  # the earlier picture went


def test_a_second_run_into_a_folder_another_process_holds_is_refused_until_it_ends(grey, tmp_path, no_model, caplog):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, predict; from pathlib import Path\n"
                               "with predict.claimed_output(Path(sys.argv[1]), False):\n"
                               "    print('held', flush=True); sys.stdin.read()", str(out)],
        cwd=TOOLS, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert classify(grey[1], out=out) == 2
        assert f"another predict.py run is writing into {out}" in caplog.text
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait(timeout=60)
    with predict.claimed_output(out, overwrite=False):
        assert out.is_dir()


def test_an_unusable_out_is_one_line_with_the_usage_exit_code(grey, tmp_path, no_model, monkeypatch, caplog):
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    assert classify(grey[1], out=a_file) == 2
    assert f"error: --out {a_file} is a file, not a folder; choose another --out" in caplog.text
    assert a_file.read_text() == "keep me"
    assert classify(grey[1], out=a_file / "inside") == 2
    assert f"cannot create the --out folder {a_file / 'inside'} (Not a directory)" in caplog.text

    # a read-only folder (simulated: this test may run as root, which writes anywhere)
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(predict.tempfile, "TemporaryFile", read_only)
    locked = tmp_path / "read only"
    locked.mkdir()
    assert classify(grey[1], out=locked) == 2  # 1 is reserved for unreadable images
    assert f"cannot write into the --out folder {locked} (Permission denied); choose another --out" in caplog.text
    assert locked.is_dir()  # not this run's to remove
    assert "Traceback" not in caplog.text


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path, grey, caplog):
    out = tmp_path / "new" / "out"
    assert predict.main(["classify", str(grey[1]), "--model", MODEL, "--checkpoint", str(tmp_path / "none.pth"),
                         "--out", str(out)]) == 2
    assert not out.exists()


def test_export_onnx_refuses_a_folder_as_out_before_exporting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_onnx, "build_model", model_must_not_load)
    with pytest.raises(SystemExit) as exit_:
        export_onnx.main([MODEL, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"--out {tmp_path} is a folder; give the file to write, e.g. --out {tmp_path / MODEL}.onnx" in \
        capsys.readouterr().err
