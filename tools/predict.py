#!/usr/bin/env python
"""Predict on your own images: classification, detection with instance masks, semantic segmentation.

    python tools/predict.py classify IMAGE_OR_DIR... --model NAME [--checkpoint PATH|URL|pretrained] --out DIR
    python tools/predict.py detect   IMAGE_OR_DIR... --config CONFIG --checkpoint PATH|URL --out DIR [--score-thr T]
    python tools/predict.py segment  IMAGE_OR_DIR... --config CONFIG --checkpoint PATH|URL --out DIR

Folders are searched recursively for jpg, jpeg, png, bmp, webp, tif and tiff files.  For each image it writes
``DIR/<stem>.png`` (the predictions drawn on the image; segmentation also ``DIR/<stem>_labels.png``,
the class index of every pixel) and, for the whole run, ``DIR/predictions.json``.  An image that
cannot be read, or whose shape the model's pre-processing cannot take (a 1-pixel-high panorama for
the detector), is reported by name and why, and skipped (exit code 1 at the end); the others are
predicted.
A DIR that holds an earlier run's ``predictions.json`` is refused unless ``--overwrite``, and so is a
DIR another run is writing into (exit code 2, before any model loads).
"""
import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import torch
from tqdm import tqdm

from models import CheckpointError
from models.layers.fused import cpu_fusion_support
from runtime.cli import UsageError
from runtime.openmmlab_args import cfg_options_action
from runtime.images import IMAGE_SUFFIXES, SKLEARN_PREFIX, SKLEARN_SAMPLES, ImageReadError, read_image
from tools import predict_tasks as tasks
from tools.visualize_clusters import output_folders

_logger = logging.getLogger("predict")

PREDICTIONS = "predictions.json"


# -- inputs -------------------------------------------------------------------------------------
def sklearn_sample(name: str) -> str:
    """The file of one of scikit-learn's sample photos (``sklearn:china.jpg``, ``sklearn:flower.jpg``)."""
    import sklearn.datasets

    if name not in SKLEARN_SAMPLES:
        raise FileNotFoundError(f"no scikit-learn sample {SKLEARN_PREFIX}{name}; choose "
                                + " or ".join(SKLEARN_PREFIX + n for n in SKLEARN_SAMPLES))
    return str(Path(sklearn.datasets.__file__).parent / "images" / name)


def find_images(inputs: Sequence[str], out: Path) -> List[str]:
    """Files as given and the images inside folders (recursively, sorted), without ``out``'s own files."""
    found = []
    for item in inputs:
        if item.startswith(SKLEARN_PREFIX):
            found.append(sklearn_sample(item[len(SKLEARN_PREFIX):]))
            continue
        path = Path(item)
        if path.is_file():
            found.append(item)
        elif path.is_dir():
            own = out.resolve()
            inside = sorted(str(p) for p in path.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and own not in p.resolve().parents)
            if not inside:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {item}")
            found += inside
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return found


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -- the run ------------------------------------------------------------------------------------
def build_predictor(args: argparse.Namespace):
    if args.task == "classify":
        if args.bf16 and torch.device(args.device).type == "cpu" and torch.bfloat16 not in cpu_fusion_support():
            raise UsageError("--bf16: this CPU has no bfloat16 kernels (lscpu: avx512_bf16 or amx_bf16); "
                             "leave --bf16 out to predict in float32")
        return tasks.Classifier(args.model, args.checkpoint, args.device, args.clusters, args.bf16, args.img_size)
    if args.task == "detect":
        return tasks.Detector(args.config, args.checkpoint, args.device, args.clusters, args.score_thr,
                              args.cfg_options)
    return tasks.Segmenter(args.config, args.checkpoint, args.device, args.clusters, args.cfg_options)


def write_result(out: Path, picture: tasks.Picture, result: tasks.Result) -> dict:
    """Save the pictures of one image; returns its ``predictions.json`` entry."""
    written = []
    for suffix, image in result.pictures.items():
        image.save(out / f"{picture.stem}{suffix}.png")
        written.append(f"{picture.stem}{suffix}.png")
    height, width = picture.rgb.shape[:2]
    return dict(image=picture.source, width=width, height=height, outputs=written, **result.entry)


