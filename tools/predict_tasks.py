"""The three predictors of ``tools/predict.py``: a timm classifier, mmdet's and mmseg's inferencers.

Each one loads its weights through the project's checkpoint loader, runs a batch of RGB images
and returns, per image, its ``predictions.json`` entry and the pictures to write.  The
pipelines are the libraries' own: timm's data config and eval transform for classification,
``DetInferencer`` / ``MMSegInferencer`` (the config's test pipeline) for detection and
segmentation.  With ``clusters`` the backbone's PaCa blocks are captured during the forward pass
(``models.capture_maps``) and the last stage with clusters is drawn beside the prediction.
"""
import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torchvision import transforms

from models import ClassifierWeights, capture_maps, create_classifier, fuse_for_cpu
from tools import predict_drawing as drawing

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent

_logger = logging.getLogger("predict")

TOP_K = 5


@dataclass
class Picture:
    """One input image as read: ``rgb`` is (H, W, 3) uint8."""

    source: str
    stem: str
    rgb: np.ndarray


@dataclass
class Result:
    """What one image gives: its ``predictions.json`` fields and the PNGs, by file-name suffix."""

    entry: dict
    pictures: Dict[str, Image.Image] = field(default_factory=dict)


def for_device(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` on ``device`` in eval mode; on a CPU its PaCa layers use the fused oneDNN kernels
    where this CPU has them (``models.fuse_for_cpu``; same outputs, faster)."""
    model.to(device).eval()
    return fuse_for_cpu(model) if torch.device(device).type == "cpu" else model


@contextlib.contextmanager
def captured(module: torch.nn.Module, enabled: bool) -> Iterator[Optional[List[dict]]]:
    """``capture_maps(module)`` when ``enabled``, else nothing recorded (None)."""
    if not enabled:
        yield None
        return
    with capture_maps(module) as maps:
        yield maps


def last_clusters(maps: Optional[List[dict]]) -> Optional[Tuple[int, torch.Tensor]]:
    """(stage, (B, M, h, w) assignments) of the last block that has clusters; None if none ran."""
    for record in reversed(maps or []):
        if record["assignments"] is not None:
            return record["stage"], record["assignments"]
    return None


def cluster_caption(stage: int, assignments: torch.Tensor, where: str = "") -> List[str]:
    return [f"PaCa clusters, stage {stage + 1}", f"argmax of {assignments.shape[1]}{where}"]


def weights_note(random_weights: bool) -> str:
    return " (random weights)" if random_weights else ""


# -- classification -----------------------------------------------------------------------------
def classifier_class_names(weights: ClassifierWeights, num_classes: int) -> Optional[List[str]]:
    """Class names stored by train_timm.sh, else ImageNet-1k's for 1000 classes, else None (indices)."""
    if weights.class_names is not None:
        return weights.class_names
    if num_classes == ImageNetInfo().num_classes():
        return ImageNetInfo().label_descriptions()
    _logger.warning("%s stores no class names (written before train_timm.sh saved them); "
                    "predictions are labelled with class indices", weights.source)
    return None


class Classifier:
    """A timm classifier: ``--model NAME [--checkpoint PATH|URL|pretrained]``."""

    task = "classify"

    def __init__(self, model_name: str, checkpoint: Optional[str], device: str, clusters: bool = False,
                 bf16: bool = False, img_size: Optional[int] = None):
        model, weights = create_classifier(model_name, checkpoint)
        self.model_name, self.checkpoint = model_name, weights.source
        self.random_weights = checkpoint is None
        self.class_names = classifier_class_names(weights, model.num_classes)
        self.model = for_device(model, device)
        self.device = device
        self.clusters = clusters
        self.bf16 = bf16  # bfloat16 autocast
        self.title = model_name + weights_note(self.random_weights)
        # the evaluation input of the training run (train_timm.py stores it), unless asked otherwise
        trained = dict(weights.data_config or {})
        if img_size:
            trained["input_size"] = (3, img_size, img_size)
        self.data_config = resolve_data_config(trained, model=self.model)
        self.transform = create_transform(**self.data_config, is_training=False)

    def header(self) -> dict:
        return dict(model=self.model_name, checkpoint=self.checkpoint, input_size=list(self.data_config["input_size"]))

    def unfit(self, height: int, width: int) -> Optional[str]:
        """Why the eval transform cannot take an image of this size (None: it can).  It scales the
        shorter side to a fixed length before the centre crop: a very long, thin image would become
        gigabytes of pixels (1x20000 px: 248x4960000) and minutes of resizing."""
        resize = next((t for t in self.transform.transforms if isinstance(t, transforms.Resize)), None)
        size = resize.size if resize is not None else None
        if isinstance(size, (list, tuple)) and len(size) == 1:
            size = size[0]
        limit = Image.MAX_IMAGE_PIXELS  # None where the user lifted Pillow's limit
        if not isinstance(size, int) or resize.max_size is not None or limit is None:
            return None  # a fixed output size, or a capped longer side
        short, long = sorted((height, width))
        resized_long = int(size * long / short)
        if size * resized_long <= limit:
            return None
        resized = (resized_long, size) if width >= height else (size, resized_long)
        return (f"the classifier's pre-processing scales its shorter side to {size} px before the centre crop, "
                f"which makes it {resized[0]}x{resized[1]} ({size * resized_long / 1e6:.0f} MP), beyond Pillow's "
                f"limit of {limit / 1e6:.0f} MP for one image: crop it to at most {limit // size ** 2}:1 "
                "(longer side : shorter side)")

    def batches(self, pictures: List[Picture]) -> List[List[Picture]]:
        return [pictures]

    def crop(self, x: torch.Tensor) -> np.ndarray:
        """The model's (normalised) input back as the uint8 crop it saw."""
        mean = torch.tensor(self.data_config["mean"]).view(3, 1, 1)
        std = torch.tensor(self.data_config["std"]).view(3, 1, 1)
        rgb = (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)
        return (rgb.numpy() * 255).round().astype(np.uint8)

    def name(self, label: int) -> str:
        return self.class_names[label] if self.class_names else f"class {label}"

    @torch.inference_mode()
    def predict(self, pictures: List[Picture]) -> List[Result]:
        x = torch.stack([self.transform(Image.fromarray(p.rgb)) for p in pictures]).to(self.device)
        with captured(self.model, self.clusters) as maps, \
                torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            probabilities = self.model(x).float().softmax(dim=-1).cpu()
        scores, labels = probabilities.topk(min(TOP_K, probabilities.shape[1]), dim=1)
        clusters = last_clusters(maps)
        results = []
        for i, picture in enumerate(pictures):
            top = [dict(label=int(k), class_name=self.name(int(k)), score=round(float(s), 6))
                   for s, k in zip(scores[i], labels[i])]
            panels = [drawing.classification_panel(picture.rgb, top, self.title)]
            if clusters:
                stage, assignments = clusters
                caption = cluster_caption(stage, assignments, ", model input crop")
                panel = drawing.cluster_panel(self.crop(x[i]), assignments[i], caption)
                panels.append(drawing.resize_panel(panel, picture.rgb.shape[0]))
            results.append(Result(dict(top5=top), {"": drawing.side_by_side(panels)}))
        return results


# -- detection and segmentation (OpenMMLab inferencers) ------------------------------------------
def openmmlab_config(config: str, scope: str, cfg_options: Optional[dict]):
    """The config, with its plug-in folder importable (``custom_imports``) and no annotation loading."""
    from runtime.openmmlab import load_config

    cfg = load_config(config, default_scope=scope, cfg_options=cfg_options)
    pipeline = cfg.test_dataloader.dataset.pipeline
    cfg.test_dataloader.dataset.pipeline = [t for t in pipeline if t["type"] != "LoadAnnotations"]
    return cfg


@contextlib.contextmanager
def quiet_construction():
    """Built with ``weights=None``, an inferencer warns of random weights and default class names;
    the weights and the names are loaded right after by the project's loader, so those warnings
    (and the visualizer's about its unused save folder) would only mislead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def load_openmmlab_weights(model: torch.nn.Module, checkpoint: Optional[str], cfg, datasets_registry) -> dict:
    """Load ``checkpoint`` (a file, a URL or ``pretrained``) exactly into ``model``; returns the dataset
    meta (classes, palette).

    The class names come from the checkpoint's meta (mmengine Runner files) or, for released files
    without it, from the config's dataset (COCO or ADE20K).  Without ``checkpoint`` the weights stay random.
    """
    from runtime.openmmlab import load_model_checkpoint, weights_source

    meta = dict(datasets_registry.get(cfg.test_dataloader.dataset.type).METAINFO)
    if checkpoint:
        report = load_model_checkpoint(model, weights_source(checkpoint, cfg.filename))
        meta.update((report.checkpoint.get("meta") or {}).get("dataset_meta") or {})
    return meta


class _OpenMMLabPredictor:
    """Shared by ``Detector`` and ``Segmenter``: the inferencer, its weights, names and clusters."""

    def __init__(self, inferencer, checkpoint: Optional[str], cfg, datasets_registry, device: str, clusters: bool):
        self.inferencer = inferencer
        self.inferencer.show_progress = False  # tools/predict.py shows one bar for the whole run
        self.model = inferencer.model
        meta = load_openmmlab_weights(self.model, checkpoint, cfg, datasets_registry)
        self.model.dataset_meta = meta
        self.class_names = [str(name) for name in meta["classes"]]
        self.colours = drawing.class_colours(len(self.class_names), meta.get("palette"))
        for_device(self.model, device)
        self.checkpoint = checkpoint
        self.random_weights = checkpoint is None  # tools/predict.py requires one; tools/explore.py not
        self.clusters = clusters
        self.title = Path(cfg.filename).stem + weights_note(self.random_weights)

    def header(self) -> dict:
        return dict(model=self.title, checkpoint=self.checkpoint)

    def name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class {label}"

    def unfit(self, height: int, width: int) -> Optional[str]:
        """Why the test pipeline cannot take an image of this size (None: it can): resized to fit its
        scale with the aspect ratio kept, a very long, thin image would be 0 pixels high or wide,
        which OpenCV refuses with an assertion."""
        import mmcv
        from mmcv.transforms import Resize

        for step in self.inferencer.pipeline.transforms:
            if isinstance(step, Resize) and step.keep_ratio and step.scale is not None:
                new_width, new_height = mmcv.rescale_size((width, height), tuple(step.scale))
                if min(new_width, new_height) >= 1:
                    return None
                longest = max(step.scale)
                return (f"the test pipeline resizes it to fit {step.scale[0]}x{step.scale[1]} keeping its aspect "
                        f"ratio, which makes it {new_width}x{new_height} pixels: crop it to at most "
                        f"{2 * longest}:1 (longer side : shorter side)")
        return None

    def run(self, pictures: List[Picture]):
        """The inferencer's data samples for ``pictures``, and the captured clusters (or None)."""
        bgr = [np.ascontiguousarray(p.rgb[..., ::-1]) for p in pictures]  # mmcv's channel order
        with torch.no_grad(), captured(self.model.backbone, self.clusters) as maps:
            samples = self.infer(bgr)
        return samples, last_clusters(maps)

    def cluster_panel(self, picture: Picture, sample, clusters, index: int):
        """The clusters of the image's valid region (without the batch padding), at its own size."""
        stage, assignments = clusters
        meta = sample.metainfo
        resized = meta["img_shape"][:2]
        padded = meta.get("batch_input_shape", resized)
        h, w = assignments.shape[-2:]
        valid = assignments[index][:, : -(-h * resized[0] // padded[0]), : -(-w * resized[1] // padded[1])]
        return drawing.cluster_panel(picture.rgb, valid, cluster_caption(stage, assignments))


def rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding of a binary (H, W) mask, with ``counts`` as text (JSON)."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(s) for s in encoded["size"]], counts=encoded["counts"].decode("ascii"))


class Detector(_OpenMMLabPredictor):
    """An mmdet model: ``--config CONFIG --checkpoint PATH|URL``; boxes, scores and instance masks."""

    task = "detect"

    def __init__(self, config: str, checkpoint: str, device: str, clusters: bool = False, score_thr: float = 0.3,
                 cfg_options: Optional[dict] = None):
        from mmdet.apis import DetInferencer
        from mmdet.registry import DATASETS

        cfg = openmmlab_config(config, "mmdet", cfg_options)
        with quiet_construction():
            inferencer = DetInferencer(model=cfg, weights=None, device=device, show_progress=False)
        super().__init__(inferencer, checkpoint, cfg, DATASETS, device, clusters)
        inferencer.visualizer.dataset_meta = self.model.dataset_meta
        self.score_thr = score_thr

    def header(self) -> dict:
        return dict(super().header(), score_thr=self.score_thr)

    def infer(self, bgr: List[np.ndarray]) -> list:
        return self.inferencer(bgr, batch_size=len(bgr), return_datasamples=True)["predictions"]

    def batches(self, pictures: List[Picture]) -> List[List[Picture]]:
        return [pictures]

    def predict(self, pictures: List[Picture]) -> List[Result]:
        samples, clusters = self.run(pictures)
        results = []
        for i, (picture, sample) in enumerate(zip(pictures, samples)):
            found = sample.pred_instances
            keep = (found.scores >= self.score_thr).nonzero().flatten().cpu()
            keep = keep[found.scores.cpu()[keep].argsort(descending=True)]
            masks = found.masks[keep].cpu().numpy().astype(bool) if "masks" in found else []
            instances = []
            for k, index in enumerate(keep.tolist()):
                label = int(found.labels[index])
                instance = dict(bbox=[round(float(v), 2) for v in found.bboxes[index]],
                                score=round(float(found.scores[index]), 6), label=label, class_name=self.name(label))
                if len(masks):
                    instance["mask"] = rle(masks[k])
                instances.append(instance)
            title = f"{len(instances)} detections with score >= {self.score_thr}"
            panels = [drawing.detection_panel(picture.rgb, instances, masks, title, self.colours)]
            if clusters:
                panels.append(self.cluster_panel(picture, sample, clusters, i))
            results.append(Result(dict(instances=instances), {"": drawing.side_by_side(panels)}))
        return results


class Segmenter(_OpenMMLabPredictor):
    """An mmseg model: ``--config CONFIG --checkpoint PATH|URL``; a class per pixel."""

    task = "segment"

    def __init__(self, config: str, checkpoint: str, device: str, clusters: bool = False,
                 cfg_options: Optional[dict] = None):
        from mmseg.apis import MMSegInferencer
        from mmseg.registry import DATASETS

        cfg = openmmlab_config(config, "mmseg", cfg_options)
        with quiet_construction():
            inferencer = MMSegInferencer(model=cfg, weights=None, device=device)
        super().__init__(inferencer, checkpoint, cfg, DATASETS, device, clusters)

    def infer(self, bgr: List[np.ndarray]) -> list:
        samples = self.inferencer(bgr, batch_size=len(bgr), return_datasamples=True)
        return samples if isinstance(samples, list) else [samples]  # one image: its sample alone

    def batches(self, pictures: List[Picture]) -> List[List[Picture]]:
        """Images of one size per batch: mmseg's test preprocessing stacks them without padding."""
        groups: Dict[Tuple[int, ...], List[Picture]] = {}
        for picture in pictures:
            groups.setdefault(picture.rgb.shape, []).append(picture)
        return list(groups.values())

    def predict(self, pictures: List[Picture]) -> List[Result]:
        samples, clusters = self.run(pictures)
        results = []
        for i, (picture, sample) in enumerate(zip(pictures, samples)):
            labels = sample.pred_sem_seg.data[0].cpu().numpy()
            counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
            present = [dict(label=int(k), class_name=self.name(int(k)), fraction=round(counts[k] / labels.size, 6))
                       for k in np.argsort(-counts, kind="stable") if counts[k]]
            panels = [drawing.segmentation_panel(picture.rgb, labels, self.colours, self.title)]
            if clusters:
                panels.append(self.cluster_panel(picture, sample, clusters, i))
            panels.append(drawing.legend_column(picture.rgb.shape[0], present, self.colours, picture.rgb.shape[:2]))
            dtype = np.uint8 if len(self.class_names) <= 256 else np.uint16
            results.append(Result(dict(classes=present), {"": drawing.side_by_side(panels),
                                                          "_labels": Image.fromarray(labels.astype(dtype))}))
        return results
