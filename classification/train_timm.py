#!/usr/bin/env python
"""Train an image classifier (PaCa-ViT or any timm model) on an ImageFolder dataset.

Written on timm's building blocks (data pipeline, Mixup/CutMix, optimizer and scheduler
factories, EMA, checkpoint saver, AMP scaler).  Usually started by ``train_timm.sh``, which picks
the output folder and runs one process per GPU (or CPU processes with gloo) through torchrun:

    python train_timm.py -c configs/imagenet_vit_adamw.yml --model pacavit_tiny_p2cconv_100_0 \
        --data-dir ../datasets/IMNET --output ../work_dirs/classification/try

YAML keys are the argument names below (``batch_size``, ``lr_base``, ...); command-line flags
override them.  Without ``--lr`` the rate is ``lr_base * global_batch / lr_base_size``.

Resuming is exact: every checkpoint holds the random state of every process, and each epoch's
sample order and data-loading workers are seeded from (seed, epoch, rank) alone, so a run
interrupted after an epoch and resumed ends with the weights of the uninterrupted run.  SIGTERM
(a scheduler's preemption notice) stops training after the next optimizer step (with several
processes, the one after) with a recovery checkpoint (``recovery-EPOCH-STEP.pth.tar``); resuming
from it draws that epoch's first STEP batches again without training on them, so it is exact too.
``--auto-resume`` continues from the newest intact checkpoint of ``--output`` (rank 0 picks it for
all processes, see ``runtime.run_folder``); when training ends rank 0 writes ``FINISHED`` there.
Checkpoints also hold ``class_names``, the class folder names in label order.
"""
import argparse
import csv
import errno
import glob
import logging
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from timm.data import Mixup, create_loader, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (
    AverageMeter,
    CheckpointSaver,
    ModelEmaV3,
    NativeScaler,
    dispatch_clip_grad,
    distribute_bn,
    get_state_dict,
    init_distributed_device,
    random_seed,
    reduce_tensor,
    setup_default_logging,
    unwrap_model,
    update_summary,
)

from classification import cls_common
from runtime.cli import UsageError, run_main
from runtime.loader_workers import end_workers_with_parent
from models import check_model_name, fuse_for_cpu
from models.checkpoint import CheckpointError, fit_state_dict, read_checkpoint
from models.paca_vit import IMAGENET_DROP_PATH_RATE
from runtime.run_folder import agreed_resume_point, check_shared_run_folder, claim_run_folder, mark_finished
from classification.plots import plot_training_curves

_logger = logging.getLogger("pacavit")
SUMMARY_CSV = "summary.csv"

