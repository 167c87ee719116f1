#!/usr/bin/env python
"""Where a model's CPU inference time goes, by kind of layer.

    python classification/layer_times.py --models pacavit_tiny_p2cconv_100_0,convnext_tiny --precision bf16

Forward hooks time every module of a forward on the wall clock; a module's own time is its time
less its children's, and the own times add up by kind: GEMM layers (linear layers and 1x1 convs),
other dense convs (the stem, the downsampling), depthwise convs, normalization layers, activations
run as layers of their own, and the operations a composite module runs itself, named by its class:
PaCa's attention (the softmaxes over the patches and over the clusters, the batched matmuls over
the clusters, the copies between layouts), a block (its residual adds), and so on.

As benchmark.py, each model lives in a process of its own that keeps the memory a batch frees, and
the rounds go round the processes in turn; a kind's figure is its median over the rounds.  Each
round also times the forward without hooks (``plain ms``), to show what the hooks add.  A PaCa
stage that runs its images in groups (``fuse_for_cpu``) passes the whole batch while a
hook watches it, as a bfloat16 stage does at batch 8 anyway; its float32 figures here are those of
whole-batch stages.  Prints a table, appends rows to ``--csv`` and draws stacked bars (``--plot``).
"""
import argparse
import csv
import json
import logging
import os
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Callable, Dict, List

import torch
from torch import nn

from classification import cls_common
from classification.benchmark import (
    REPO_ROOT,
    Worker,
    _answer,
    cpu_bfloat16_supported,
    host_info,
    host_line,
    keep_freed_memory,
    release_free_memory,
    start_run,
)
from classification.plots import plot_layer_times
from models import fuse_for_cpu
from models.flops import flops_by_module
from models.layers import fused
from runtime.cli import UsageError, run_main

_logger = logging.getLogger("pacavit")
GEMM, CONV, DEPTHWISE, NORM, ACTIVATION = (
    "linear / 1x1 conv", "conv (stem, downsampling)", "depthwise conv", "normalization", "activation layers")
LAYER_KINDS = (GEMM, CONV, DEPTHWISE, NORM, ACTIVATION)
OTHER = "other modules' own ops"
GEMM_LAYERS = (nn.Linear, fused.FusedLinear, fused.ChannelMajorLinear, fused.FusedPointwiseConv2d,
               fused.ChannelMajorConv2d)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# by class name: timm has activation modules of its own (timm.layers.GELU is no nn.GELU)
ACTIVATIONS = {"GELU", "GELUTanh", "QuickGELU", "ReLU", "ReLU6", "SiLU", "Swish", "Hardswish", "HardSwish", "Mish",
               "Sigmoid", "Tanh"}
FIELDS = ("date", "model", "precision", "fused_kernels", "batch_size", "img_size", "rounds", "kind", "ms_per_batch",
          "share_pct", "gflops_per_image", "gflops_per_s", "hooked_ms", "plain_ms",
          "host", "isa", "threads", "omp_wait_policy", "malloc", "torch", "timm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="pacavit_tiny_p2cconv_100_0,convnext_tiny", help="comma-separated timm names")
    p.add_argument("--precision", choices=("fp32", "bf16", "autocast-bf16"), default="fp32",
                   help="bf16: the model and its input in bfloat16; autocast-bf16: torch.autocast")
    p.add_argument("--plain-ops", action="store_true", help="PaCa without fuse_for_cpu")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="timed forwards per round, each way (with and without hooks)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--csv", default=os.path.join(REPO_ROOT, "work_dirs", "classification", "layer_times.csv"))
    p.add_argument("--plot", default="", help="stacked bars PNG (default: next to --csv)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one model's process
    args = p.parse_args(argv)
    args.plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "layer_times.png")
    return args


def layer_kind(module: nn.Module) -> str:
    """The kind under which ``module``'s own time counts."""
    if isinstance(module, GEMM_LAYERS):
        return GEMM
    if isinstance(module, (nn.Conv2d, fused.FusedConv2d)):
        if module.groups > 1:
            return DEPTHWISE
        return GEMM if module.weight.shape[-2:] == (1, 1) else CONV
    if isinstance(module, NORM_LAYERS):
        return NORM
    if type(module).__name__ in ACTIVATIONS:
        return ACTIVATION
    # the fused transform swaps classes (BatchChunkedStage, BFloat16CpuAttention): name the model's own
    own = next(cls for cls in type(module).__mro__ if cls.__module__ != fused.__name__)
    return f"{own.__name__}'s own ops"


