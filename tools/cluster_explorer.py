"""What the explorer page (``tools/explore.py``) computes, without the page.

One forward pass per image and model: the predictor of ``tools/predict.py`` (its loading, its
pre-processing and its drawing) runs inside ``models.capture_maps``, so the prediction and every
PaCa block's clusters come from the same pass.  The result is kept (``Explorer.cache``), so
choosing another stage or clicking a patch only draws: the model does not run again.
"""
import argparse
import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from models import CheckpointError, capture_maps
from runtime.cli import UsageError
from runtime.images import SKLEARN_PREFIX, SKLEARN_SAMPLES, ImageReadError, read_image
from tools import cluster_figures as figures
from tools import predict
from tools import predict_tasks as tasks
from tools.visualize_clusters import ClusterView, cluster_views, image_stem

REPO = Path(__file__).resolve().parents[1]
TASKS = ("classify", "detect", "segment")
SAMPLES = tuple(SKLEARN_PREFIX + name for name in SKLEARN_SAMPLES)
MAX_PIXELS = 40_000_000  # larger photos take minutes on a CPU and gigabytes of attention maps
DISPLAY_SIDE = 448  # longer side of the pictures the page shows
SOFT_SHOWN = 8  # largest soft clusters shown per view
ATTENDED_SHOWN = 10  # most attended clusters listed for a clicked patch
HIGHLIGHTED = 3  # most attended clusters whose regions are highlighted
CACHED_IMAGES = 16
CACHED_MODELS = 2


class ExploreError(ValueError):
    """Bad input from the page: the message says what was wrong and what to do instead."""


def model_choices(task: str) -> List[str]:
    """What the model field offers: the zoo names, or this repository's detection / segmentation configs."""
    if task == "classify":
        import models

        return list(models.VARIANTS)
    folder = REPO / ("detection" if task == "detect" else "segmentation") / "configs"
    return sorted(str(p.relative_to(REPO)) for p in folder.rglob("*.py") if "_base_" not in p.parts)


def config_path(config: str) -> Path:
    """A config as given (absolute, or relative to the working folder), else relative to the repository."""
    path = Path(config)
    if path.is_file():
        return path.resolve()
    if not path.is_absolute() and (REPO / path).is_file():
        return REPO / path
    raise ExploreError(f"config file not found: {config} (give a path relative to the repository, or absolute)")


def config_task(config: str) -> str:
    """'detect' or 'segment': what the config's model does (mmseg models have a ``decode_head``)."""
    from mmengine.config import Config

    model = Config.fromfile(str(config_path(config)), import_custom_modules=False).get("model") or {}
    return "segment" if "decode_head" in model else "detect"


@dataclass(frozen=True)
class ModelKey:
    task: str
    model: str  # a timm model name, or a config path for detect / segment
    weights: str  # '' (random), 'pretrained', a file or a URL
    seed: int
    device: str

    def describe(self) -> str:
        if not self.weights:
            return f"{self.model}, random weights (seed {self.seed})"
        return f"{self.model}, weights {self.weights}"


def build_predictor(key: ModelKey):
    """The predictor of ``tools/predict.py`` for ``key``: its model-and-weights builder, called on the
    last line, is the only one the explorer uses."""
    checkpoint = key.weights or None
    if key.task == "classify" and key.model.endswith(".py"):
        wanted = config_task(key.model)
        raise ExploreError(f"{key.model} is a config, not a model name: choose the task '{wanted}' for it")
    if key.task != "classify":
        wanted = config_task(key.model)
        if wanted != key.task:
            kind = "a segmentation" if wanted == "segment" else "a detection"
            raise ExploreError(f"{key.model} is {kind} config: choose the task '{wanted}' for it")
    torch.manual_seed(key.seed)
    config = None if key.task == "classify" else str(config_path(key.model))
    args = argparse.Namespace(task=key.task, model=key.model, config=config, checkpoint=checkpoint, device=key.device,
                              clusters=False, bf16=False, score_thr=0.3, cfg_options={}, img_size=None)
    return predict.build_predictor(args)