config_parser = argparse.ArgumentParser(add_help=False)
config_parser.add_argument("-c", "--config", default="", help="YAML file of argument defaults")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument("-c", "--config", default="", help="YAML file of argument defaults")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="ImageFolder root holding train/ and val/")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    g.add_argument("--crop-pct", type=float, default=None, help="evaluation center-crop fraction")
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="", help="evaluation resize interpolation")
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="per-process batch size")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("-j", "--workers", type=int, default=4, help="data-loading processes per training process")
    g.add_argument("--pin-mem", action=flag, default=False)

    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm model name, e.g. pacavit_tiny_p2cconv_100_0")
    g.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")
    g.add_argument("--drop-path", type=float, default=None,
                   help="stochastic depth rate (default: a PaCa-ViT variant's official rate, else the model's)")
    g.add_argument("--model-ema", action=flag, default=False, help="keep an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--grad-accumulation-steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=None, help="absolute rate; overrides the lr_base rule")
    g.add_argument("--lr-base", type=float, default=5e-4)
    g.add_argument("--lr-base-size", type=int, default=512)
    g.add_argument("--lr-base-scale", default="linear", choices=("linear", "sqrt"))
    g.add_argument("--auto-scale-warmup-min-lr", action=flag, default=False,
                   help="scale warmup_lr and min_lr by the same batch ratio as lr")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action=flag, default=False, help="step the schedule every update")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--cooldown-epochs", type=int, default=0)

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action=flag, default=False, help="resize + crop only")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random-resized-crop area range")
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", default=None, help="RandAugment/AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="random-erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0 = never)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    g = p.add_argument_group("run")
    g.add_argument("--output", default="", help="folder for logs, checkpoints and plots")
    g.add_argument("--resume", default="", help="training checkpoint to continue from")
    g.add_argument("--auto-resume", action="store_true",
                   help="continue from the newest intact checkpoint in --output, if any (rank 0 chooses it "
                        "for every process); what the launcher's Resume=1 passes")
    g.add_argument("--device", default=cls_common.default_device())
    g.add_argument("--amp", action=flag, default=False, help="mixed precision (CUDA only)")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    g.add_argument("--channels-last", action=flag, default=False, help="NHWC memory layout (CUDA only)")
    g.add_argument("--cpu-kernels", action=flag, default=True,
                   help="on the CPU, train the model with models.fuse_for_cpu's layers: the same parameters and "
                        "gradients, and on a CPU with AVX-512 or AVX2 PaCa's depthwise convs on the project's float32 "
                        "training kernel (default: on)")
    g.add_argument("--compile", action=flag, default=False,
                   help="torch.compile the model (measured no faster on a 2-core CPU; meant for GPUs)")
    g.add_argument("--dist-bn", default="", choices=("", "broadcast", "reduce"),
                   help="BatchNorm statistics evaluated and saved after each epoch: rank 0's ('' or "
                        "broadcast, what DDP keeps) or the mean over processes (reduce)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--checkpoint-hist", type=int, default=3, help="best epoch checkpoints to keep")
    g.add_argument("--log-tensorboard", action=flag, default=False)
    g.add_argument("--check-args", action="store_true",
                   help="check the arguments, the YAML config and the model name, then exit (0: fine; 2: one "
                        "error line); train_timm.sh runs this before it makes the run folder or starts torchrun")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Command line over YAML over built-in defaults; unknown YAML keys are an error."""
    parser = build_parser()
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        if not os.path.isfile(known.config):
            parser.error(f"config file {known.config} not found")
        with open(known.config) as f:
            overrides = yaml.safe_load(f) or {}
        unknown = sorted(set(overrides) - set(vars(parser.parse_args([]))))
        if unknown:
            parser.error(f"{known.config}: unknown keys {unknown}")
        parser.set_defaults(**overrides)
    args = parser.parse_args(argv)
    for name in ("data_dir", "model", "output"):
        if not getattr(args, name):
            parser.error(f"--{name.replace('_', '-')} is required")
    # from the command line or the config: out-of-range counts fail here, not at step 1
    cls_common.check_least(parser, args, epochs=1, batch_size=1, validation_batch_size=1, grad_accumulation_steps=1,
                           log_interval=1, img_size=1, workers=0, checkpoint_hist=1)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"--mixup / --cutmix mix pairs of images, so --batch-size must be even, got {args.batch_size}")
    if args.drop_path is None:
        args.drop_path = IMAGENET_DROP_PATH_RATE.get(args.model)
    return args


def scale_learning_rate(args) -> None:
    """lr = lr_base * global_batch / lr_base_size (sqrt of the ratio for 'sqrt'), unless --lr is set."""
    global_batch = args.batch_size * args.world_size * args.grad_accumulation_steps
    if args.lr is None:
        ratio = global_batch / args.lr_base_size
        if args.lr_base_scale == "sqrt":
            ratio = math.sqrt(ratio)
        args.lr = args.lr_base * ratio
        if args.auto_scale_warmup_min_lr:
            args.warmup_lr *= ratio
            args.min_lr *= ratio
    _logger.info(f"global batch {global_batch}: lr {args.lr:.3g}, warmup_lr {args.warmup_lr:.3g}, min_lr {args.min_lr:.3g}")


def build_model(args, num_classes):
    """The model as training builds it (``--drop-path`` given or resolved by parse_args)."""
    return cls_common.create_classifier(args.model, num_classes, drop_rate=args.drop,
                                        **({"drop_path_rate": args.drop_path} if args.drop_path is not None else {}))


def place_model(model: torch.nn.Module, device: torch.device, channels_last: bool,
                cpu_kernels: bool) -> torch.nn.Module:
    """The model on ``device``; on the CPU with ``cpu_kernels``, with the fused layers of ``models.fuse_for_cpu``
    (a no-op for models other than PaCa's), whose state_dict keys are the plain model's."""
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return fuse_for_cpu(model) if device.type == "cpu" and cpu_kernels else model


def configure_cuda_backends(device) -> None:
    """On CUDA: cuDNN autotuning, and TF32 matmuls and convolutions as the official training has."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def build_train_loader(args, dataset, data_config, device):
    use_prefetcher = device.type == "cuda"  # normalise on the GPU
    loader = create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=0.0,  # random erasing comes after Mixup/CutMix: augment_batch
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=use_prefetcher,
        # workers start afresh each epoch, seeded by seed_loader_for_epoch: persistent ones would
        # carry their random state over, which a resumed run could not reproduce
        persistent_workers=False,
    )
    return end_workers_with_parent(loader)