class ModuleTimer:
    """Times every module of ``model`` through forward hooks while in use (``with timer:``)."""

    def __init__(self, model: nn.Module, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.children = {m: list(m.children()) for m in model.modules()}
        self.seconds: Dict[nn.Module, float] = {}
        self._started: Dict[nn.Module, List[float]] = {}
        self._handles = []

    def __enter__(self):
        for module in self.children:
            self._handles.append(module.register_forward_pre_hook(self._start))
            self._handles.append(module.register_forward_hook(self._stop))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start(self, module, args):
        self._started.setdefault(module, []).append(self.clock())  # a stack: a module may run inside itself

    def _stop(self, module, args, output):
        self.seconds[module] = self.seconds.get(module, 0.0) + self.clock() - self._started[module].pop()

    def reset(self):
        self.seconds = {}

    def _timed_children(self, module: nn.Module):
        """The nearest descendants that ran: through containers never called (a ModuleList)."""
        for child in self.children[module]:
            if child in self.seconds:
                yield child
            else:
                yield from self._timed_children(child)

    def by_kind(self) -> Dict[str, float]:
        """Seconds by kind (``layer_kind``) of the modules' own times since the last reset."""
        kinds: Dict[str, float] = {}
        for module, seconds in self.seconds.items():
            own = seconds - sum(self.seconds[child] for child in self._timed_children(module))
            kinds[layer_kind(module)] = kinds.get(layer_kind(module), 0.0) + own
        return kinds


def gflops_by_kind(model: nn.Module, img_size: int) -> Dict[str, float]:
    """GFLOPs (multiply-adds) of one image by kind, from each module's own count (fvcore's, with
    the attention's); the fused transform keeps every kind's layers, so the plain model's count holds."""
    per_module = flops_by_module(model, (1, 3, img_size, img_size))
    kinds: Dict[str, float] = {}
    for name, module in model.named_modules():
        own = per_module.get(name, 0) - sum(per_module.get(f"{name}.{child}" if name else child, 0)
                                            for child, _ in module.named_children())
        kinds[layer_kind(module)] = kinds.get(layer_kind(module), 0.0) + own / 1e9
    return kinds


class LayerTimesBench:
    """One model's forward, timed with and without hooks, in its own process."""

    def __init__(self, name: str, args):
        self.args = args
        model = cls_common.create_classifier(name, 1000).eval()
        self.gflops = gflops_by_kind(model, args.img_size)
        self.fused = name.startswith("pacavit_") and not args.plain_ops and bool(fused.cpu_fusion_support())
        if self.fused:
            model = fuse_for_cpu(model)
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        self.model = model.to(dtype)
        self.images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, dtype=dtype)
        self.autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16) if args.precision == "autocast-bf16" \
            else nullcontext
        self.timer = ModuleTimer(self.model)
        self.rounds = 0

    def forwards(self, count: int) -> List[float]:
        seconds = []
        with torch.inference_mode(), self.autocast():
            for _ in range(count):
                start = time.perf_counter()
                self.model(self.images)
                seconds.append(time.perf_counter() - start)
        return seconds

    def measure(self) -> dict:
        """One round: ms per batch by kind (the mean over the hooked forwards), and the median
        forward with hooks and without."""
        warmup = 1 if self.rounds else 3  # the first calls build what later ones reuse
        self.rounds += 1
        with self.timer:
            self.forwards(warmup)
            self.timer.reset()
            hooked = self.forwards(self.args.iters)
            kinds = {kind: 1e3 * s / self.args.iters for kind, s in self.timer.by_kind().items()}
        self.forwards(warmup)
        plain = self.forwards(self.args.iters)
        release_free_memory()
        return {"kinds": kinds, "hooked_ms": 1e3 * statistics.median(hooked),
                "plain_ms": 1e3 * statistics.median(plain), "fused": self.fused}


def worker_main(args, name: str):
    keep_freed_memory()
    bench = LayerTimesBench(name, args)
    _answer({"gflops": bench.gflops})
    for _ in sys.stdin:
        _answer(bench.measure())


def summarize(rounds: List[dict], gflops: Dict[str, float], min_share: float = 0.02) -> dict:
    """Median ms per batch over the rounds per kind, with the kind's GFLOPs per image; kinds of own
    ops below ``min_share`` of the total time go to OTHER."""
    kinds = {kind for r in rounds for kind in r["kinds"]}
    medians = {kind: statistics.median(r["kinds"].get(kind, 0.0) for r in rounds) for kind in kinds}
    total = sum(medians.values())
    summary: Dict[str, dict] = {}
    for kind, ms in medians.items():
        key = kind if kind in LAYER_KINDS or ms >= min_share * total else OTHER
        entry = summary.setdefault(key, {"ms": 0.0, "gflops": 0.0})
        entry["ms"] += ms
        entry["gflops"] += gflops.get(kind, 0.0)
    order = sorted(summary, key=lambda k: (k == OTHER, -summary[k]["ms"]))
    return {"kinds": {k: summary[k] for k in order}, "hooked_ms": statistics.median(r["hooked_ms"] for r in rounds),
            "plain_ms": statistics.median(r["plain_ms"] for r in rounds), "fused": rounds[0]["fused"]}


