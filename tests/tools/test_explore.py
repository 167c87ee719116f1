"""The explorer page's actions, called as the page calls them (``tools/explore.py``'s handlers).

The browser test (``test_explore_browser.py``) checks the same page through Chromium.
"""
import socket
import struct
import subprocess
import sys
import zlib
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

from tools import cluster_explorer as ce
from tools import explore
from models import capture_maps
from .conftest import REPO, SKLEARN_IMAGES

MODEL = "pacavit_tiny_p2cconv_100_0"
DET_CONFIG = "detection/configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py"
SEG_CONFIG = "segmentation/configs/paca_vit/paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py"
STAGE2_BLOCK1 = "stage 2, block 1 (same assignments as the block before)"
STATUS, PREDICTION, STAGE, HARD, SOFT, ATTENTION, BARS, LINE, KEY = range(9)


@pytest.fixture(scope="module")
def page():
    return explore.Page(ce.Explorer("cpu"))


@pytest.fixture(scope="module")
def china(page):
    """PaCa-Tiny with random weights (seed 3) on china.jpg: the page's outputs."""
    return page.on_explain("classify", MODEL, "", 3, None, "sklearn:china.jpg")


def click(page, outputs, stage, x, y):
    return page.on_click(outputs[KEY], stage, SimpleNamespace(index=[x, y]))


def test_classify_shows_prediction_and_every_stage_with_clusters(china):
    assert china[STATUS].startswith(f"**china.jpg · {MODEL}, random weights (seed 3)** · model ran in")
    assert "stage4: no clusters" in china[STATUS]
    assert china[PREDICTION].size == (640, 427)  # predict.py's picture: top-5 drawn on the photo
    stages = china[STAGE]["choices"]
    assert [s for s in stages if "block 0" in s] == ["stage 1, block 0", "stage 2, block 0", "stage 3, block 0"]
    assert "stage 3, block 1 (same assignments as the block before)" in stages
    assert china[STAGE]["value"] == "stage 3, block 0"  # the coarsest grid with clusters
    assert china[HARD].shape == (ce.DISPLAY_SIDE, ce.DISPLAY_SIDE, 3) and china[HARD].dtype == np.uint8
    assert len(china[SOFT]) == ce.SOFT_SHOWN and all(caption.endswith("%") for _, caption in china[SOFT])
    assert len(china[BARS]) == ce.ATTENDED_SHOWN
    assert china[LINE].startswith("stage 3, block 0, patch (row 7, col 7) of 14x14: attention over 100 clusters")


def test_click_answers_from_the_captured_maps_without_running_the_model(page, china):
    runs = page.explorer.forward_passes
    explanation = page.explorer.explanation(china[KEY])
    _, hard, picture, bars, line = click(page, china, STAGE2_BLOCK1, 10, 300)
    assert line.startswith(f"{STAGE2_BLOCK1}, patch (row 18, col 0) of 28x28")
    assert not np.array_equal(picture, china[ATTENTION]) and not np.array_equal(hard, china[HARD])
    _, _, other, _, _ = click(page, china, STAGE2_BLOCK1, 440, 20)
    assert not np.array_equal(picture, other)

    # the bars are that patch's attention over the clusters in a plain forward pass of the same model
    predictor = page.explorer.models[ce.ModelKey("classify", MODEL, "", 3, "cpu")]
    x = predictor.transform(Image.open(SKLEARN_IMAGES / "china.jpg").convert("RGB"))[None]
    with torch.no_grad(), capture_maps(predictor.model) as records:
        predictor.model(x)
    (record,) = [r for r in records if r["stage"] == 1 and r["block"] == 1]
    expected = record["attention"][0].mean(dim=0)[18 * 28 + 0]
    top = expected.argsort(descending=True)[: ce.ATTENDED_SHOWN]
    assert [name.split()[0] for name in bars] == [f"#{m}" for m in top.tolist()]
    assert list(bars.values()) == pytest.approx(expected[top].tolist(), rel=1e-4)
    assert len(explanation.stages[STAGE2_BLOCK1].view.attention) == 28 * 28

    status, hard, soft, picture, bars, line = page.on_stage(china[KEY], "stage 1, block 0")
    assert hard.shape == china[HARD].shape and len(soft) == ce.SOFT_SHOWN
    assert line.startswith("stage 1, block 0, patch (row 28, col 28) of 56x56")
    again = page.on_explain("classify", MODEL, "", 3, None, "sklearn:china.jpg")
    assert "from the cache (no model run)" in again[STATUS] and again[KEY] == china[KEY]
    assert page.explorer.forward_passes == runs


