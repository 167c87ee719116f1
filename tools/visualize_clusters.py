#!/usr/bin/env python
"""Forward explainer: draw PaCa-ViT's clusters on real images.

One forward pass per image records, in every PaCa block, the soft cluster assignments (softmax
over the patches) and the attention of the patches over the clusters (``models.capture_maps``).
For every stage with clusters it writes

- ``stage<S>_block<B>_soft.png``: each cluster's assignment map over the photo (grid, the clusters
  ordered by the share of the image they hold; ``--topk`` keeps the largest),
- ``stage<S>_block<B>_hard.png``: the cluster with the largest weight on each patch, one colour each,
- ``stage<S>_query.png``: for the query patch, its attention over the clusters (mean over heads) as a
  bar chart and spread back onto the image through the cluster memberships, one row per block,

and per image ``overview.png`` (one row per stage), ``maps.pt`` (the captured tensors, as recorded)
and ``notes.txt`` (what was drawn; stages without clusters are reported there instead of drawn).
Stage-wise models compute the maps once per stage and block-wise models in every block; a block's
soft/hard maps are drawn where its assignments differ from the previous block's.

With ``--seg-config`` the model is an mmseg segmentor with the PaCa head, whose clusters are the
classes (labelled with the dataset's class names); its backbone's clusters are drawn as well.

    python tools/visualize_clusters.py --model pacavit_tiny_p2cconv_100_0 --checkpoint pretrained \\
        --image sklearn:china.jpg --out work_dirs/clusters
"""
import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

import models  # importing it registers the pacavit_* models with timm
from models import CheckpointError, capture_maps
from runtime.images import IMAGE_SUFFIXES, SKLEARN_PREFIX, SKLEARN_SAMPLES, ImageReadError, read_source
from tools import cluster_figures as figures

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent

_logger = logging.getLogger("visualize_clusters")

DEFAULT_QUERY_BARS = 10
RANDOM_WEIGHTS_NOTE = "random weights: the maps show the architecture's spatial prior, not learned semantics"