def measure(names: List[str], args, argv: List[str]) -> Dict[str, dict]:
    workers, gflops = {}, {}
    rounds = {name: [] for name in names}
    try:
        for name in names:
            workers[name] = Worker({"model": name}, argv, script=__file__)
            gflops[name] = workers[name].ask()["gflops"]  # built
        started = time.monotonic()
        for index in range(args.rounds):
            for name, worker in workers.items():
                rounds[name].append(worker.ask("round"))
            elapsed = time.monotonic() - started
            _logger.info(f"round {index + 1}/{args.rounds} done, {elapsed / (index + 1):.1f} s per round, "
                         f"about {elapsed / (index + 1) * (args.rounds - index - 1):.0f} s left")
    finally:
        for worker in workers.values():
            worker.close()
    return {name: summarize(r, gflops[name]) for name, r in rounds.items()}


def rate(entry: dict, batch_size: int) -> float:
    """GFLOP/s of a kind (0 where it counts no FLOPs)."""
    return entry["gflops"] * batch_size / (entry["ms"] / 1e3) if entry["ms"] > 0 else 0.0


def write_rows(path: str, results: Dict[str, dict], common: dict):
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for name, result in results.items():
            total = sum(entry["ms"] for entry in result["kinds"].values())
            for kind, entry in result["kinds"].items():
                writer.writerow({**common, "model": name, "fused_kernels": result["fused"], "kind": kind,
                                 "ms_per_batch": round(entry["ms"], 2),
                                 "share_pct": round(100 * entry["ms"] / total, 1),
                                 "gflops_per_image": round(entry["gflops"], 4),
                                 "gflops_per_s": round(rate(entry, common["batch_size"]), 1),
                                 "hooked_ms": round(result["hooked_ms"], 2), "plain_ms": round(result["plain_ms"], 2)})


def main(argv=None):
    argv, args = start_run(argv, parse_args)
    if args.worker:
        return worker_main(args, json.loads(args.worker)["model"])
    names = [n for n in args.models.split(",") if n]
    for name in names:
        cls_common.check_model_name(name)
    if args.precision != "fp32" and not cpu_bfloat16_supported():
        raise UsageError(f"--precision {args.precision}: this CPU has no bfloat16 kernels (lscpu: avx512_bf16, "
                         "amx_bf16); use --precision fp32")
    host = host_info(torch.device("cpu"))
    _logger.info(f"host: {host_line(host)}")
    _logger.info(f"timing the layers of {', '.join(names)} ({args.precision}, batch {args.batch_size} at "
                 f"{args.img_size}x{args.img_size}), {args.rounds} round(s) of {args.iters} forwards, "
                 "a process per model")
    results = measure(names, args, [*argv, "--threads", str(torch.get_num_threads())])
    for name, result in results.items():
        total = sum(entry["ms"] for entry in result["kinds"].values())
        fused_note = ", fused" if result["fused"] else ""
        print(f"\n{name} ({args.precision}{fused_note}): forward {result['hooked_ms']:.1f} ms "
              f"with hooks, {result['plain_ms']:.1f} ms without\n  {'kind':36s} {'ms/batch':>8s} {'share':>6s} "
              f"{'GFLOPs/image':>12s} {'GFLOP/s':>8s}")
        for kind, entry in result["kinds"].items():
            print(f"  {kind:36s} {entry['ms']:8.1f} {100 * entry['ms'] / total:5.1f}% {entry['gflops']:12.3f} "
                  f"{rate(entry, args.batch_size):8.0f}")
    common = {"date": datetime.now().isoformat(timespec="seconds"), "precision": args.precision,
              "batch_size": args.batch_size, "img_size": args.img_size, "rounds": args.rounds, **host}
    write_rows(args.csv, results, common)
    _logger.info(f"appended to {args.csv}")
    title = (f"inference time by kind of layer, {args.precision}, batch {args.batch_size} at {args.img_size}, "
             f"median of {args.rounds} rounds\n{host_line(host)}")
    per_image = {name: {k: e["ms"] / args.batch_size for k, e in r["kinds"].items()} for name, r in results.items()}
    _logger.info(f"plot: {plot_layer_times(per_image, args.plot, title)}")


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