@dataclass
class Stage:
    """One block's (or the segmentation head's) clusters over the displayed picture."""

    view: ClusterView
    rows: int  # the patches of the grid that cover the image (det / seg inputs are padded)
    cols: int

    @property
    def assignments(self) -> torch.Tensor:
        return self.view.assignments[:, : self.rows, : self.cols]

    def attention_of(self, row: int, col: int) -> torch.Tensor:
        """(M,) attention of the patch (row, col) over the clusters, mean over heads."""
        return self.view.attention[row * self.view.hw[1] + col]


@dataclass
class Explanation:
    """Everything the page shows for one image and model, computed by one forward pass."""

    key: str
    title: str
    picture: np.ndarray  # (H, W, 3) float in [0, 1]: the part of the image the patch grids cover
    prediction: Image.Image
    entry: dict
    stages: Dict[str, Stage]
    notes: List[str]
    seconds: float
    class_names: Optional[List[str]] = None


def read_upload(source: str) -> Tuple[str, np.ndarray]:
    """(name, (H, W, 3) uint8) of an uploaded file or a bundled photo, or a clear ExploreError."""
    if source in SAMPLES:
        source = predict.sklearn_sample(source[len(SKLEARN_PREFIX):])
    name = Path(source).name
    too_large = f"the explorer takes up to {MAX_PIXELS / 1e6:.0f} MP: downscale it first"
    try:
        with Image.open(source) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:  # Pillow refuses to open one this large at all
        raise ExploreError(f"{name} is too large ({e}); {too_large}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ExploreError(f"{name} is not an image PIL can read ({type(e).__name__}): upload a JPEG, PNG, BMP, "
                           "WebP or TIFF file") from e
    if width * height > MAX_PIXELS:
        raise ExploreError(f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} MP); {too_large}")
    try:
        return name, read_image(source)
    except ImageReadError as e:
        raise ExploreError(f"{name} cannot be decoded as an image ({e})") from e


def display_size(height: int, width: int) -> Tuple[int, int]:
    scale = DISPLAY_SIDE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def as_picture(rgb: np.ndarray) -> np.ndarray:
    """uint8 image -> float picture in [0, 1] with DISPLAY_SIDE as its longer side."""
    height, width = display_size(*rgb.shape[:2])
    resized = Image.fromarray(rgb).resize((width, height), Image.BICUBIC)
    return np.asarray(resized, dtype=np.float32) / 255.0