def test_bad_input_gives_a_message_and_the_page_keeps_working(page, china, tmp_path):
    def status_of(task="classify", model=MODEL, weights="", upload=None, sample="sklearn:china.jpg"):
        outputs = page.on_explain(task, model, weights, 3, upload, sample)
        assert all(o == explore.gr.skip() for o in outputs[1:]), "the other outputs stay as they were"
        return outputs[STATUS]

    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert status_of(upload=str(text)).startswith("**Error:** notes.jpg is not an image PIL can read")
    assert status_of(sample=None) == "**Error:** upload an image or pick a bundled photo"
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = tmp_path / "huge.png"  # a 10000x5000 PNG without its pixels: the size is refused before decoding
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 5_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b""))
    assert status_of(upload=str(huge)) == ("**Error:** huge.png is 10000x5000 pixels (50 MP); the explorer takes up to "
                                           "40 MP: downscale it first")
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 10_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b""))  # 200 MP: beyond what Pillow opens at all
    assert status_of(upload=str(huge)).startswith("**Error:** huge.png is too large (Image size (200000000 pixels)")
    assert status_of(upload=str(huge)).endswith("the explorer takes up to 40 MP: downscale it first")
    unfit = tmp_path / "other.pth"
    torch.save({"state_dict": {"stem.weight": torch.zeros(3)}}, unfit)
    message = status_of(weights=str(unfit))
    assert message.startswith(f"**Error:** {MODEL}, weights {unfit}:") and "classifier" in message
    assert status_of("segment", DET_CONFIG) == (f"**Error:** {DET_CONFIG} is a detection config: choose the task "
                                                "'detect' for it")
    assert status_of("classify", SEG_CONFIG) == (f"**Error:** {SEG_CONFIG} is a config, not a model name: choose the "
                                                 "task 'segment' for it")
    assert "unknown model 'pacavit_tiny'" in status_of(model="pacavit_tiny")
    assert status_of(model="resnet10t") == ("**Error:** resnet10t, random weights (seed 3): ResNet has no PaCa "
                                            "attention blocks or PaCa head to capture")
    assert "config file not found" in status_of("detect", "detection/configs/none.py")
    assert page.on_click("no such key", "stage 1, block 0", SimpleNamespace(index=[0, 0]))[0].startswith(
        "**Error:** this image's maps are no longer cached")
    assert page.on_explain("classify", MODEL, "", 3, None, "sklearn:china.jpg")[KEY] == china[KEY]


def test_task_offers_its_models(page):
    assert page.on_task("classify")["value"] == MODEL
    detect = page.on_task("detect")
    assert DET_CONFIG in detect["choices"] and all(c.startswith("detection/configs/") for c in detect["choices"])
    assert SEG_CONFIG in page.on_task("segment")["choices"]


def test_pretrained_classifier_through_the_release_mirror(page, release_server):
    torch.manual_seed(1)
    torch.save(dict(state_dict=timm.create_model(MODEL).state_dict()), release_server / f"IMNET_224_{MODEL}.pth")
    outputs = page.on_explain("classify", MODEL, "pretrained", 0, str(SKLEARN_IMAGES / "flower.jpg"), None)
    assert outputs[STATUS].startswith(f"**flower.jpg · {MODEL}, weights pretrained** · model ran in")
    entry = page.explorer.explanation(outputs[KEY]).entry
    names = ImageNetInfo().label_descriptions()
    assert len(entry["top5"]) == 5 and all(p["class_name"] == names[p["label"]] for p in entry["top5"])


@pytest.mark.slow
def test_detect_random_weights_boxes_and_clusters(page, tmp_path):
    photo = tmp_path / "wide.png"
    Image.open(SKLEARN_IMAGES / "flower.jpg").crop((0, 100, 600, 300)).save(photo)  # 600x200: padded input
    outputs = page.on_explain("detect", DET_CONFIG, "", 0, str(photo), None)
    assert outputs[STATUS].startswith("**wide.png · detection/configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0"
                                      "_tiny_coco.py, random weights (seed 0)**")
    assert outputs[PREDICTION].size == (600, 200)
    explanation = page.explorer.explanation(outputs[KEY])
    assert "instances" in explanation.entry
    stage = explanation.stages["stage 1, block 0"]
    # 600x200 is resized to 192x64 and padded to 192x64: all of the 48x16 grid covers the image
    assert (stage.rows, stage.cols) == (16, 48) and explanation.picture.shape[:2] == (149, 448)
    line = click(page, outputs, outputs[STAGE]["value"], 447, 148)[4]
    assert "patch (row 3, col 11) of 4x12" in line