def seed_loader_for_epoch(loader, seed, epoch, rank) -> None:
    """Make the epoch's sample order and its workers' seeds depend on (seed, epoch, rank) only.

    The DataLoader draws the workers' base seed (each worker then seeds python, numpy and torch
    with base + worker id) and RandomSampler its order from ``generator``; DistributedSampler
    shuffles with its ``seed + epoch``, the same on every rank.
    """
    loader = getattr(loader, "loader", loader)  # timm's PrefetchLoader wraps the DataLoader on CUDA
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
    loader.generator = generator
    if isinstance(loader.sampler, torch.utils.data.RandomSampler):
        loader.sampler.generator = generator
    elif isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.seed = seed
        loader.sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------
# random state: saved with every checkpoint as plain tensors and numbers (weights_only loads it)
def rng_state() -> dict:
    """This process's python, numpy, torch and (when used) CUDA random state."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a resumed process may see fewer GPUs than the one that saved (another CUDA_VISIBLE_DEVICES)
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def all_rng_states(args) -> list:
    """Every process's random state, in rank order (a collective call under torch.distributed)."""
    states = [None] * args.world_size
    if args.distributed:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


class CheckpointContents:
    """What the checkpoints hold besides timm's epoch/optimizer/scaler entries: the weights, the
    EMA weights, ``class_names``, ``data_config`` (the evaluation input, for predict.py) and
    ``rng_states``.  timm's CheckpointSaver asks its ``task`` for these through
    ``get_checkpoint_state``."""

    def __init__(self, model, model_ema, class_names, data_config):
        self.model, self.model_ema, self.class_names = model, model_ema, class_names
        self.data_config = dict(data_config)
        self.rng_states = None  # set before each save
        self.steps_done = 0  # steps of its epoch a recovery checkpoint has trained (0: a whole epoch)
        self.epoch_partial = None  # and their mean loss, images per process and seconds (summary.csv)

    def get_checkpoint_state(self, ema=False, unwrap_fn=unwrap_model) -> dict:
        if ema:
            return {} if self.model_ema is None else {"state_dict_ema": get_state_dict(self.model_ema, unwrap_fn)}
        steps = {"epoch_steps_done": self.steps_done, "epoch_partial": self.epoch_partial} if self.steps_done else {}
        return {"state_dict": get_state_dict(self.model, unwrap_fn), "class_names": self.class_names,
                "data_config": self.data_config, "rng_states": self.rng_states, **steps}