class InputRecorder:
    """Forward hook on an OpenMMLab model's data preprocessor: the padded batch shape and the
    resized image's shape, which say which patches of a grid cover the image."""

    def __init__(self, preprocessor: torch.nn.Module):
        self.padded: Optional[Tuple[int, int]] = None
        self.resized: Optional[Tuple[int, int]] = None
        self.handle = preprocessor.register_forward_hook(self.record)

    def record(self, module, args, output):
        self.padded = tuple(output["inputs"].shape[-2:])
        self.resized = tuple(output["data_samples"][0].metainfo["img_shape"][:2])

    def covered(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        if self.padded is None:
            return hw
        return tuple(math.ceil(cells * size / padded) for cells, size, padded in zip(hw, self.resized, self.padded))


def stage_label(view: ClusterView) -> str:
    if view.group == "head":
        return "segmentation head (one cluster per class)"
    return view.label + ("" if view.new else " (same assignments as the block before)")


class Explorer:
    """The page's state: loaded models and explained images (both kept in small LRU caches)."""

    def __init__(self, device: str):
        self.device = device
        self.models: "OrderedDict[ModelKey, object]" = OrderedDict()
        self.cache: "OrderedDict[str, Explanation]" = OrderedDict()
        self.forward_passes = 0
        # one explanation at a time: capture_maps hooks the shared model, so two passes at once
        # (two tabs, an upload while Explain runs) would record into each other's lists
        self.lock = threading.Lock()

    def predictor(self, key: ModelKey):
        if key not in self.models:
            try:
                self.models[key] = build_predictor(key)
            except ExploreError:
                raise
            except (CheckpointError, FileNotFoundError, UsageError, KeyError, ValueError) as e:
                raise ExploreError(f"{key.describe()}: {e}") from e
            while len(self.models) > CACHED_MODELS:
                self.models.popitem(last=False)
        self.models.move_to_end(key)
        return self.models[key]

    def explain(self, key: ModelKey, source: str) -> Explanation:
        """The prediction and clusters of the image ``source`` (a file or ``sklearn:NAME``), from the
        cache when this image and model were explained before; one request at a time."""
        with self.lock:
            return self._explain(key, source)

    def _explain(self, key: ModelKey, source: str) -> Explanation:
        name, rgb = read_upload(source)
        digest = hashlib.sha1(repr(key).encode() + rgb.tobytes() + str(rgb.shape).encode()).hexdigest()[:16]
        if digest in self.cache:
            self.cache.move_to_end(digest)
            return self.cache[digest]
        predictor = self.predictor(key)
        problem = predictor.unfit(*rgb.shape[:2])
        if problem:
            raise ExploreError(f"{name} is {rgb.shape[1]}x{rgb.shape[0]} pixels: {problem}")
        start = time.perf_counter()
        picture = tasks.Picture(source, image_stem(name), rgb)
        recorder = InputRecorder(predictor.model.data_preprocessor) if key.task != "classify" else None
        try:
            with capture_maps(predictor.model) as records:  # the predictor runs without gradients
                result = predictor.predict([picture])[0]
        except ValueError as e:  # a model without PaCa blocks, an image the pipeline refuses
            raise ExploreError(f"{key.describe()}: {e}") from e
        finally:
            if recorder:
                recorder.handle.remove()
        self.forward_passes += 1
        records = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in r.items()} for r in records]
        views = cluster_views([r for r in records if "head" not in r], [r for r in records if "head" in r],
                              predictor.class_names)
        if key.task == "classify":  # the patches cover the model's centre crop
            x = predictor.transform(Image.fromarray(rgb))
            shown = predictor.crop(x)
        else:
            shown = rgb
        stages, notes = {}, []
        for view in views:
            if view.assignments is None:
                if view.block == 0:
                    notes.append(f"{view.group}: no clusters (patch-to-patch attention over {view.hw[0]}x{view.hw[1]} "
                                 "patches)")
                continue
            rows, cols = recorder.covered(view.hw) if recorder else view.hw
            stages[stage_label(view)] = Stage(view, rows, cols)
        explanation = Explanation(
            key=digest, title=f"{name} · {key.describe()}", picture=as_picture(shown),
            prediction=result.pictures[""], entry=result.entry, stages=stages, notes=notes,
            seconds=time.perf_counter() - start, class_names=predictor.class_names,
        )
        self.cache[digest] = explanation
        while len(self.cache) > CACHED_IMAGES:
            self.cache.popitem(last=False)
        return explanation

    def explanation(self, key: str) -> Explanation:
        if key not in self.cache:
            raise ExploreError("this image's maps are no longer cached (the page keeps the last "
                               f"{CACHED_IMAGES} images): press Explain again")
        return self.cache[key]


# -- pictures -------------------------------------------------------------------------------------
def to_uint8(picture: np.ndarray) -> np.ndarray:
    return (np.clip(picture, 0, 1) * 255).round().astype(np.uint8)


def cell_of(stage: Stage, picture: np.ndarray, x: float, y: float) -> Tuple[int, int]:
    """The (row, col) patch under pixel (x, y) of the displayed picture."""
    height, width = picture.shape[:2]
    return (min(int(y * stage.rows / height), stage.rows - 1), min(int(x * stage.cols / width), stage.cols - 1))


def outline(picture: np.ndarray, stage: Stage, cell: Tuple[int, int]) -> np.ndarray:
    """A white-and-black frame around the patch ``cell``."""
    out = picture.copy()
    height, width = picture.shape[:2]
    top, bottom = cell[0] * height // stage.rows, (cell[0] + 1) * height // stage.rows
    left, right = cell[1] * width // stage.cols, (cell[1] + 1) * width // stage.cols
    for thickness, colour in ((3, 1.0), (1, 0.0)):
        out[top:top + thickness, left:right] = colour
        out[max(bottom - thickness, top):bottom, left:right] = colour
        out[top:bottom, left:left + thickness] = colour
        out[top:bottom, max(right - thickness, left):right] = colour
    return out


def cluster_name(m: int, names: Optional[Sequence[str]]) -> str:
    return f"#{m} {names[m]}" if names else f"#{m}"


