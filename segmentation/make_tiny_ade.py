"""Write a tiny synthetic dataset in the layout of ADE20K (ADEChallengeData2016).

    python segmentation/make_tiny_ade.py --out datasets/ade_tiny/ADEChallengeData2016

gives ``images/{training,validation}/ADE_*.jpg`` and ``annotations/{training,validation}/ADE_*.png``
that mmseg's own ``ADE20KDataset`` reads unchanged: labels are stored as ADE stores them, 0 for
"other" (ignored after ``reduce_zero_label``) and 1..150 for the classes.  Each image is a
textured background class with a few rectangles and discs of other classes; every class has its
own colour, so a model can actually learn the task in a few iterations.  Use it to smoke-test
training, testing and visualisation without the real dataset, e.g. with
``PACAVIT_DATASETS=datasets/ade_tiny`` (the configs read ``$PACAVIT_DATASETS/ADEChallengeData2016``).
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = 150
SPLITS = {"training": "ADE_train", "validation": "ADE_val"}


def class_colours(seed: int = 0) -> np.ndarray:
    """One RGB colour per raw label value (0 = other, 1..150 = classes)."""
    return np.random.default_rng(seed).integers(0, 256, size=(NUM_CLASSES + 1, 3), dtype=np.uint8)


def synthetic_sample(rng: np.random.Generator, height: int, width: int, colours: np.ndarray, classes: np.ndarray):
    """An (image, label) pair: a background class plus a few shapes, some pixels labelled 'other'."""
    label = np.full((height, width), rng.choice(classes), dtype=np.uint8)
    rows, cols = np.mgrid[:height, :width]
    for _ in range(int(rng.integers(2, 5))):
        cls = rng.choice(np.append(classes, 0))  # 0: an "other" region, ignored in training
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(height // 8, height // 3 + 1), rng.integers(width // 8, width // 3 + 1)
        if rng.random() < 0.5:
            region = (abs(rows - cy) <= ry) & (abs(cols - cx) <= rx)
        else:
            region = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        label[region] = cls
    noise = rng.normal(0.0, 12.0, size=(height, width, 3))
    image = np.clip(colours[label].astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return image, label


def write_dataset(out: Path, num_train: int, num_val: int, height: int, width: int, num_used_classes: int,
                  seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    colours = class_colours(seed)
    classes = np.arange(1, num_used_classes + 1)
    for split, count in (("training", num_train), ("validation", num_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index in range(1, count + 1):
            image, label = synthetic_sample(rng, height, width, colours, classes)
            name = f"{SPLITS[split]}_{index:08d}"
            Image.fromarray(image).save(out / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(out / "annotations" / split / f"{name}.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to create (ADE20K layout)")
    parser.add_argument("--num-train", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--num-val", type=int, default=4, help="validation images (default 4)")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"),
                        help="image size (default 96 128)")
    parser.add_argument("--classes", type=int, default=8,
                        help=f"how many of the {NUM_CLASSES} classes appear (default 8; the model still predicts all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= NUM_CLASSES:
        parser.error(f"--classes must be in 1..{NUM_CLASSES}")
    if min(args.size) < 16 or min(args.num_train, args.num_val) < 1:
        parser.error("--size must be at least 16x16 and --num-train/--num-val at least 1")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    write_dataset(args.out, args.num_train, args.num_val, *args.size, args.classes, args.seed)
    print(f"wrote {args.num_train} training and {args.num_val} validation images ({args.size[0]}x{args.size[1]}, "
          f"{args.classes} classes) to {args.out}")


if __name__ == "__main__":
    main()