# -- inputs -------------------------------------------------------------------------------------
def list_images(images: Sequence[str], image_dir: Optional[str]) -> List[str]:
    """The ``--image`` sources then the images of ``--image-dir`` (sorted); fails early on bad paths."""
    sources = list(images or [])
    for source in sources:
        if source.startswith(SKLEARN_PREFIX):
            if source[len(SKLEARN_PREFIX):] not in SKLEARN_SAMPLES:
                choices = " or ".join(SKLEARN_PREFIX + name for name in SKLEARN_SAMPLES)
                raise FileNotFoundError(f"no scikit-learn sample {source}; choose {choices}")
        elif not Path(source).is_file():
            raise FileNotFoundError(f"image not found: {source}")
    if image_dir:
        folder = Path(image_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--image-dir is not a folder: {image_dir}")
        found = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        sources += found
    if not sources:
        raise ValueError("give at least one --image or an --image-dir")
    return sources


def load_image(source: str, size: int) -> np.ndarray:
    """RGB float image in [0, 1], shorter side resized to ``size`` and centre-cropped to a square.

    ``sklearn:NAME`` reads one of scikit-learn's bundled sample photos (china.jpg, flower.jpg).
    """
    image = ImageOps.fit(Image.fromarray(read_source(source)), (size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def image_stem(source: str) -> str:
    return Path(source.split(":", 1)[-1] if source.startswith(SKLEARN_PREFIX) else source).stem


# -- models -------------------------------------------------------------------------------------
@dataclass
class Subject:
    """What to explain: how to run it and where its clusters come from."""

    title: str
    model: nn.Module  # everything that runs (moved to the device, put in eval mode)
    forward: Callable[[torch.Tensor], object]
    mean: torch.Tensor  # (3, 1, 1), for RGB in [0, 1]
    std: torch.Tensor
    random_weights: bool
    class_names: Optional[List[str]] = None


def load_classifier(name: str, checkpoint: Optional[str]) -> Subject:
    """A ``pacavit_*`` timm model; ``checkpoint``: a file, a URL or ``pretrained`` (the released weights)."""
    if name not in models.VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(models.VARIANTS))}")
    model, _ = models.create_classifier(name, checkpoint)
    return classifier_subject(model, name, random_weights=not checkpoint)


def classifier_subject(model: nn.Module, title: str, random_weights: bool) -> Subject:
    """Explain a PaCa-ViT classifier (timm model), normalising inputs with its pretrained_cfg."""
    cfg = model.pretrained_cfg
    return Subject(
        title=title,
        model=model,
        forward=model,
        mean=torch.tensor(cfg["mean"]).view(3, 1, 1),
        std=torch.tensor(cfg["std"]).view(3, 1, 1),
        random_weights=random_weights,
    )


def load_segmentor(config: str, checkpoint: Optional[str]) -> Subject:
    """An mmseg segmentor whose decode head is the PaCa head; its clusters are the dataset's classes.

    ``checkpoint`` (file, URL or ``pretrained``: the config's released file) must fit the config's model exactly.
    """
    from mmseg.registry import DATASETS, MODELS

    from runtime.openmmlab import load_config, load_model_checkpoint, weights_source

    cfg = load_config(config, default_scope="mmseg")
    segmentor = MODELS.build(cfg.model)  # init_weights() is not called: it would fetch ImageNet weights
    if not hasattr(segmentor, "decode_head"):
        raise ValueError(f"{config} builds a {type(segmentor).__name__}, not a segmentor: --seg-config takes a "
                         f"segmentation config with the PaCa head")
    if checkpoint:
        load_model_checkpoint(segmentor, weights_source(checkpoint, config))
    meta = getattr(segmentor, "dataset_meta", None) or DATASETS.get(cfg.test_dataloader.dataset.type).METAINFO
    return segmentor_subject(segmentor, Path(config).stem, list(meta["classes"]), random_weights=not checkpoint)


def segmentor_subject(segmentor: nn.Module, title: str, class_names: List[str], random_weights: bool) -> Subject:
    """Explain an mmseg encoder-decoder with the PaCa head, normalising inputs as its data preprocessor."""
    head = segmentor.decode_head
    if getattr(type(head), "cluster_logits_layer", None) is None:  # what capture_maps records
        raise ValueError(f"the decode head {type(head).__name__} has no clusters to draw; use the PaCa head")
    if len(class_names) != head.num_classes:
        raise ValueError(f"{len(class_names)} class names for a head with {head.num_classes} classes")
    preprocessor = segmentor.data_preprocessor
    if not preprocessor.channel_conversion:
        raise ValueError("the data preprocessor must convert BGR to RGB (bgr_to_rgb=True)")
    return Subject(
        title=title,
        model=segmentor,
        forward=lambda x: head(segmentor.extract_feat(x)),
        mean=preprocessor.mean.view(3, 1, 1) / 255.0,
        std=preprocessor.std.view(3, 1, 1) / 255.0,
        random_weights=random_weights,
        class_names=class_names,
    )


# -- capturing ----------------------------------------------------------------------------------
@dataclass
class ClusterView:
    """The clusters one block (or the segmentation head) used on one image."""

    group: str  # file-name prefix of its stage: "stage2" or "head"
    label: str
    block: int
    hw: Tuple[int, int]
    assignments: Optional[torch.Tensor]  # (M, h, w), softmax over the h*w patches; None without clusters
    attention: Optional[torch.Tensor]  # (N, M) mean over heads; None for the head
    names: Optional[List[str]] = None
    new: bool = True  # differs from the previous block's assignments (else inherited)


def run_captured(subject: Subject, x: torch.Tensor) -> Tuple[List[dict], List[dict]]:
    """One forward pass; returns the ``capture_maps`` records of the PaCa blocks and of the PaCa head."""
    subject.model.eval()
    with torch.no_grad(), capture_maps(subject.model) as records:
        subject.forward(x)
    return [r for r in records if "head" not in r], [r for r in records if "head" in r]


def cluster_views(maps: List[dict], head_maps: List[dict], class_names=None) -> List[ClusterView]:
    views = []
    for record in maps:
        assignments = None if record["assignments"] is None else record["assignments"][0]
        previous = views[-1] if views and views[-1].group == f"stage{record['stage'] + 1}" else None
        views.append(ClusterView(
            group=f"stage{record['stage'] + 1}",
            label=f"stage {record['stage'] + 1}, block {record['block']}",
            block=record["block"],
            hw=tuple(record["hw"]),
            assignments=assignments,
            attention=record["attention"][0].mean(dim=0),
            new=previous is None or assignments is None or not torch.equal(assignments, previous.assignments),
        ))
    for record in head_maps:
        views.append(ClusterView(
            group="head", label="head (classes)", block=0, hw=tuple(record["hw"]),
            assignments=record["assignments"][0], attention=None, names=class_names,
        ))
    return views


def query_cell(pixel: Tuple[int, int], img_size: int, hw: Tuple[int, int]) -> Tuple[int, int]:
    """The patch of an ``hw`` grid that contains ``pixel`` (row, col) of the input."""
    return min(pixel[0] * hw[0] // img_size, hw[0] - 1), min(pixel[1] * hw[1] // img_size, hw[1] - 1)


# -- drawing ------------------------------------------------------------------------------------
@dataclass
class Settings:
    img_size: int = 224
    topk: Optional[int] = None
    query_pixel: Optional[Tuple[int, int]] = None  # (row, col) of the resized input; None: centre
    blocks: str = "all"  # "first": only each stage's first block

    def query(self) -> Tuple[int, int]:
        return self.query_pixel or (self.img_size // 2, self.img_size // 2)


def describe_stage(views: List[ClusterView]) -> str:
    first = views[0]
    h, w = first.hw
    blocks = f"{len(views)} block{'s' if len(views) > 1 else ''}"
    if first.assignments is None:
        return f"{first.group}: no clusters (patch-to-patch attention over {h}x{w} patches in {blocks}); nothing drawn"
    M = first.assignments.shape[0]
    usage = figures.cluster_usage(first.assignments)
    winners = len(torch.unique(figures.hard_assignment(first.assignments)))
    largest = ", ".join(
        f"{first.names[m] if first.names else f'#{m}'} {100 * usage[m]:.1f}%"
        for m in usage.argsort(descending=True)[:5].tolist()
    )
    if first.group == "head":
        where = f"{M} clusters, one per class, over {h}x{w} positions"
    else:
        where = (f"{M} clusters over {h}x{w} patches, new assignments at blocks "
                 f"{[v.block for v in views if v.new]} of {blocks}")
    return f"{first.group}: {where}; {winners} clusters win a patch; largest: {largest}"


def draw_image(
    subject: Subject, views: List[ClusterView], image: np.ndarray, out: Path, settings: Settings
) -> Tuple[List[Path], List[str]]:
    """Write the figures for one image; returns the files written and the notes."""
    written, notes = [], []
    suffix = " · random weights" if subject.random_weights else ""
    groups: Dict[str, List[ClusterView]] = {}
    for view in views:
        groups.setdefault(view.group, []).append(view)
    overview = []
    for group, members in groups.items():
        notes.append(describe_stage(members))
        if members[0].assignments is None:
            continue
        if settings.blocks == "first":
            members = members[:1]
        for view in members:
            if not view.new:
                continue
            M = view.assignments.shape[0]
            order = figures.cluster_usage(view.assignments).argsort(descending=True)
            order = order[: settings.topk or M].tolist()
            stem = out / (group if group == "head" else f"{group}_block{view.block}")
            figures.draw_soft_grid(
                f"{stem}_soft.png", image, view.assignments, order, names=view.names,
                title=f"{subject.title} · {view.label} · {len(order)} of {M} clusters, largest first "
                      f"(% = share of the image){suffix}",
            )
            figures.draw_hard_map(
                f"{stem}_hard.png", image, view.assignments, names=view.names,
                title=f"{subject.title} · {view.label} · cluster with the largest weight per patch{suffix}",
            )
            written += [Path(f"{stem}_soft.png"), Path(f"{stem}_hard.png")]
        first = members[0]
        cell = query_cell(settings.query(), settings.img_size, first.hw)
        index = cell[0] * first.hw[1] + cell[1]
        attended = [v for v in members if v.attention is not None]
        if attended:
            path = out / f"{group}_query.png"
            figures.draw_query(
                path, image, [(v.label, v.assignments, v.attention[index]) for v in attended], cell, first.hw,
                topk=min(settings.topk or DEFAULT_QUERY_BARS, first.assignments.shape[0]), names=first.names,
                title=f"{subject.title} · {group}: attention of patch {cell} (outlined) over the clusters{suffix}",
            )
            written.append(path)
        overview.append(dict(
            label=group, assignments=first.assignments, hw=first.hw, query_cell=cell, names=first.names,
            attention=None if first.attention is None else first.attention[index],
        ))
    if overview:
        path = out / "overview.png"
        figures.draw_overview(path, image, overview, title=f"{subject.title}{suffix}")
        written.append(path)
    return written, notes


def model_input(subject: Subject, image: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) normalised input for ``subject`` from an RGB image in [0, 1]."""
    x = torch.from_numpy(image).permute(2, 0, 1)
    return ((x - subject.mean.cpu()) / subject.std.cpu())[None]


def explain(subject: Subject, source: str, out: Path, settings: Settings, device: str = "cpu") -> List[Path]:
    """Run one image through ``subject`` and write its figures, ``maps.pt`` and ``notes.txt`` into ``out``."""
    image = load_image(source, settings.img_size)
    maps, head_maps = (_records_to_cpu(r) for r in run_captured(subject, model_input(subject, image).to(device)))
    views = cluster_views(maps, head_maps, subject.class_names)
    out.mkdir(parents=True, exist_ok=True)
    remove_earlier_run(out)
    # the figures show the same crop at no less than their own resolution
    display = image if settings.img_size >= figures.PANEL else load_image(source, figures.PANEL)
    written, notes = draw_image(subject, views, display, out, settings)
    torch.save(
        dict(source=source, model=subject.title, img_size=settings.img_size, query_pixel=settings.query(),
             image=torch.from_numpy((image * 255).round().astype(np.uint8)), maps=maps, head=head_maps,
             class_names=subject.class_names),
        out / "maps.pt",
    )
    header = [f"model: {subject.title}", f"image: {source} ({settings.img_size}x{settings.img_size})"]
    if subject.random_weights:
        header.append(RANDOM_WEIGHTS_NOTE)
    (out / "notes.txt").write_text("\n".join(header + notes) + "\n")
    for note in notes:
        _logger.info("  %s", note)
    return written + [out / "maps.pt", out / "notes.txt"]


# what explain() writes into an image's folder; maps.pt marks a folder as one of its own
OWN_FILES = ("*_soft.png", "*_hard.png", "*_query.png", "overview.png", "notes.txt", "maps.pt")


def remove_earlier_run(out: Path) -> None:
    """Delete the files an earlier run wrote into ``out``, so that none of its figures (e.g. of a
    stage this model does not draw) stays beside the new ones."""
    if not (out / "maps.pt").is_file():
        return
    stale = sorted({path for pattern in OWN_FILES for path in out.glob(pattern)})
    for path in stale:
        path.unlink()
    _logger.info("  replaced the %d files of an earlier run in %s", len(stale), out)


def _records_to_cpu(records: List[dict]) -> List[dict]:
    """Captured records with their tensors on the CPU (a ``maps.pt`` loads anywhere)."""
    return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in r.items()} for r in records]


def output_folders(sources: Sequence[str], out: Path) -> List[Path]:
    """One folder per image, named after it; a name already taken (two images named ``x``, or an
    ``x_2`` among them) gets the next free number."""
    stems = [image_stem(source) for source in sources]
    taken, folders = set(), []
    for stem in stems:
        name, number = stem, 1
        while name in taken or (name != stem and name in stems):
            number += 1
            name = f"{stem}_{number}"
        taken.add(name)
        folders.append(out / name)
    return folders


# -- command line -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a pacavit_* model name")
    what.add_argument("--seg-config", help="an mmseg config whose decode head is the PaCa head")
    parser.add_argument("--checkpoint", help="weights: a file, a URL, or 'pretrained' (the released ImageNet weights "
                                             "of --model, the released file of --seg-config); without it the "
                                             "weights are random")
    parser.add_argument("--image", action="append", default=[],
                        help="an image file, or sklearn:china.jpg / sklearn:flower.jpg (repeatable)")
    parser.add_argument("--image-dir", help="draw every image of this folder")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per image)")
    parser.add_argument("--img-size", type=int, default=224, help="images are resized and centre-cropped to this")
    parser.add_argument("--topk", type=int, help="draw only the K clusters holding the largest share of the image")
    parser.add_argument("--query-patch", type=int, nargs=2, metavar=("ROW", "COL"),
                        help="query position in pixels of the resized input (default: the centre); "
                             "each stage uses the patch that contains it")
    parser.add_argument("--blocks", choices=("all", "first"), default="all",
                        help="all: every block's maps (per block when block-wise); first: each stage's first block")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (without --checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when available, else cpu")
    args = parser.parse_args(argv)
    if args.img_size < 32:
        parser.error("--img-size must be at least 32 (the last stage is 1/32 of the input)")
    if args.topk is not None and args.topk < 1:
        parser.error("--topk must be positive")
    if args.query_patch and not all(0 <= p < args.img_size for p in args.query_patch):
        parser.error(f"--query-patch must lie inside the {args.img_size}x{args.img_size} input")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        sources = list_images(args.image, args.image_dir)
        if args.model:
            subject = load_classifier(args.model, args.checkpoint)
        else:
            subject = load_segmentor(args.seg_config, args.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        _logger.error("error: %s", e)
        return 2
    try:  # made once the model has loaded: a run that fails before leaves no folder
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _logger.error("error: --out %s cannot be a folder here: %s", args.out, e)
        return 2
    if subject.random_weights:
        _logger.warning("no --checkpoint: %s", RANDOM_WEIGHTS_NOTE)
    subject.model.to(args.device).eval()
    settings = Settings(args.img_size, args.topk, tuple(args.query_patch) if args.query_patch else None, args.blocks)
    failed, start = [], time.time()
    for i, (source, folder) in enumerate(zip(sources, output_folders(sources, Path(args.out))), start=1):
        try:
            written = explain(subject, source, folder, settings, args.device)
        except ImageReadError as e:
            _logger.error("[%d/%d] %s: skipped (cannot read it as an image: %s)", i, len(sources), source, e)
            failed.append(source)
            continue
        rate = i / (time.time() - start)
        _logger.info("[%d/%d] %s: %d files in %s (%.2f img/s, ETA %.0f s)", i, len(sources), source, len(written),
                     folder, rate, (len(sources) - i) / rate)
    if failed:
        _logger.error("%d of %d images could not be read: %s", len(failed), len(sources), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