def hard_map(explanation: Explanation, label: str, cell: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Each patch in the colour of its argmax cluster (the forward explainer's hard map)."""
    stage = explanation.stages[label]
    picture = figures.hard_picture(explanation.picture, stage.assignments, figures.palette(stage.assignments.shape[0]))
    return to_uint8(outline(picture, stage, cell) if cell else picture)


def soft_clusters(explanation: Explanation, label: str) -> List[Tuple[np.ndarray, str]]:
    """The SOFT_SHOWN clusters with the largest share of the image: (soft map over the picture, caption
    with that share)."""
    stage = explanation.stages[label]
    assignments = stage.assignments
    colours, usage = figures.palette(assignments.shape[0]), figures.cluster_usage(assignments)
    height, width = explanation.picture.shape[:2]
    thumb = figures.upsample(torch.from_numpy(explanation.picture).permute(2, 0, 1),
                             (max(1, height // 2), max(1, width // 2)))  # a 1-pixel-high panorama too
    thumb = thumb.permute(1, 2, 0).clamp(0, 1).numpy()
    order = usage.argsort(descending=True)[:SOFT_SHOWN].tolist()
    return [(to_uint8(figures.soft_tile(thumb, assignments[m], colours[m])),
             f"{cluster_name(m, explanation.class_names if stage.view.group == 'head' else None)}: "
             f"{100 * usage[m]:.1f}%") for m in order]


def attended_regions(picture: np.ndarray, assignments: torch.Tensor, clusters: Sequence[int]) -> np.ndarray:
    """The photo, dimmed, with each of ``clusters`` tinted in its colour where its soft map is strong
    (each map scaled to its own maximum; a pixel takes the strongest of them)."""
    colours = figures.palette(assignments.shape[0])
    maps = figures.upsample(assignments[list(clusters)], picture.shape[:2])
    maps = maps / maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    strength, strongest = maps.max(dim=0)
    alpha = (0.85 * strength.clamp(0, 1)).numpy()[..., None]
    tint = colours[np.asarray(clusters)[strongest.numpy()]]
    return (1 - alpha) * picture * 0.45 + alpha * tint


def patch_attention(explanation: Explanation, label: str, cell: Tuple[int, int]):
    """For the clicked patch: (its attention spread over the image | the regions of its most attended
    clusters) as one picture, the most attended clusters {name: attention}, and a one-line summary."""
    stage = explanation.stages[label]
    if stage.view.attention is None:
        raise ExploreError("the segmentation head has no patch attention: pick a backbone stage to click into")
    attention = stage.attention_of(*cell)
    assignments = stage.assignments
    M = assignments.shape[0]
    heat, (low, high) = figures.query_picture(explanation.picture, assignments, attention)
    top = attention.argsort(descending=True)[:ATTENDED_SHOWN].tolist()
    regions = attended_regions(explanation.picture, assignments, top[:HIGHLIGHTED])
    gap = np.ones((explanation.picture.shape[0], 8, 3), dtype=np.float32)
    picture = np.concatenate([outline(heat, stage, cell), gap, outline(regions, stage, cell)], axis=1)
    bars = {f"{cluster_name(m, None)} ({attention[m] * M:.2f}x uniform)": float(attention[m]) for m in top}
    summary = (f"{label}, patch (row {cell[0]}, col {cell[1]}) of {stage.rows}x{stage.cols}: attention over {M} "
               f"clusters from {low:.2f}x to {high:.2f}x uniform; highlighted: "
               + ", ".join(cluster_name(m, None) for m in top[:HIGHLIGHTED]))
    return to_uint8(picture), bars, summary


def centre_cell(stage: Stage) -> Tuple[int, int]:
    return stage.rows // 2, stage.cols // 2


def first_shown(explanation: Explanation) -> str:
    """The stage the page opens with: the first block of the backbone's last stage with clusters
    (the coarsest grid, the easiest to click)."""
    backbone = [label for label, stage in explanation.stages.items() if stage.view.group != "head"]
    if not backbone:
        return next(iter(explanation.stages))
    last = explanation.stages[backbone[-1]].view.group
    return next(label for label in backbone if explanation.stages[label].view.group == last)