class StopOnSigterm:
    """SIGTERM (what SLURM sends before preempting a job, and what torchrun passes on when it is
    stopped) asks training to stop after the current step.  Several ranks must stop after the same
    step (a rank that stopped alone would leave the others waiting in their next all-reduce), so
    they agree on it: each step starts an all-reduce (max) of the flag and reads the previous
    step's, and the ranks stop one step after the first of them saw the signal.  The flag stays on
    the CPU, in a gloo group of its own, so that on GPUs the check never waits for the device."""

    def __init__(self, distributed: bool):
        self.signalled = False
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.in_flight = None  # the previous step's all-reduce: (work, flag)
        signal.signal(signal.SIGTERM, self._note_signal)

    def _note_signal(self, signum, frame):
        self.signalled = True

    def agreed(self) -> bool:
        if self.group is None:
            return self.signalled
        flag = torch.tensor([int(self.signalled)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        previous, self.in_flight = self.in_flight, (work, flag)
        if previous is None:
            return False
        work, flag = previous
        work.wait()
        return bool(flag.item())


def build_mixup(args, num_classes):
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )


def build_random_erasing(args, device):
    if args.reprob <= 0 or args.no_aug:
        return None
    return RandomErasing(probability=args.reprob, mode=args.remode, max_count=args.recount, device=device)


def augment_batch(images, target, mixup, random_erasing):
    """Mixup/CutMix, then random erasing of the mixed batch: the official order (timm's
    FastCollateMixup mixes in the loader's collate, its prefetcher erases afterwards), so erased
    patches are noise, not blended into the partner image."""
    if mixup is not None:
        images, target = mixup(images, target)
    if random_erasing is not None:
        images = random_erasing(images)
    return images, target


def build_train_loss(args, mixup):
    if mixup is not None:  # mixup produces smoothed soft targets itself
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


class Progress:
    """Log lines with loss, lr, throughput and time left, for the epoch and the whole run."""

    def __init__(self, world_size, steps_per_epoch, num_epochs):
        self.world_size, self.steps_per_epoch, self.num_epochs = world_size, steps_per_epoch, num_epochs
        self.step_time = AverageMeter()

    def log(self, epoch, step, loss, mean_loss, lr, batch):
        left_in_epoch = self.steps_per_epoch - step - 1
        left_total = left_in_epoch + (self.num_epochs - epoch - 1) * self.steps_per_epoch
        rate = batch * self.world_size / max(self.step_time.avg, 1e-9)
        _logger.info(
            f"epoch {epoch + 1}/{self.num_epochs} [{step + 1:>4}/{self.steps_per_epoch}] "
            f"loss {loss:.4f} ({mean_loss:.4f}) lr {lr:.3e} {rate:.1f} img/s "
            f"eta epoch {timedelta(seconds=round(left_in_epoch * self.step_time.avg))} "
            f"run {timedelta(seconds=round(left_total * self.step_time.avg))}"
        )


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, run, skip_steps=0, partial=None):
    """One pass over the training data; returns {'loss': mean over all processes}, or when SIGTERM
    stopped it 'stopped_after' (steps) and 'partial' (the mean loss so far and the images per
    process it covers).  ``skip_steps``: the steps a recovery checkpoint has trained already; their
    batches are drawn again (the same random augmentations) and left out, then ``run['after_skip']``
    puts the random state back where it was saved; ``partial``: that checkpoint's loss so far, so
    that the epoch's mean loss covers all its steps."""
    mixup, scaler, scheduler, model_ema = run["mixup"], run["scaler"], run["scheduler"], run["model_ema"]
    if mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup.mixup_enabled = False
    model.train()
    accum = args.grad_accumulation_steps
    updates_per_epoch = math.ceil(len(loader) / accum)
    num_updates = epoch * updates_per_epoch + skip_steps // accum
    losses = AverageMeter()
    if partial:
        losses.update(partial["loss"], partial["images"])
    batches = iter(loader)
    if skip_steps:
        for _ in range(skip_steps):
            next(batches)
        run["after_skip"]()
        scheduler.step_update(num_updates=num_updates)
    end = time.time()
    for step, (images, target) in enumerate(batches, start=skip_steps):
        need_update = (step + 1) % accum == 0 or step + 1 == len(loader)
        images, target = images.to(run["device"], non_blocking=True), target.to(run["device"], non_blocking=True)
        images, target = augment_batch(images, target, mixup, run["random_erasing"])
        if run["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        # between updates, skip DDP's gradient all-reduce
        sync = nullcontext() if need_update or not args.distributed else model.no_sync()
        with sync:
            with run["autocast"]():
                loss = loss_fn(model(images), target)
            if scaler is not None:
                scaler(loss / accum, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                       parameters=model.parameters(), need_update=need_update)
            else:
                (loss / accum).backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if need_update:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if model_ema is not None:
                model_ema.update(model, step=num_updates)
            scheduler.step_update(num_updates=num_updates)
        losses.update(loss.detach(), images.size(0))  # a tensor: no device sync per step
        run["progress"].step_time.update(time.time() - end)
        end = time.time()
        if ((step + 1) % args.log_interval == 0 or step + 1 == len(loader)) and args.rank == 0:
            run["progress"].log(epoch, step, float(losses.val), float(losses.avg),
                                optimizer.param_groups[0]["lr"], images.size(0))
        # every update: torchrun leaves its workers 30 s after the signal
        if need_update and step + 1 < len(loader) and run["stop"].agreed():
            return {"stopped_after": step + 1, "partial": {"loss": mean_over_processes(losses.avg, args),
                                                           "images": losses.count}}
    return {"loss": mean_over_processes(losses.avg, args)}


def mean_over_processes(value, args) -> float:
    value = torch.as_tensor(value).detach().float()
    if args.distributed:
        value = reduce_tensor(value, args.world_size)
    return value.item()


def resume(args, model, optimizer, scaler, model_ema, class_names):
    """Restore weights, optimizer, AMP scaler and EMA from ``args.resume``.

    Returns the next epoch, the steps of it a recovery checkpoint has trained, the saved random
    states (applied just before training goes on) and the checkpoint saver's history (None when the
    file has none); the file is read once.
    """
    checkpoint = read_checkpoint(args.resume)
    missing = [key for key in ("epoch", "state_dict", "optimizer") if key not in checkpoint]
    if missing:
        raise UsageError(f"--resume {args.resume} is not a training checkpoint of train_timm.py (no {missing})")
    saved_names = checkpoint.get("class_names")
    if saved_names is not None and list(saved_names) != class_names:
        raise UsageError(f"{args.resume} was trained on the classes {list(saved_names)[:5]}..., "
                         f"but {args.data_dir} now has {class_names[:5]}...: the dataset changed")
    try:
        fit_state_dict(checkpoint["state_dict"], model, source=args.resume)
    except CheckpointError as err:
        raise UsageError(f"--resume {args.resume} does not hold the weights of --model {args.model} with these "
                         f"options: resume with the --model and model options of the run that saved it ({err})") from err
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and scaler.state_dict_key in checkpoint:
        scaler.load_state_dict(checkpoint[scaler.state_dict_key])
    if model_ema is not None:
        if "state_dict_ema" not in checkpoint:
            raise UsageError(f"--model-ema was given but {args.resume} holds no EMA weights")
        model_ema.module.load_state_dict(checkpoint["state_dict_ema"])
    steps_done = checkpoint.get("epoch_steps_done", 0)
    next_epoch = checkpoint["epoch"] + (0 if steps_done else 1)
    _logger.info(f"resumed from {args.resume}: continuing at epoch {next_epoch + 1}"
                 + (f" after its step {steps_done}" if steps_done else ""))
    return (next_epoch, steps_done, checkpoint.get("epoch_partial") if steps_done else None,
            checkpoint.get("rng_states"), checkpoint.get("saver"))


def restore_rng_states(args, states) -> None:
    """Put this process's random generators back where they were when the checkpoint was saved."""
    if states is not None and len(states) == args.world_size:
        set_rng_state(states[args.rank])
        return
    why = "none are saved in it" if states is None else f"it was written by {len(states)} process(es)"
    _logger.warning(f"the random state of {args.resume} is not restored ({why}): the resumed run "
                    f"will not repeat the uninterrupted one exactly")


def drop_summary_rows_from(path, epoch):
    """Forget summary rows of epochs that will be trained again (interrupted before their checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [row for row in reader if int(row["epoch"]) < epoch]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def out_of_space(path) -> bool:
    """Whether more data written to ``path`` is refused for lack of space.  torch's C++ writer
    reports a full disk only as 'iostream error' or 'unexpected pos', without the errno."""
    try:
        with open(path, "ab") as f:
            f.write(bytes(1 << 16))  # more than a block's slack
            f.flush()
    except OSError as err:
        return err.errno == errno.ENOSPC
    return False


@contextmanager
def full_disk_reported(saver, epoch):
    """Around an epoch's writes (summary row, checkpoint): a full disk stops training with a
    UsageError naming the folder; the checkpoint being written is removed, the saved ones stay."""
    partial = os.path.join(saver.checkpoint_dir, "tmp" + saver.extension)  # timm's saver writes here, then renames
    try:
        yield
    except (OSError, RuntimeError) as err:
        disk_full = getattr(err, "errno", None) == errno.ENOSPC or (os.path.lexists(partial) and out_of_space(partial))
        if os.path.lexists(partial):
            os.remove(partial)
        if not disk_full:
            raise
        last = os.path.join(saver.checkpoint_dir, "last" + saver.extension)
        kept = f"the last intact checkpoint {last} is kept" if os.path.isfile(last) else "none was saved before"
        raise UsageError(f"No space left on device in {saver.checkpoint_dir} while saving epoch {epoch + 1}; {kept}. "
                         f"Free space there (or train onto another disk: --output, or PACAVIT_WORK_DIRS for the "
                         f"launchers), then launch again") from None


def save_recovery_and_exit(args, saver, checkpoint_contents, epoch, steps_done, partial):
    """After SIGTERM: the state after ``steps_done`` steps of ``epoch`` in a recovery checkpoint
    (every rank's random state and the epoch's ``partial`` figures included), then the end of this
    process."""
    checkpoint_contents.rng_states = all_rng_states(args)
    checkpoint_contents.steps_done = steps_done
    checkpoint_contents.epoch_partial = partial
    if saver is None:  # not the primary process: it saves nothing
        raise SystemExit(128 + signal.SIGTERM)
    with full_disk_reported(saver, epoch):
        saver.save_recovery(epoch, batch_idx=steps_done)
    raise SystemExit(f"stopped by SIGTERM after step {steps_done} of epoch {epoch + 1}; "
                     f"saved {saver.curr_recovery_file} to resume from")


def evaluate_epoch(model, model_ema, loader, run):
    metrics = cls_common.evaluate(model, loader, run["device"], run["autocast"], run["channels_last"])
    if model_ema is not None:
        ema = cls_common.evaluate(model_ema, loader, run["device"], run["autocast"], run["channels_last"])
        metrics.update({f"ema_{k}": v for k, v in ema.items() if k != "images"})
    metrics.pop("images")
    return metrics


def main(argv=None):
    args = parse_args(argv)
    check_model_name(args.model)  # a typo is one line here, not a traceback after the run folder is made
    if args.check_args:
        return
    claim_run_folder(args.output)
    device = init_distributed_device(args)
    check_shared_run_folder(args.output)
    primary = args.rank == 0
    if args.auto_resume:
        args.resume = agreed_resume_point("classification", args.output, args.resume or None) or ""
    setup_default_logging(log_path=os.path.join(args.output, "train.log") if primary else "")
    if not primary:
        _logger.setLevel(logging.WARNING)
    random_seed(args.seed, args.rank)
    configure_cuda_backends(device)
    if device.type != "cuda" and (args.amp or args.channels_last):
        _logger.info("CPU run: mixed precision and channels_last are CUDA-only, training in fp32 NCHW")

    class_map = cls_common.training_class_map(args.data_dir, args.train_split, args.val_split)
    dataset_train = cls_common.TrainImageFolder(cls_common.require_split(args.data_dir, args.train_split),
                                                class_map=class_map)
    num_classes = len(class_map)
    class_names = sorted(class_map, key=class_map.get)
    model = build_model(args, num_classes)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    channels_last = args.channels_last and device.type == "cuda"
    model = place_model(model, device, channels_last, args.cpu_kernels)
    _logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                 f"{num_classes} classes, {len(dataset_train)} training images, {args.world_size} process(es) on {device.type}")

    scale_learning_rate(args)
    opt_kwargs = {k: v for k, v in (("eps", args.opt_eps), ("betas", args.opt_betas)) if v is not None}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **opt_kwargs)
    use_amp = args.amp and device.type == "cuda"
    scaler = NativeScaler(device=device.type) if use_amp and args.amp_dtype == "float16" else None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    start_epoch, skip_steps, partial, saved_rng_states, saver_history = 0, 0, None, None, None
    if args.resume:
        start_epoch, skip_steps, partial, saved_rng_states, saver_history = resume(
            args, model, optimizer, scaler, model_ema, class_names)
    if args.compile:
        cls_common.compile_in_place(model)
    if args.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader_train = build_train_loader(args, dataset_train, data_config, device)
    checkpoint_contents = CheckpointContents(model, model_ema, class_names, data_config)
    loader_eval = cls_common.build_eval_loader(args.data_dir, args.val_split, data_config,
                                               args.validation_batch_size or args.batch_size, args.workers,
                                               pin_memory=args.pin_mem)
    cls_common.check_evaluation_images(loader_eval)
    mixup = build_mixup(args, num_classes)
    loss_fn = build_train_loss(args, mixup)
    updates_per_epoch = math.ceil(len(loader_train) / args.grad_accumulation_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch,
    )
    # timm schedules are functions of the epoch / update count: stepping there restores them
    if args.sched_on_updates:
        scheduler.step_update(start_epoch * updates_per_epoch)
    else:
        scheduler.step(start_epoch)

    saver = summary_path = writer = None
    if primary:
        with open(os.path.join(args.output, "args.yaml"), "w") as f:
            yaml.safe_dump(vars(args), f, sort_keys=False)
        # args=None keeps the checkpoint plain tensors/numbers, loadable with weights_only=True
        saver = CheckpointSaver(model, optimizer, amp_scaler=scaler, task=checkpoint_contents,
                                checkpoint_dir=args.output, recovery_dir=args.output,
                                max_history=args.checkpoint_hist)
        summary_path = os.path.join(args.output, SUMMARY_CSV)
        if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(args.output):
            if saver_history is not None:
                saver.load_state_dict(saver_history)  # the ranked checkpoints kept so far
            drop_summary_rows_from(summary_path, start_epoch)
        writer = _tensorboard_writer(args)

    run = dict(device=device, autocast=cls_common.autocast_for(device, use_amp, args.amp_dtype),
               channels_last=channels_last, mixup=mixup, random_erasing=build_random_erasing(args, device),
               scaler=scaler, scheduler=scheduler,
               model_ema=model_ema, progress=Progress(args.world_size, len(loader_train), num_epochs),
               stop=StopOnSigterm(args.distributed),
               after_skip=lambda: restore_rng_states(args, saved_rng_states))
    if args.resume and not skip_steps:
        restore_rng_states(args, saved_rng_states)
    for epoch in range(start_epoch, num_epochs):
        seed_loader_for_epoch(loader_train, args.seed, epoch, args.rank)
        resumed = partial if epoch == start_epoch else None  # the steps a recovery checkpoint trained
        epoch_start = time.time() - (resumed["seconds"] if resumed else 0.0)
        train_metrics = train_one_epoch(epoch, model, loader_train, optimizer, loss_fn, args, run,
                                        skip_steps if epoch == start_epoch else 0, resumed)
        if "stopped_after" in train_metrics:
            stopped = {**train_metrics["partial"], "seconds": round(time.time() - epoch_start, 2)}
            save_recovery_and_exit(args, saver, checkpoint_contents, epoch, train_metrics["stopped_after"], stopped)
        if args.distributed:
            # once per epoch, the BatchNorm statistics that DDP would broadcast from rank 0 in every
            # forward: evaluation bypasses DDP, whose per-forward collective hangs when the ranks'
            # evaluation shards differ by a batch
            distribute_bn(model, args.world_size, args.dist_bn == "reduce")
        eval_metrics = evaluate_epoch(unwrap_model(model), model_ema, loader_eval, run)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(epoch + 1, eval_metrics["top1"])
        checkpoint_contents.rng_states = all_rng_states(args)
        if primary:
            train_metrics["epoch_time"] = round(time.time() - epoch_start, 2)
            with full_disk_reported(saver, epoch):
                update_summary(epoch, train_metrics, eval_metrics, summary_path, lr=lr)
                best, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics["top1"])
            for recovery in glob.glob(os.path.join(args.output, "recovery-*" + saver.extension)):
                os.remove(recovery)  # older than this epoch's checkpoint now
            _logger.info(f"epoch {epoch + 1}/{num_epochs}: train loss {train_metrics['loss']:.4f}, "
                         f"val top1 {eval_metrics['top1']:.2f} top5 {eval_metrics['top5']:.2f} "
                         f"(best {best:.2f} at epoch {best_epoch + 1}) in {train_metrics['epoch_time']:.1f}s")
            if writer is not None:
                for key, value in {**{f"train/{k}": v for k, v in train_metrics.items()},
                                   **{f"val/{k}": v for k, v in eval_metrics.items()}, "lr": lr}.items():
                    writer.add_scalar(key, value, epoch + 1)
    if primary:
        if os.path.isfile(summary_path):
            _logger.info(f"training curves: {plot_training_curves(summary_path)}")
        if writer is not None:
            writer.close()
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if primary:
        mark_finished(args.output)


def _tensorboard_writer(args):
    if not args.log_tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UsageError("--log-tensorboard needs the tensorboard package: pip install tensorboard") from err
    return SummaryWriter(os.path.join(args.output, "tensorboard"))


if __name__ == "__main__":
    run_main(main)