@pytest.mark.slow
def test_segment_pretrained_through_the_mirror_head_clusters_are_the_classes(page, release_server):
    from mmseg.registry import MODELS

    from tools import predict_tasks

    cfg = predict_tasks.openmmlab_config(str(REPO / SEG_CONFIG), "mmseg", {"model.backbone.init_cfg": None})
    torch.manual_seed(0)
    torch.save(MODELS.build(cfg.model).state_dict(), release_server / (Path(SEG_CONFIG).stem + ".pth"))
    outputs = page.on_explain("segment", SEG_CONFIG, "pretrained", 0, None, "sklearn:flower.jpg")
    assert outputs[STATUS].startswith(f"**flower.jpg · {SEG_CONFIG}, weights pretrained** · model ran in")
    head = "segmentation head (one cluster per class)"
    assert head in outputs[STAGE]["choices"] and outputs[STAGE]["value"] == "stage 3, block 0"
    _, hard, soft, picture, bars, line = page.on_stage(outputs[KEY], head)
    assert picture is None and bars is None and "no patch attention" in line
    ade20k = page.explorer.explanation(outputs[KEY]).class_names
    assert len(ade20k) == 150 and all(caption.split(": ")[0].split(" ", 1)[1] in ade20k for _, caption in soft)
    assert page.on_click(outputs[KEY], head, SimpleNamespace(index=[5, 5]))[0].startswith(
        "**Error:** the segmentation head has no patch attention")


def test_command_line_reports_a_busy_port(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert explore.main(["--port", str(port), "--device", "cpu"]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in caplog.text and "pass another --port" in caplog.text


def test_explorer_extras_are_pinned_apart_installed_and_never_imported_by_the_models():
    def pins(name):
        lines = (line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines())
        return dict(line.split("==") for line in lines if line)

    extras, main = pins("requirements-explorer.txt"), pins("requirements.txt")
    assert {"gradio", "playwright"} <= extras.keys() and not extras.keys() & main.keys()
    assert all(metadata.version(name) == version for name, version in extras.items())
    loaded = subprocess.run([sys.executable, "-c", "import sys, models; print(' '.join(sys.modules))"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    assert not [name for name in loaded if name.split(".")[0] in ("gradio", "playwright")]


@pytest.mark.slow
def test_block_wise_model_shows_every_block_with_its_own_assignments(page):
    outputs = page.on_explain("classify", "pacavit_small_p2cconv_100_blockwise", "", 0, None, "sklearn:flower.jpg")
    model = page.explorer.models[ce.ModelKey("classify", "pacavit_small_p2cconv_100_blockwise", "", 0, "cpu")].model
    blocks = [f"stage {s}, block {b}" for s in (1, 2, 3, 4) for b in range(len(getattr(model, f"stage{s}")))]
    assert outputs[STAGE]["choices"] == blocks  # clusters in all four stages; no block repeats the one before
    first, second = (page.on_stage(outputs[KEY], label)[1] for label in blocks[:2])
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("cuda", [True, False])
def test_device_defaults_to_cuda_when_torch_sees_a_gpu(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert explore.parse_args([]).device == ("cuda" if cuda else "cpu")


def test_two_explanations_at_once_each_get_their_own_maps(tmp_path):
    """Two tabs (or an upload while Explain runs) on one model: the captured maps do not mix."""
    import threading

    def stage1(explorer, sample):
        key = ce.ModelKey("classify", MODEL, "", 5, "cpu")
        return explorer.explain(key, sample).stages["stage 1, block 0"].assignments

    samples = ["sklearn:china.jpg", "sklearn:flower.jpg"]
    alone = [stage1(ce.Explorer("cpu"), sample) for sample in samples]
    shared, results = ce.Explorer("cpu"), {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, stage1(shared, s))) for s in samples]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sample, expected in zip(samples, alone):
        torch.testing.assert_close(results[sample], expected)


@pytest.mark.slow
def test_a_panorama_one_pixel_high_is_explained(page, tmp_path):
    photo = tmp_path / "panorama.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2, 4000, 3), np.uint8)).save(photo)
    outputs = page.on_explain("segment", SEG_CONFIG, "", 0, str(photo), None)
    assert outputs[STATUS].startswith(f"**panorama.png · {SEG_CONFIG}, random weights (seed 0)** · model ran in")
    assert len(outputs[SOFT]) == ce.SOFT_SHOWN


def test_an_image_the_pre_processing_cannot_take_is_one_message(page, tmp_path):
    photo = tmp_path / "strip.png"  # fitted into 192x128 with its aspect ratio kept, it would be 0 px high
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 4000, 3), np.uint8)).save(photo)
    outputs = page.on_explain("detect", DET_CONFIG, "", 0, str(photo), None)
    assert outputs[STATUS] == ("**Error:** strip.png is 4000x1 pixels: the test pipeline resizes it to fit 192x128 "
                               "keeping its aspect ratio, which makes it 192x0 pixels: crop it to at most 384:1 "
                               "(longer side : shorter side)")
    assert all(o == explore.gr.skip() for o in outputs[1:])
    assert page.on_explain("classify", MODEL, "", 3, str(photo), None)[STATUS].startswith(
        "**Error:** strip.png is 4000x1 pixels: the classifier's pre-processing scales its shorter side to 248 px")
