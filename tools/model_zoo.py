"""Print (or write into README.md) the model-zoo table, computed from the code.

    python tools/model_zoo.py                 # print the markdown table
    python tools/model_zoo.py --write README.md   # refresh the block between the zoo markers

Params are counted on the classification model (1000 classes); GFLOPs are fvcore multiply-adds
at 224x224 including the attention matmuls (``models.flops``), the convention of the seed tables.
"""
import argparse
import re
import sys
from pathlib import Path

import timm

import models
from models.flops import count_flops, count_params
from models.paca_vit import RELEASED_IMAGENET

START, END = "<!-- model-zoo:start -->", "<!-- model-zoo:end -->"


def describe(name: str) -> str:
    row = models.VARIANTS[name]
    if row.get("teacher_depths"):
        how = "ConvMixer teacher"
    else:
        how = f"{row.get('clustering', 'conv')}, {'block' if row.get('cluster_every') == 1 else 'stage'}-wise"
    return f"{how}, M={list(row['num_clusters'])}"


def table() -> str:
    lines = [
        "| model name | clustering | #params | GFLOPs | ImageNet checkpoint |",
        "|:---|:---|---:|---:|:---|",
    ]
    for name in models.VARIANTS:
        model = timm.create_model(name)
        params, flops = count_params(model) / 1e6, count_flops(model, (1, 3, 224, 224)) / 1e9
        filename = RELEASED_IMAGENET.get(name)
        link = f"[{filename}]({model.pretrained_cfg['url']})" if filename else "not released"
        lines.append(f"| `{name}` | {describe(name)} | {params:.2f}M | {flops:.2f} | {link} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="README", help="replace the table between the zoo markers in this file")
    args = parser.parse_args()
    text = table()
    if not args.write:
        print(text)
        return
    path = Path(args.write)
    readme = path.read_text()
    if START not in readme or END not in readme:
        sys.exit(f"{path} has no {START} ... {END} block to fill")
    block = f"{START}\n{text}\n{END}"
    path.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S))
    print(f"updated the model zoo in {path}")


if __name__ == "__main__":
    main()
