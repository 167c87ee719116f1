#!/usr/bin/env python
"""Export scikit-learn's bundled handwritten digits as an ImageFolder dataset (no network).

1797 real 8x8 scans of the digits 0-9 (the UCI optical-recognition test set) are upsampled to
``--size`` pixels and written as PNGs to ``<root>/DIGITS/{train,val}/<digit>/<index>.png``
with a fixed stratified split, so the classification launchers can train on it like ImageNet:

    python classification/make_digits_dataset.py            # -> datasets/DIGITS
"""
import argparse
import os
import shutil
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_root() -> str:
    return os.environ.get("PACAVIT_DATASETS") or os.path.join(REPO_ROOT, "datasets")


def export(out_dir: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the split into ``out_dir`` (through a temporary folder, so it is all or nothing)."""
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, random_state=seed, stratify=digits.target
    )
    tmp_dir = out_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for i in sorted(split_idx):
            label = int(digits.target[i])
            folder = os.path.join(tmp_dir, split, str(label))
            os.makedirs(folder, exist_ok=True)
            # pixel values are 0..16 ink counts; scale to 0..255 and smooth the 8x8 grid up
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(
                os.path.join(folder, f"{i:04d}.png")
            )
    os.replace(tmp_dir, out_dir)
    return {"train": len(train_idx), "val": len(val_idx)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_root(), help="datasets folder (default: $PACAVIT_DATASETS or datasets/)")
    parser.add_argument("--name", default="DIGITS", help="dataset folder name under --root")
    parser.add_argument("--size", type=int, default=32, help="side of the exported images in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--force", action="store_true", help="rewrite an existing export")
    args = parser.parse_args(argv)

    out_dir = os.path.join(args.root, args.name)
    if os.path.isdir(out_dir) and not args.force:
        print(f"{out_dir} exists; keeping it (use --force to rewrite)")
        return 0
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(args.root, exist_ok=True)
    counts = export(out_dir, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images ({args.size}x{args.size}, 10 classes) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
