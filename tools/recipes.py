"""Print (or write into the task READMEs) the training-recipe tables, read from what the launchers run.

    python tools/recipes.py                # print the three tables
    python tools/recipes.py --write        # refresh the blocks between the recipe markers of
                                           # classification/, detection/ and segmentation/README.md

Classification: the arguments that ``train_timm.py`` resolves for the seed's command
(``train_timm.sh configs/imagenet_vit_adamw.yml MODEL ...``).  Detection and segmentation: each zoo
config as mmengine merges it, with the AMP default of ``runtime/openmmlab.py``'s ``train_main``.
``tests/test_recipes.py`` checks these against the official recipes and keeps the READMEs in sync.
"""
import argparse
import re
import sys
from pathlib import Path

from mmengine.config import Config

import models
from runtime.openmmlab import amp_enabled

REPO = Path(__file__).resolve().parents[1]

IMAGENET_CONFIG = REPO / "classification" / "configs" / "imagenet_vit_adamw.yml"
START, END = "<!-- recipes:start -->", "<!-- recipes:end -->"
README = {task: REPO / task / "README.md" for task in ("classification", "detection", "segmentation")}
ZOO_CONFIGS = {
    "detection": sorted((REPO / "detection" / "configs" / "paca_vit").glob("*/*.py")),
    "segmentation": sorted((REPO / "segmentation" / "configs" / "paca_vit").glob("*/*.py")),
}


def imagenet_args(model: str) -> argparse.Namespace:
    """``train_timm.py``'s resolved arguments for the seed's ImageNet command (parsed, not run)."""
    from classification import train_timm

    return train_timm.parse_args(["-c", str(IMAGENET_CONFIG), "--model", model, "--data-dir", "IMNET",
                                  "--output", "out"])


def zoo_config(path: Path) -> Config:
    """A zoo config as mmengine merges it (the plug-in imports are not needed to read it)."""
    return Config.fromfile(str(path), import_custom_modules=False)


def amp_column(cuda_only: bool) -> str:
    return "fp16 on CUDA (fp32 on CPU)" if cuda_only else "off"


def classification_table() -> str:
    lines = ["| model | drop path | epochs | batch per GPU | lr | AMP |", "|:---|---:|---:|---:|:---|:---|"]
    for name in models.VARIANTS:
        args = imagenet_args(name)
        lr = f"{args.lr_base:g} x global batch / {args.lr_base_size}"
        lines.append(f"| `{name}` | {args.drop_path:g} | {args.epochs} | {args.batch_size} | {lr} | "
                     f"{amp_column(args.amp)} |")
    return "\n".join(lines)


def openmmlab_table(task: str) -> str:
    length = "epochs" if task == "detection" else "iterations"
    lines = [f"| config | drop path | {length} | batch per GPU | lr | AMP |", "|:---|---:|---:|---:|:---|:---|"]
    amp = amp_enabled(None, cuda=True) and not amp_enabled(None, cuda=False)
    for path in ZOO_CONFIGS[task]:
        cfg = zoo_config(path)
        lr = f"{cfg.optim_wrapper.optimizer.lr:g}"
        if cfg.get("auto_scale_lr", {}).get("enable"):
            lr += f" x total batch / {cfg.auto_scale_lr.base_batch_size}"
        span = cfg.train_cfg.max_epochs if task == "detection" else cfg.train_cfg.max_iters
        lines.append(f"| `{path.stem}` | {cfg.model.backbone.drop_path_rate:g} | {span} | "
                     f"{cfg.train_dataloader.batch_size} | {lr} | {amp_column(amp)} |")
    return "\n".join(lines)


def tables() -> dict:
    return {"classification": classification_table(), "detection": openmmlab_table("detection"),
            "segmentation": openmmlab_table("segmentation")}


def block(text: str) -> str:
    return f"{START}\n{text}\n{END}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the recipe block of each task README")
    args = parser.parse_args()
    for task, text in tables().items():
        if not args.write:
            print(f"{task}:\n{text}\n")
            continue
        readme = README[task].read_text()
        if START not in readme or END not in readme:
            sys.exit(f"{README[task]} has no {START} ... {END} block to fill")
        README[task].write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block(text), readme,
                                       flags=re.S))
        print(f"updated the recipe table in {README[task]}")


if __name__ == "__main__":
    main()
