"""Write a tiny synthetic instance-segmentation dataset in the real MS-COCO layout.

    python detection/make_tiny_coco.py --out datasets/coco_tiny

gives ``annotations/instances_{train,val}2017.json`` (polygon masks, boxes, areas) and JPEG images
in ``train2017/`` and ``val2017/``: coloured squares, discs and triangles on a noisy background.
The files list the 80 COCO categories with their real ids, and the three shapes are labelled as
three of them (tv, sports ball, kite), so that mmdet's own ``CocoDataset`` and ``CocoMetric`` read
them with the standard 80-class configs, unchanged.
It exists to run the whole pipeline (training, resume, testing, visualisation) in seconds on CPU.
"""
import argparse
import json
import math
from pathlib import Path
from typing import List, Tuple

import numpy as np
from mmdet.datasets import CocoDataset
from PIL import Image, ImageDraw

# The ids of the 80 COCO categories, in the order of mmdet's CocoDataset class names.
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
)
# shape -> COCO category name
SHAPE_CATEGORIES = {"square": "tv", "disc": "sports ball", "triangle": "kite"}
DISC_VERTICES = 24


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a square / disc / triangle of circumradius ``r`` centred at (cx, cy)."""
    sides = {"square": 4, "disc": DISC_VERTICES, "triangle": 3}[shape]
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def polygon_area(points: List[Tuple[float, float]]) -> float:
    xs, ys = np.array(points).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def coco_categories() -> List[dict]:
    names = CocoDataset.METAINFO["classes"]
    assert len(names) == len(COCO_CATEGORY_IDS)
    return [
        dict(id=cid, name=name, supercategory="shape" if name in SHAPE_CATEGORIES.values() else "unused")
        for cid, name in zip(COCO_CATEGORY_IDS, names)
    ]


def make_image(rng: np.random.Generator, width: int, height: int, category_ids: dict):
    """One image with 1-3 non-overlapping shapes, and their annotations (without ids)."""
    background = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8) + rng.integers(0, 120, size=3, dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    # one shape per cell of a 2x2 grid keeps the shapes apart, so every mask is fully visible
    cells = rng.permutation(4)[: rng.integers(1, 4)]
    annotations = []
    for cell in cells:
        cell_w, cell_h = width / 2, height / 2
        r = rng.uniform(0.3, 0.45) * min(cell_w, cell_h)
        cx = (cell % 2) * cell_w + rng.uniform(r, cell_w - r)
        cy = (cell // 2) * cell_h + rng.uniform(r, cell_h - r)
        shape = str(rng.choice(list(SHAPE_CATEGORIES)))
        points = shape_polygon(shape, cx, cy, r, rng.uniform(0, math.pi))
        draw.polygon(points, fill=tuple(int(c) for c in rng.integers(130, 256, size=3)))
        xs, ys = np.array(points).T
        annotations.append(dict(
            category_id=category_ids[SHAPE_CATEGORIES[shape]],
            segmentation=[[round(float(v), 2) for point in points for v in point]],
            area=round(polygon_area(points), 2),
            bbox=[round(float(v), 2) for v in (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())],
            iscrowd=0,
        ))
    return image, annotations


def write_split(out: Path, split: str, num_images: int, rng: np.random.Generator, size: Tuple[int, int]):
    image_dir = out / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = coco_categories()
    category_ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1 if split == "train" else 100000 + index + 1
        width, height = size if index % 2 == 0 else size[::-1]  # both orientations, like real data
        image, objects = make_image(rng, width, height, category_ids)
        file_name = f"{image_id:012d}.jpg"
        image.save(image_dir / file_name, quality=95)
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
        for obj in objects:
            annotations.append(dict(id=len(annotations) + 1 + 1000000 * (split == "val"), image_id=image_id, **obj))
    coco = dict(
        info=dict(description=f"PaCa-ViT tiny synthetic COCO ({split})", version="1.0", year=2023),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=categories,
    )
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    with open(out / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(coco, f)
    return len(images), len(annotations)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="datasets/coco_tiny", help="output folder (default: datasets/coco_tiny)")
    parser.add_argument("--train", type=int, default=8, help="number of training images (default: 8)")
    parser.add_argument("--val", type=int, default=4, help="number of validation images (default: 4)")
    parser.add_argument("--size", type=int, nargs=2, default=(192, 160), metavar=("W", "H"),
                        help="image size; odd images are transposed (default: 192 160)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    for split, count in (("train", args.train), ("val", args.val)):
        num_images, num_objects = write_split(out, split, count, rng, tuple(args.size))
        print(f"{split}: {num_images} images, {num_objects} objects")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