def predict_all(predictor, sources: List[str], out: Path, batch_size: int) -> Tuple[List[dict], List[str]]:
    """Predict every image in batches, writing its PNGs; returns the JSON entries and the skipped images."""
    stems = [folder.name for folder in output_folders(sources, out)]
    entries, skipped = [], []
    with tqdm(total=len(sources), unit="img", desc=predictor.task, file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in chunks(list(zip(sources, stems)), batch_size):
            pictures = []
            for source, stem in batch:
                try:
                    rgb = read_image(source)
                except ImageReadError as e:
                    problem = f"cannot read it as an image ({e})"
                else:
                    unfit = predictor.unfit(*rgb.shape[:2])
                    problem = unfit and f"it is {rgb.shape[1]}x{rgb.shape[0]} pixels: {unfit}"
                if problem:
                    tqdm.write(f"skipped {source}: {problem}", file=sys.stderr)
                    entries.append(dict(image=source, error=problem))
                    skipped.append(source)
                    bar.update(1)
                else:
                    pictures.append(tasks.Picture(source, stem, rgb))
            if not pictures:
                continue
            for group in predictor.batches(pictures):
                for picture, result in zip(group, predictor.predict(group)):
                    entries.append(write_result(out, picture, result))
                    bar.update(1)
    order = {source: i for i, source in enumerate(sources)}
    entries.sort(key=lambda e: order[e["image"]])  # same-size batches (segmentation) may reorder
    return entries, skipped


def write_json(path: Path, predictor, entries: List[dict]):
    """Written whole or not at all: a run killed while writing leaves no half a file."""
    document = dict(task=predictor.task, **predictor.header(), random_weights=predictor.random_weights,
                    images=entries, class_names=predictor.class_names)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    os.replace(partial, path)


# -- the output folder ----------------------------------------------------------------------------
@contextlib.contextmanager
def claimed_output(out: Path, overwrite: bool) -> Iterator[None]:
    """Create ``out`` and hold it for this run; every refusal is a UsageError, raised before any model loads.

    A finished run's ``predictions.json`` is never replaced unless ``overwrite`` (then that run's
    pictures go first); a second run into the folder is refused while this one holds it (an flock
    on the folder, which the system drops however this process ends).  A folder this run created
    and left empty (it failed before writing anything) is removed again.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"cannot create the --out folder {out} ({e.strerror}); choose another --out") from None
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            created = False  # the other run's folder
            raise UsageError(f"another predict.py run is writing into {out}; wait for it to end or choose "
                             f"another --out") from None
        try:
            tempfile.TemporaryFile(dir=out).close()
        except OSError as e:
            raise UsageError(f"cannot write into the --out folder {out} ({e.strerror}); choose another --out") from None
        if (out / PREDICTIONS).exists():
            if not overwrite:
                raise UsageError(f"{out} holds the results of an earlier run ({PREDICTIONS}); pass --overwrite "
                                 f"to replace them, or choose another --out")
            remove_previous_run(out)
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty: this run wrote its results there
                out.rmdir()
        os.close(folder)  # releases the lock


def remove_previous_run(out: Path) -> None:
    """The pictures listed in ``out``'s predictions.json, then the file (``--overwrite``)."""
    previous = out / PREDICTIONS
    try:
        entries = json.loads(previous.read_text())["images"]
        names = [name for entry in entries for name in entry.get("outputs", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        names = []  # not a predictions.json this tool wrote: only the file itself is replaced
    for name in names:
        if isinstance(name, str) and Path(name).name == name:  # files of the folder itself, nothing elsewhere
            (out / name).unlink(missing_ok=True)
    previous.unlink()


# -- command line -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="task", required=True, metavar="{classify,detect,segment}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files and folders (searched recursively); sklearn:china.jpg and "
                             "sklearn:flower.jpg are scikit-learn's sample photos")
    common.add_argument("--out", required=True, type=Path,
                        help="output folder (created); one that holds an earlier run's predictions.json is refused")
    common.add_argument("--overwrite", action="store_true",
                        help="replace the earlier run in --out (its pictures and predictions.json)")
    common.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    common.add_argument("--clusters", action="store_true",
                        help="draw the PaCa clusters of the backbone's last clustering stage beside each prediction")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when available, else cpu")

    classify = commands.add_parser("classify", parents=[common], help="top-5 classes of each image")
    classify.add_argument("--model", required=True, help="a pacavit_* model (or any timm model name)")
    classify.add_argument("--checkpoint", help="a file, a URL, or 'pretrained' (the released ImageNet weights); "
                                               "without it the weights are random (seed --seed)")
    classify.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    classify.add_argument("--img-size", type=int, default=None,
                          help="input size (default: the one a train_timm.py checkpoint was evaluated at, else the "
                               "model's default, 224)")
    classify.add_argument("--bf16", action="store_true",
                          help="bfloat16 autocast: on CUDA, or on a CPU with bfloat16 kernels (avx512_bf16, amx_bf16)")

    for name, what in (("detect", "boxes, classes, scores and instance masks"), ("segment", "a class per pixel")):
        sub = commands.add_parser(name, parents=[common], help=what)
        sub.add_argument("--config", required=True, help="an mmdet / mmseg config of this repository")
        sub.add_argument("--checkpoint", required=True, help="a file or URL that fits the config's model exactly, or "
                                                           "'pretrained' (the config's released COCO / ADE20K file)")
        sub.add_argument("--cfg-options", nargs="+", action=cfg_options_action(), default={},
                         help="override config entries, e.g. test_dataloader.dataset.pipeline.1.scale=(1024,512)")
        if name == "detect":
            sub.add_argument("--score-thr", type=float, default=0.3,
                             help="keep detections with at least this score (default 0.3)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if getattr(args, "img_size", None) is not None and args.img_size < 1:
        parser.error("--img-size must be at least 1")
    if not 0.0 <= getattr(args, "score_thr", 0.0) <= 1.0:
        parser.error(f"--score-thr is a score between 0 and 1, got {args.score_thr}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                     f"use --device cpu")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.task == "classify":
        torch.manual_seed(args.seed)
    with contextlib.ExitStack() as run:
        try:
            sources = find_images(args.inputs, args.out)
            run.enter_context(claimed_output(args.out, args.overwrite))
            predictor = build_predictor(args)
        except (CheckpointError, FileNotFoundError, ValueError, UsageError) as e:
            _logger.error("error: %s", e)
            return 2
        if predictor.random_weights:
            _logger.warning("no --checkpoint: random weights, the predictions mean nothing (the pictures say so)")
        entries, skipped = predict_all(predictor, sources, args.out, args.batch_size)
        write_json(args.out / PREDICTIONS, predictor, entries)
    _logger.info("predicted %d of %d images; pictures and %s in %s", len(sources) - len(skipped), len(sources),
                 PREDICTIONS, args.out)
    if skipped:
        _logger.error("%d of %d images could not be read or taken by the model and were skipped: %s",
                      len(skipped), len(sources), ", ".join(skipped))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
