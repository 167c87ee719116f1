"""Pieces shared by train_timm.py, validate.py and benchmark.py: data, the training classifier, evaluation.

The scripts import it as ``classification.cls_common`` (the repository is installed in place by
install.sh); ``import models`` registers the PaCa-ViT models with timm.
"""
import logging
import os
import time
from contextlib import nullcontext
from functools import partial
from typing import List

import timm
import torch
import torch.distributed as dist
from PIL import Image
from timm.data import ImageDataset, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import DataLoader, Subset

import models  # noqa: F401  (registers the PaCa-ViT models with timm)
from models import check_model_name
from runtime.cli import UsageError
from runtime.compile_cache import key_compile_caches_by_cpu_isa
from runtime.images import to_rgb8
from runtime.loader_workers import end_workers_with_parent

_logger = logging.getLogger("pacavit")


def default_device() -> str:
    """The launchers export PACA_DEVICE (cuda|cpu); direct runs pick CUDA when present."""
    return os.environ.get("PACA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# data
def require_split(data_dir: str, split: str) -> str:
    """The ImageFolder folder ``data_dir/split``, or a UsageError saying how to provide it."""
    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise UsageError(
            f"dataset folder {path} not found. Expected an ImageFolder layout "
            f"<dataset>/{{train,val}}/<class>/<image>; link your data under datasets/ "
            f"(see datasets/README.md) or export the bundled digits with "
            f"'python classification/make_digits_dataset.py'"
        )
    return path


def check_folders_reached_once(split_dir: str) -> None:
    """Refuse a split where timm's folder walk (which follows symlinks) reaches a folder twice.

    A link back up the tree (``train/ellipse/up -> ..``, ``train/all -> .``) is walked again and again
    until the path gets too long, multiplying the images about forty times; two links to one folder
    count its images twice.
    """
    reached = {}  # real path -> the first path it was reached by
    pending = [split_dir]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in reached:
            first = reached[real]
            if os.path.commonpath([first, folder]) == first:
                how = f"is a symlink loop: it leads back to {first}, so its images would be counted over and over"
            else:
                how = f"is the same folder as {first}, so its images would be counted twice"
            raise UsageError(f"{folder} {how}. Remove the link, then run again")
        reached[real] = folder
        with os.scandir(folder) as entries:
            pending += sorted((e.path for e in entries if e.is_dir()), reverse=True)


def class_folders(split_dir: str) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def check_no_empty_class(split_dir: str, classes: List[str]) -> None:
    """A class folder without images (directly inside it, where timm labels them by the folder's name)
    would still get an output of the classifier that no training image ever teaches."""
    suffixes = get_img_extensions(as_set=True)
    for name in classes:
        folder = os.path.join(split_dir, name)
        with os.scandir(folder) as entries:
            if not any(os.path.splitext(e.name)[1].lower() in suffixes and e.is_file() for e in entries):
                raise UsageError(f"class folder {folder} holds no images ({', '.join(sorted(suffixes))}): it would "
                                 f"become a class that can never be predicted. Put its images in it or remove it")


def check_least(parser, args, **least) -> None:
    """``parser.error`` naming the option when an argument is below its least value (None: unset)."""
    for name, bound in least.items():
        value = getattr(args, name)
        if value is not None and value < bound:
            parser.error(f"--{name.replace('_', '-')} must be at least {bound}, got {value}")


def class_map_for(data_dir: str, split: str) -> dict:
    """Class-name -> index mapping, taken from ``train/`` when it exists (as in training).

    Indexing the validation images by the training classes keeps labels right even when the
    validation split lacks a class; a validation class unknown to training is an error.  Both
    splits are checked for folders reached twice, and the classes for empty folders.
    """
    split_dir = require_split(data_dir, split)
    check_folders_reached_once(split_dir)
    val_classes = class_folders(split_dir)
    classes_dir = os.path.join(data_dir, "train")
    if os.path.isdir(classes_dir):
        if os.path.realpath(classes_dir) != os.path.realpath(split_dir):
            check_folders_reached_once(classes_dir)
        classes = class_folders(classes_dir)
    else:
        classes_dir, classes = split_dir, val_classes
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise UsageError(f"classes {unknown[:5]} in {data_dir}/{split} are missing from {classes_dir}")
    if not classes:
        raise UsageError(f"no class folders in {split_dir}")
    check_no_empty_class(classes_dir, classes)
    return {name: index for index, name in enumerate(classes)}


def checkpoint_class_map(data_dir: str, split: str, class_names: List[str], source: str) -> dict:
    """Class-name -> index for a classifier trained on ``class_names`` (its output order), to
    evaluate it on ``data_dir/split``, which may hold fewer of them; a folder not among them is an
    error (the label of every image must be one the classifier was trained on)."""
    split_dir = require_split(data_dir, split)
    unknown = sorted(set(class_folders(split_dir)) - set(class_names))
    if unknown:
        shown = ", ".join(class_names[:5]) + (", ..." if len(class_names) > 5 else "")
        raise UsageError(f"{source} was trained on other classes: {split_dir} has {', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}, which are not among its {len(class_names)} "
                         f"({shown}); give a checkpoint trained on these classes")
    return {name: index for index, name in enumerate(class_names)}


def training_class_map(data_dir: str, train_split: str, val_split: str) -> dict:
    """``class_map_for(data_dir, val_split)``, with the training split checked as well when it is not ``train/``
    (which ``class_map_for`` checks itself)."""
    train_dir = require_split(data_dir, train_split)
    if os.path.realpath(train_dir) != os.path.realpath(os.path.join(data_dir, "train")):
        check_folders_reached_once(train_dir)
    return class_map_for(data_dir, val_split)


class _Rgb8ImageFolder(ImageDataset):
    """timm's ImageDataset reading its images with ``to_rgb8``: a 16-bit PNG keeps its brightness,
    where Pillow's ``convert("RGB")`` would clip it almost white."""

    # PIL reports some broken PNGs as SyntaxError
    READ_ERRORS = (OSError, SyntaxError)

    def read(self, index):
        """(8-bit RGB image, target) of item ``index``; raises one of READ_ERRORS if unreadable."""
        file, target = self.reader[index][:2]
        with file:
            return to_rgb8(Image.open(file), self.filename(index, absolute=True)), target


class EvalImageFolder(_Rgb8ImageFolder):
    """An ImageFolder split where each image counts exactly once.

    timm's ImageDataset answers an unreadable image with the next one (counted twice, the warning
    names no file); here it stops the evaluation with an error naming the file.
    """

    def unreadable(self, indices) -> List[str]:
        """The files among ``indices`` whose image header cannot be read (not decoded: quick)."""
        bad = []
        for index in indices:
            path = self.filename(index, absolute=True)
            try:
                with Image.open(path):
                    pass
            except self.READ_ERRORS:
                bad.append(path)
        return bad

    def __getitem__(self, index):
        try:
            image, target = self.read(index)
        except self.READ_ERRORS as err:
            raise UsageError(f"cannot read image {self.filename(index, absolute=True)} ({err}). Every image of "
                             f"an evaluation counts once: repair or remove the file, then run again") from None
        return self.transform(image), target


class TrainImageFolder(_Rgb8ImageFolder):
    """The training split: as in timm, an unreadable image is skipped for the next one, with a
    warning that names it."""

    def __getitem__(self, index):
        for _ in range(self._max_retries):
            try:
                image, target = self.read(index)
                break
            except self.READ_ERRORS as err:
                name = self.filename(index, absolute=True)
                _logger.warning(f"skipped unreadable training image {name} ({err}); the next one takes its place")
                index = (index + 1) % len(self.reader)
        else:
            raise UsageError(f"{self._max_retries} training images in a row are unreadable, the last {name}: "
                             "repair or remove them, then run again")
        return self.transform(image), target


def check_evaluation_images(loader) -> None:
    """Before training: a validation image that cannot be read would stop the run after its first
    epoch of training, unsaved; say so now.  Each process checks its own shard."""
    dataset = loader.dataset
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, range(len(dataset)))
    start = time.time()
    bad = base.unreadable(indices)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UsageError(f"{len(bad)} validation image(s) cannot be read: {shown}. Every image of an evaluation "
                         f"counts once: repair or remove them before training")
    _logger.info(f"validation images readable: {len(indices)} checked in {time.time() - start:.1f}s")


