"""tools/visualize_clusters.py: the drawn maps are the maps the model computes.

Small models (fewer blocks and clusters than the zoo rows, same code paths) on 64x64 crops of a
real photo keep this fast; one end-to-end run goes through the command line.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from tools import cluster_figures as figures
from tools import visualize_clusters as vc

REPO = Path(__file__).resolve().parents[2]

IMG = 64


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    """A real photo (scikit-learn's china.jpg) saved as a small file."""
    path = tmp_path_factory.mktemp("images") / "china.png"
    Image.fromarray((vc.load_image("sklearn:china.jpg", 96) * 255).astype("uint8")).save(path)
    return str(path)


def create(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **overrides).eval()


def expected_assignments(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """{(stage, block): (M, h, w)} softmax over the patches of the clustering logits, taken from a
    plain forward (no capture): every clustering module's output, or the ConvMixer teacher's;
    blocks without their own clustering inherit the previous block's."""
    logits, handles = {}, []
    for s in range(model.num_stages):
        for b, block in enumerate(getattr(model, f"stage{s + 1}")):
            if block.attn.computes_assignments:
                hook = lambda mod, args, out, key=(s, b): logits.__setitem__(key, (out, args[1]))  # noqa: E731
                handles.append(block.attn.clustering.register_forward_hook(hook))
    if model.paca_teacher is not None:
        def teacher_hook(mod, args, out):
            H, W = args[0].shape[-2:]
            for s, stage_logits in enumerate(out[0]):
                if stage_logits is not None:
                    logits[(s, 0)] = (stage_logits, (H >> s, W >> s))

        handles.append(model.paca_teacher.register_forward_hook(teacher_hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    expected = {}
    for s in range(model.num_stages):
        for b in range(len(getattr(model, f"stage{s + 1}"))):
            if (s, b) in logits:
                expected[(s, b)] = softmax_over_patches(*logits[(s, b)])
            elif (s, b - 1) in expected:
                expected[(s, b)] = expected[(s, b - 1)]
    return expected


def softmax_over_patches(logits: torch.Tensor, hw) -> torch.Tensor:
    """(1, M, N) or token-major (1, N, M) logits -> (M, h, w), a softmax over the N patches per cluster.
    The tests use M != N, so the patch axis is the one of length N."""
    N = hw[0] * hw[1]
    assert logits.shape[1:].count(N) == 1, "pick a cluster count other than the number of patches"
    patches_last = logits if logits.shape[-1] == N else logits.transpose(1, 2)
    return patches_last[0].softmax(dim=-1).unflatten(-1, tuple(hw))


def explain(model, name, photo, out, **settings):
    subject = vc.classifier_subject(model, name, random_weights=True)
    written = vc.explain(subject, photo, out, vc.Settings(img_size=IMG, **settings))
    x = vc.model_input(subject, vc.load_image(photo, IMG))
    return written, torch.load(out / "maps.pt", weights_only=True), x


def check_assignments(saved: dict, expected: dict):
    captured = {(r["stage"], r["block"]): r["assignments"] for r in saved["maps"] if r["assignments"] is not None}
    assert captured.keys() == expected.keys()
    for key, assignments in captured.items():
        assert assignments.shape[0] == 1
        torch.testing.assert_close(assignments[0], expected[key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(assignments[0].flatten(1).sum(-1), torch.ones(assignments.shape[1]))


def png_size(path) -> tuple:
    with Image.open(path) as image:
        return image.size


def test_tiny_maps_are_the_model_assignments_and_figures_have_their_sizes(photo, tmp_path, caplog):
    model = create("pacavit_tiny_p2cconv_100_0", num_clusters=(8, 8, 8, 0))
    caplog.set_level("INFO", logger="visualize_clusters")
    written, saved, x = explain(model, "tiny", photo, tmp_path)

    check_assignments(saved, expected_assignments(model, x))
    # stage-wise: block 0 computes the stage's assignments, the later blocks reuse them
    stage3 = [r for r in saved["maps"] if r["stage"] == 2]
    assert len(stage3) == 4 and all(torch.equal(r["assignments"], stage3[0]["assignments"]) for r in stage3)
    # attention of every patch over the 8 clusters, per head, rows summing to 1
    attention = saved["maps"][0]["attention"]
    assert attention.shape == (1, 2, 16 * 16, 8)
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, 2, 256))

    expected_files = {"overview.png", "maps.pt", "notes.txt"}
    for s in (1, 2, 3):
        expected_files |= {f"stage{s}_block0_soft.png", f"stage{s}_block0_hard.png", f"stage{s}_query.png"}
    assert {p.name for p in written} == expected_files == {p.name for p in tmp_path.iterdir()}
    # 8 clusters: a 3x3 grid of 128-pixel tiles under a 40-pixel title
    assert png_size(tmp_path / "stage1_block0_soft.png") == figures.soft_grid_size(8) == (384, 424)
    assert png_size(tmp_path / "stage2_block0_hard.png") == figures.hard_map_size() == (800, 328)
    assert png_size(tmp_path / "stage3_query.png") == figures.query_figure_size(4) == (608, 4 * 288 + 40)
    assert png_size(tmp_path / "overview.png") == figures.overview_size(3) == (864, 3 * 144 + 40)

    # the stage without clusters is reported, not drawn
    note = "stage4: no clusters (patch-to-patch attention over 2x2 patches in 2 blocks); nothing drawn"
    assert note in (tmp_path / "notes.txt").read_text().splitlines()
    assert note in caplog.text
    assert "random weights" in (tmp_path / "notes.txt").read_text()


@pytest.mark.parametrize(
    "name, overrides, blocks, files",
    [
        # block-wise: every block clusters anew, so each gets its own maps
        ("pacavit_small_p2cconv_100_blockwise", dict(depths=(1, 2, 1, 1), num_clusters=(3, 3, 3, 3)), "all",
         ["stage2_block0_soft.png", "stage2_block1_soft.png", "stage2_block1_hard.png", "stage4_block0_hard.png"]),
        ("pacavit_small_p2cconv_100_blockwise", dict(depths=(1, 2, 1, 1), num_clusters=(3, 3, 3, 3)), "first",
         ["stage2_block0_soft.png", "stage4_block0_hard.png"]),
        # the ConvMixer teacher provides the assignments of every stage
        ("pacavit_convmixer_tiny_100", dict(depths=(1, 1, 1, 1), teacher_depths=(1, 1, 1, 1),
                                            num_clusters=(3, 3, 3, 3)), "all",
         ["stage1_block0_soft.png", "stage4_block0_hard.png", "stage4_query.png"]),
        ("pacavit_small_p2cmlp_100_0", dict(depths=(1, 1, 1, 1), num_clusters=(3, 3, 3, 0)), "all",
         ["stage3_block0_soft.png", "stage3_query.png"]),
        ("pacavit_small_p2clinear_100_0", dict(depths=(1, 1, 1, 1), num_clusters=(3, 3, 3, 0)), "all",
         ["stage3_block0_soft.png", "stage3_query.png"]),
    ],
)
def test_clustering_variants(photo, tmp_path, name, overrides, blocks, files):
    model = create(name, **overrides)
    written, saved, x = explain(model, name, photo, tmp_path, topk=2, blocks=blocks)
    check_assignments(saved, expected_assignments(model, x))
    names = {p.name for p in written}
    assert set(files) <= names
    if blocks == "first":
        assert not any("_block1_" in n for n in names)
    assert png_size(tmp_path / files[0]) == figures.soft_grid_size(2)  # --topk 2 of 3 clusters
    assert ("no clusters" in (tmp_path / "notes.txt").read_text()) == (overrides["num_clusters"][3] == 0)


def test_a_second_run_into_the_same_folder_replaces_the_first(photo, tmp_path):
    convmixer = create("pacavit_convmixer_tiny_100", depths=(1, 1, 1, 1), teacher_depths=(1, 1, 1, 1),
                       num_clusters=(3, 3, 3, 3))
    explain(convmixer, "convmixer", photo, tmp_path, topk=2)
    assert (tmp_path / "stage4_block0_soft.png").is_file()
    (tmp_path / "mine.txt").write_text("a file of the user's")
    written, _, _ = explain(create("pacavit_tiny_p2cconv_100_0", num_clusters=(3, 3, 3, 0)), "tiny", photo, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in written} | {"mine.txt"}  # no stage-4 figure left


def test_segmentation_head_clusters_are_the_classes(photo, tmp_path):
    config = REPO / "segmentation/configs/paca_vit/paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py"
    torch.manual_seed(0)
    subject = vc.load_segmentor(str(config), checkpoint=None)
    written = vc.explain(subject, photo, tmp_path, vc.Settings(img_size=IMG, topk=3, blocks="first"))
    saved = torch.load(tmp_path / "maps.pt", weights_only=True)

    head = subject.model.decode_head
    logits = []
    handle = head.clustering.register_forward_hook(lambda m, a, out: logits.append(out))
    with torch.no_grad():
        head(subject.model.extract_feat(vc.model_input(subject, vc.load_image(photo, IMG))))
    handle.remove()
    expected = logits[0][0].flatten(1).softmax(-1).unflatten(-1, logits[0].shape[-2:])
    (captured,) = saved["head"]
    assert captured["assignments"].shape == (1, 150, IMG // 4, IMG // 4)  # ADE20K: one cluster per class
    torch.testing.assert_close(captured["assignments"][0], expected, rtol=1e-4, atol=1e-6)

    assert {"head_soft.png", "head_hard.png", "stage1_block0_soft.png"} <= {p.name for p in written}
    assert png_size(tmp_path / "head_soft.png") == figures.soft_grid_size(3)
    notes = (tmp_path / "notes.txt").read_text()
    assert "head: 150 clusters, one per class" in notes
    assert saved["class_names"][:3] == ["wall", "building", "sky"]
    assert "stage1: 200 clusters" in notes  # the backbone's downstream clusters are drawn too


def test_offline_pretrained_fails_clearly(tmp_path, monkeypatch, caplog, photo):
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", "http://127.0.0.1:9/offline")
    monkeypatch.setenv("PACAVIT_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    code = vc.main(["--model", "pacavit_tiny_p2cconv_100_0", "--checkpoint", "pretrained",
                    "--image", photo, "--out", str(tmp_path / "out")])
    assert code == 2
    assert "could not download http://127.0.0.1:9/offline/IMNET_224_pacavit_tiny_p2cconv_100_0.pth" in caplog.text
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused_before_loading(tmp_path, caplog):
    tiny = ["--model", "pacavit_tiny_p2cconv_100_0", "--out", str(tmp_path)]
    assert vc.main(tiny + ["--image", str(tmp_path / "missing.jpg")]) == 2
    assert "image not found" in caplog.text
    assert vc.main(tiny + ["--image", "sklearn:nope.jpg"]) == 2
    assert "choose sklearn:china.jpg or sklearn:flower.jpg" in caplog.text
    assert vc.main(["--model", "pacavit_nope", "--image", "sklearn:china.jpg", "--out", str(tmp_path)]) == 2
    assert "unknown model 'pacavit_nope'" in caplog.text
    with pytest.raises(SystemExit):
        vc.parse_args(tiny + ["--image", "x", "--query-patch", "0", "300"])


@pytest.mark.slow
def test_command_line_over_a_folder_with_a_checkpoint(photo, tmp_path):
    """Folder mode end to end: a local checkpoint, progress per image, and an unreadable file that
    is reported while the other images are still drawn."""
    images = tmp_path / "images"
    images.mkdir()
    Image.open(photo).save(images / "a.png")
    Image.open(photo).rotate(90).save(images / "b.jpg")
    (images / "c.jpg").write_bytes(b"not an image")
    full = create("pacavit_tiny_p2cconv_100_0")
    torch.save({"state_dict": full.state_dict()}, tmp_path / "weights.pth")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "visualize_clusters.py"), "--model", "pacavit_tiny_p2cconv_100_0",
         "--checkpoint", str(tmp_path / "weights.pth"), "--image-dir", str(images), "--out", str(tmp_path / "out"),
         "--img-size", str(IMG), "--topk", "4", "--query-patch", "10", "50", "--blocks", "first"],
        capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    log = result.stderr
    assert "[1/3]" in log and "[2/3]" in log and "img/s" in log
    assert "c.jpg: skipped (cannot read" in log and "1 of 3 images could not be read" in log
    for stem in ("a", "b"):
        out = tmp_path / "out" / stem
        assert png_size(out / "stage1_block0_soft.png") == figures.soft_grid_size(4)
        assert "random weights" not in (out / "notes.txt").read_text()
    saved = torch.load(tmp_path / "out" / "a" / "maps.pt", weights_only=True)
    assert saved["query_pixel"] == (10, 50)
    subject = vc.classifier_subject(full, "tiny", random_weights=False)
    x = vc.model_input(subject, vc.load_image(str(images / "a.png"), IMG))
    check_assignments(saved, expected_assignments(full, x))


def test_each_image_gets_a_folder_of_its_own_whatever_the_names():
    sources = ["a/x.png", "b/x.png", "x_2.png", "sklearn:x.jpg"]
    assert [p.name for p in vc.output_folders(sources, Path("OUT"))] == ["x", "x_3", "x_2", "x_4"]


def test_an_out_that_cannot_be_a_folder_and_a_detection_config_are_one_line(tmp_path, caplog):
    taken = tmp_path / "notes.txt"
    taken.write_text("a file of the user's")
    assert vc.main(["--model", "pacavit_tiny_p2cconv_100_0", "--image", "sklearn:china.jpg", "--out", str(taken)]) == 2
    assert f"error: --out {taken} cannot be a folder here" in caplog.text and taken.read_text() == "a file of the user's"
    detection = REPO / "detection/configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py"
    assert vc.main(["--seg-config", str(detection), "--image", "sklearn:china.jpg", "--out", str(tmp_path / "o")]) == 2
    assert "builds a MaskRCNN, not a segmentor: --seg-config takes a segmentation config" in caplog.text
