#!/usr/bin/env python
"""Top-1 / top-5 accuracy of a classifier on ``<data-dir>/val`` (an ImageFolder).

The checkpoint is a local file, a URL, or ``pretrained`` for the released ImageNet weights of
the model name.  A checkpoint of train_timm.py labels the images through the class names it
stores (the split may hold a subset of them); without names, the sorted class folders are its
classes.  Usually started by validate.sh:

    python validate.py --model pacavit_tiny_p2cconv_100_0 --checkpoint pretrained --data-dir ../datasets/IMNET
"""
import argparse
import json
import logging
import os
import time
from functools import partial

import torch
from timm.data import resolve_data_config
from timm.utils import init_distributed_device, setup_default_logging

from classification import cls_common
from models import PRETRAINED, check_model_name, create_classifier, fuse_for_cpu
from models.layers.fused import cpu_fusion_support
from runtime.cli import UsageError, run_main

_logger = logging.getLogger("pacavit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True, help="file, URL, or 'pretrained' (released weights)")
    p.add_argument("--data-dir", required=True, help="ImageFolder root holding val/ (and train/ for class order)")
    p.add_argument("--split", default="val")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default="")
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--use-ema", action=flag, default=False, help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--device", default=cls_common.default_device())
    p.add_argument("--amp", action=flag, default=False,
                   help="mixed precision: on CUDA; on a CPU bfloat16, where it has bfloat16 kernels (avx512_bf16, amx_bf16)")
    p.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"),
                   help="default: float16 on CUDA, bfloat16 on a CPU")
    p.add_argument("--channels-last", action=flag, default=False, help="NHWC layout (CUDA only)")
    p.add_argument("--compile", action=flag, default=False, help="torch.compile the model first")
    p.add_argument("--pin-mem", action=flag, default=False)
    p.add_argument("--results-file", default="", help="also write the metrics to this JSON file")
    p.add_argument("--check-args", action="store_true",
                   help="check the arguments, the model name, --amp on --device and the split folder, then exit "
                        "(0: fine; 2: one error line); validate.sh runs this before it starts torchrun")
    args = p.parse_args(argv)
    cls_common.check_least(p, args, batch_size=1, workers=0, img_size=1)
    return args


def build_model(args, class_map: dict):
    """The classifier with the requested weights, and the class map of its outputs for the data
    whose own map (``cls_common.class_map_for``) is ``class_map``.

    A checkpoint that stores its class names (train_timm.py's) labels the images through them, so
    a dataset whose folders are another set, another order or a subset is evaluated right or
    refused; without names (the released ImageNet files) the folders, sorted, are its classes.
    ``models.create_classifier`` checks the model name, the file and the classifier's width.
    """
    released = args.checkpoint == PRETRAINED
    model, weights = create_classifier(args.model, args.checkpoint, num_classes=len(class_map) if released else None,
                                       use_ema=args.use_ema)
    if weights.class_names is not None:
        return model, cls_common.checkpoint_class_map(args.data_dir, args.split, weights.class_names, weights.source)
    if len(class_map) != model.num_classes:
        raise UsageError(f"the classifier in {weights.source} has {model.num_classes} classes and stores no class "
                         f"names, but {args.data_dir} has {len(class_map)}: give a checkpoint trained on these classes")
    return model, class_map


def amp_context(args, device):
    """The autocast context factory that ``--amp`` asks for on ``device`` (a no-op without it)."""
    if not (args.amp and device.type == "cpu"):
        return cls_common.autocast_for(device, args.amp, args.amp_dtype or "float16")
    if (args.amp_dtype or "bfloat16") != "bfloat16" or torch.bfloat16 not in cpu_fusion_support():
        raise UsageError("--amp on a CPU runs bfloat16, which needs a CPU with bfloat16 kernels (lscpu: avx512_bf16 "
                         "or amx_bf16) and --amp-dtype bfloat16; leave --amp out to evaluate in float32")
    return partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)


def check_command(args) -> None:
    """What needs neither the processes nor the weights: a mistake here is one line before torchrun."""
    check_model_name(args.model)
    amp_context(args, torch.device(args.device))
    cls_common.class_map_for(args.data_dir, args.split)


def main(argv=None):
    args = parse_args(argv)
    if args.check_args:
        check_command(args)
        return
    setup_default_logging()
    device = init_distributed_device(args)
    if args.rank != 0:
        _logger.setLevel(logging.WARNING)
    check_model_name(args.model)  # before the data is read
    autocast = amp_context(args, device)
    # the data is checked before any download
    model, class_map = build_model(args, cls_common.class_map_for(args.data_dir, args.split))
    num_classes = model.num_classes
    model = fuse_for_cpu(model)  # oneDNN layers where this CPU has them
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    channels_last = args.channels_last and device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if args.compile:
        cls_common.compile_in_place(model)
    loader = cls_common.build_eval_loader(args.data_dir, args.split, data_config, args.batch_size,
                                          args.workers, pin_memory=args.pin_mem, class_map=class_map)
    start = time.time()
    metrics = cls_common.evaluate(model, loader, device, autocast,
                                  channels_last, log_every=20)
    seconds = time.time() - start
    if args.rank == 0:
        result = {"model": args.model, "checkpoint": args.checkpoint, "data_dir": os.path.abspath(args.data_dir),
                  "split": args.split, "img_size": data_config["input_size"][-1], "num_classes": num_classes,
                  **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}
        _logger.info(f"{args.model} on {args.data_dir}/{args.split}: top1 {metrics['top1']:.2f} "
                     f"top5 {metrics['top5']:.2f} loss {metrics['loss']:.4f} "
                     f"({metrics['images']} images, {metrics['images'] / seconds:.1f} img/s)")
        if args.results_file:
            with open(args.results_file, "w") as f:
                json.dump(result, f, indent=2)
    if args.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