def build_eval_loader(data_dir, split, data_config, batch_size, workers, pin_memory=False, class_map=None):
    """Deterministic evaluation loader; under torch.distributed each rank gets a disjoint shard.

    Shards are strided without padding, so summing counts over ranks gives the exact accuracy
    of the whole split (a padded sampler would count some images twice).  The labels follow
    ``class_map`` (default: :func:`class_map_for`).
    """
    dataset = EvalImageFolder(require_split(data_dir, split), class_map=class_map or class_map_for(data_dir, split))
    dataset.transform = create_transform(**data_config, is_training=False)
    if dist.is_available() and dist.is_initialized():
        dataset = Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))
    return end_workers_with_parent(
        DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory))


# ---------------------------------------------------------------------------------------------
# models
def create_classifier(name: str, num_classes: int, **kwargs) -> torch.nn.Module:
    check_model_name(name)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def autocast_for(device: torch.device, amp: bool, dtype: str = "float16"):
    """A mixed-precision context factory on CUDA when asked; plain fp32 everywhere else."""
    if amp and device.type == "cuda":
        return partial(torch.autocast, device_type="cuda", dtype=getattr(torch, dtype))
    return nullcontext


def compile_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """``model.compile()``: in place, so parameter names and checkpoints stay the plain model's; the
    compile caches keyed by the CPU's vector ISA first (``runtime.compile_cache``)."""
    key_compile_caches_by_cpu_isa()
    model.compile()
    return model


# ---------------------------------------------------------------------------------------------
# evaluation
@torch.inference_mode()
def evaluate(model, loader, device, autocast=nullcontext, channels_last=False, log_every=0):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader, summed over all ranks.

    Counts correct predictions (not per-batch percentages) so sharded evaluation is exact.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, images
    for step, (images, target) in enumerate(loader):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(images)
        output = output.float()
        topk = output.topk(min(5, output.size(1)), dim=1).indices
        hits = topk.eq(target[:, None])
        totals += torch.stack(
            [
                torch.nn.functional.cross_entropy(output, target, reduction="sum").double(),
                hits[:, :1].sum().double(),
                hits.sum().double(),
                torch.tensor(target.numel(), dtype=torch.float64, device=device),
            ]
        )
        if log_every and (step + 1) % log_every == 0:
            _logger.info(f"eval [{step + 1}/{len(loader)}]")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "images": int(count)}
