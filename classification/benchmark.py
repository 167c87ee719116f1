#!/usr/bin/env python
"""Parameters, GFLOPs, inference / training throughput and peak memory of classifiers.

Each measured model appends one row to work_dirs/classification/all_benchmark_results.csv.
``--compare`` adds timm peers to the same run; ``--img-sizes 224,448,896`` also times the
backbone (batch 1) at several resolutions and draws latency against pixels on log-log axes,
where linear complexity shows as a line parallel to the slope-1 guide.  With the reference model
(``--reference``, default convnext_tiny) in the run, efficiency.png next to the CSV compares how
many FLOPs per second each model achieves relative to it.

    python benchmark.py --model pacavit_tiny_p2cconv_100_0 --img-size 224 --compare --img-sizes 224,448,896

Synthetic inputs; GFLOPs count one multiply-add as one FLOP at batch 1 (fvcore, attention included).
Defaults: on CUDA batch 128, 100 timed iterations after 10 warm-up ones (as the seed's
benchmark.sh); on CPU batch 8, 5 iterations after 2, so a CPU run ends in a minute or two.
"""
import argparse
import csv
import logging
import os
import platform
import re
import resource
import sys
import time
from datetime import datetime

import torch
import timm

import cls_common
from models import fuse_for_cpu_inference
from models.flops import count_flops, count_params
from models.paca_vit import create_downstream
from plots import plot_efficiency, plot_latency_vs_pixels

_logger = logging.getLogger("pacavit")
PEERS = ("pvt_v2_b1", "pvt_v2_b2", "swin_tiny_patch4_window7_224", "convnext_tiny")
FIELDS = (
    "date", "model", "img_size", "num_classes", "device", "batch_size", "amp", "channels_last", "compile",
    "fused_kernels", "params_M", "gflops", "infer_img_per_s", "infer_ms_per_batch", "infer_peak_mem_MB",
    "train_img_per_s", "train_ms_per_batch", "train_peak_mem_MB", "infer_gflops_per_s", "train_gflops_per_s",
    "infer_efficiency", "train_efficiency", "torch", "timm",
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument("--model", required=True)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default=cls_common.default_device())
    p.add_argument("-b", "--batch-size", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 100 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 10 / 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved rounds over all models; each model's fastest round is reported")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--amp", action=flag, default=False, help="mixed-precision autocast (CUDA only)")
    p.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--channels-last", action=flag, default=False)
    p.add_argument("--compile", action=flag, default=False, help="torch.compile the model first")
    p.add_argument("--compile-modes", choices=("eager", "compiled", "both"), default=None,
                   help="'both' measures every model eager and compiled in the same run (default: per --compile)")
    p.add_argument("--fused-kernels", choices=("on", "off", "both"), default="on",
                   help="models.fuse_for_cpu_inference, PaCa's oneDNN fused CPU inference layers "
                        "(models/layers/fused.py); 'both' also measures each PaCa model without it, in the same run")
    p.add_argument("--train", action=flag, default=True, help="also time fwd+bwd+AdamW steps")
    p.add_argument("--compare", action="store_true", help=f"also run the timm peers {', '.join(PEERS)}")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers for --compare")
    p.add_argument("--reference", default="convnext_tiny",
                   help="efficiency = (img/s x GFLOPs) relative to this model when it is measured in the same run")
    p.add_argument("--img-sizes", default="", help="e.g. 224,448,896: backbone latency vs resolution (batch 1)")
    p.add_argument("--curve-models", default="",
                   help="models for --img-sizes (default: all measured models), e.g. pacavit_tiny_p2cconv_100_0,convnext_tiny")
    p.add_argument("--results-csv", default="", help="default: work_dirs/classification/all_benchmark_results.csv")
    p.add_argument("--plot", default="", help="latency PNG (default: next to the CSV)")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (128 if on_cuda else 8)
    args.iters = args.iters or (100 if on_cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    work_dirs = os.environ.get("PACAVIT_WORK_DIRS") or os.path.join(REPO_ROOT, "work_dirs")
    args.results_csv = args.results_csv or os.path.join(work_dirs, "classification", "all_benchmark_results.csv")
    args.plot = args.plot or os.path.join(os.path.dirname(args.results_csv), "latency_vs_resolution.png")
    args.efficiency_plot = os.path.join(os.path.dirname(os.path.abspath(args.plot)), "efficiency.png")
    modes = args.compile_modes or ("compiled" if args.compile else "eager")
    args.compile_settings = {"eager": (False,), "compiled": (True,), "both": (False, True)}[modes]
    args.fused_settings = {"on": (True,), "off": (False,), "both": (True, False)}[args.fused_kernels]
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.access("/proc/self/clear_refs", os.W_OK):
        # Linux: "5" resets the process's resident-size high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device) -> float:
    """CUDA: peak allocated since the last reset.  CPU: peak resident size of the process since the
    last reset on Linux (it includes the other models' weights), since it started elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if platform.system() != "Darwin" else kib / 2**20


def time_per_iteration(step, device, warmup, iters) -> float:
    """Mean seconds per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def prepare(model, args, device, compiled=False):
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    return (torch.compile(model) if compiled else model), memory_format


class ClassifierBench:
    """One model's inference and training steps on synthetic data, timed on demand."""

    def __init__(self, name, args, device, compiled=False, fused=True):
        model = cls_common.create_classifier(name, args.num_classes)
        self.fused = fused
        self.row = {"model": name, "compile": compiled, "fused_kernels": fused,
                    "params_M": round(count_params(model) / 1e6, 3),
                    "gflops": round(count_flops(model, (1, 3, args.img_size, args.img_size)) / 1e9, 3)}
        self.label = name + (" (compiled)" if compiled else "") + ("" if fused else " (plain ops)")
        self.model, memory_format = prepare(fuse_for_cpu_inference(model) if fused else model, args, device, compiled)
        self.args, self.device = args, device
        self.autocast = cls_common.autocast_for(device, args.amp, args.amp_dtype)
        shape = (args.batch_size, 3, args.img_size, args.img_size)
        self.images = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
        self.target = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        # bfloat16 has float32's range: only float16 needs loss scaling
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=args.amp and args.amp_dtype == "float16" and device.type == "cuda")

    def infer(self):
        with torch.inference_mode(), self.autocast():
            self.model(self.images)

    def train_step(self):
        with self.autocast():
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.target)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def measure(self, phase: str):
        """Time one phase ('infer' or 'train'); keep the fastest round and the peak memory."""
        self.model.train(phase == "train")
        reset_peak_memory(self.device)
        step = self.infer if phase == "infer" else self.train_step
        seconds = time_per_iteration(step, self.device, self.args.warmup, self.args.iters)
        if seconds * 1e3 < self.row.get(f"{phase}_ms_per_batch", float("inf")):
            self.row.update({f"{phase}_img_per_s": round(self.args.batch_size / seconds, 2),
                             f"{phase}_ms_per_batch": round(seconds * 1e3, 2)})
        self.row[f"{phase}_peak_mem_MB"] = max(self.row.get(f"{phase}_peak_mem_MB", 0), round(peak_memory_mb(self.device), 1))


def benchmark_classifiers(names, args, device) -> list:
    """Measure all models in ``args.rounds`` interleaved rounds and keep each one's fastest round,
    so that drift of the machine (other load, allocator state) does not favour one model."""
    benches = [ClassifierBench(name, args, device, compiled, fused)
               for name in names for compiled in args.compile_settings
               # the fused kernels are PaCa's: other models are measured once
               for fused in (args.fused_settings if name.startswith("pacavit_") else args.fused_settings[:1])]
    measured = FIELDS[FIELDS.index("params_M"):FIELDS.index("train_peak_mem_MB") + 1]
    for round_index in range(args.rounds):
        for bench in benches:
            # training never uses the fused kernels: with both settings it is timed once, fused
            train = args.train and (bench.fused or len(args.fused_settings) == 1)
            for phase in ("infer", "train") if train else ("infer",):
                bench.measure(phase)
            _logger.info(f"round {round_index + 1}/{args.rounds} {bench.label}: "
                         + ", ".join(f"{k} {bench.row[k]}" for k in measured if k in bench.row))
    return [bench.row for bench in benches]


def create_backbone(name, img_size):
    """Feature extractor without classifier: PaCa's dense backbone, or timm's features_only."""
    if name.startswith("pacavit_"):
        return create_downstream(name)
    cls_common.check_model_name(name)
    fixed = timm.get_pretrained_cfg(name) and timm.get_pretrained_cfg(name).fixed_input_size
    return timm.create_model(name, features_only=True, **({"img_size": img_size} if fixed else {}))


def latency_curve(name, sizes, args, device) -> list:
    """(img_size, ms per image) at batch 1 for each size."""
    points = []
    for size in sizes:
        model = create_backbone(name, size).eval()
        model, memory_format = prepare(fuse_for_cpu_inference(model) if args.fused_settings[0] else model, args, device)
        image = torch.randn(1, 3, size, size, device=device).contiguous(memory_format=memory_format)
        autocast = cls_common.autocast_for(device, args.amp, args.amp_dtype)

        def infer():
            with torch.inference_mode(), autocast():
                model(image)

        ms = time_per_iteration(infer, device, args.warmup, args.iters) * 1e3
        _logger.info(f"{name} backbone at {size}x{size}: {ms:.1f} ms/image")
        points.append((size, round(ms, 2)))
    return points


def append_rows(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            # written by another version of this script: keep it under another name, start anew
            kept = f"{os.path.splitext(path)[0]}.columns-until-{datetime.now():%Y%m%d-%H%M%S}.csv"
            os.replace(path, kept)
            _logger.info(f"note: {path} had other columns; it is kept as {kept}")
            new = True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        _logger.info("note: --amp is CUDA-only; measuring fp32 on CPU")
    names = [args.model] + ([p for p in args.peers.split(",") if p] if args.compare else [])
    for name in names:
        cls_common.check_model_name(name)
    common = {"date": datetime.now().isoformat(timespec="seconds"), "img_size": args.img_size,
              "num_classes": args.num_classes, "device": _device_name(device), "batch_size": args.batch_size,
              "amp": args.amp_dtype if args.amp and device.type == "cuda" else False,
              "channels_last": args.channels_last,
              "torch": torch.__version__, "timm": timm.__version__}
    _logger.info(f"benchmarking {', '.join(names)} at {args.img_size}x{args.img_size}, batch {args.batch_size}, "
                 f"{args.rounds} round(s) of {args.iters} iterations on {common['device']}")
    rows = [{**common, **row} for row in benchmark_classifiers(names, args, device)]
    add_efficiency(rows, args.reference)
    append_rows(args.results_csv, rows)
    _print_table(rows)
    _logger.info(f"appended {len(rows)} row(s) to {args.results_csv}")
    if any("infer_efficiency" in row for row in rows):
        title = f"img/s x GFLOPs relative to {args.reference}, {common['device']}, batch {args.batch_size}"
        if common["amp"]:
            title += f", {common['amp']} autocast"
        _logger.info(f"efficiency plot: {plot_efficiency(rows, args.efficiency_plot, title)}")

    if args.img_sizes:
        sizes = [int(s) for s in args.img_sizes.split(",")]
        curve_models = [m for m in args.curve_models.split(",") if m] or names
        curves = {name: latency_curve(name, sizes, args, device) for name in curve_models}
        for name, points in curves.items():
            (small, first), (large, last) = points[0], points[-1]
            _logger.info(f"{name}: latency x{last / first:.2f} from {small}^2 to {large}^2 "
                         f"(pixels x{(large / small) ** 2:.0f})")
        title = f"backbone latency vs resolution, batch 1, {common['device']}"
        _logger.info(f"latency plot: {plot_latency_vs_pixels(curves, args.plot, title)}")


def add_efficiency(rows, reference):
    """Work rate (img/s x GFLOPs per image) of each model, and its ratio to the reference model's:
    how well a model turns its FLOPs into throughput on this machine."""
    for row in rows:
        for phase in ("infer", "train"):
            if f"{phase}_img_per_s" in row:
                row[f"{phase}_gflops_per_s"] = round(row[f"{phase}_img_per_s"] * row["gflops"], 2)
    for row in rows:
        # a compiled model is compared with the compiled reference, an eager one with the eager one
        ref = next((r for r in rows if r["model"] == reference and r["compile"] == row["compile"]), None)
        for phase in ("infer", "train"):
            if ref is not None and f"{phase}_gflops_per_s" in row:
                row[f"{phase}_efficiency"] = round(row[f"{phase}_gflops_per_s"] / ref[f"{phase}_gflops_per_s"], 3)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def _print_table(rows):
    columns = ("model", "compile", "fused_kernels", "params_M", "gflops", "infer_img_per_s", "train_img_per_s",
               "infer_efficiency", "train_efficiency", "train_peak_mem_MB")
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    for line in [columns] + [[str(r.get(c, "")) for c in columns] for r in rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)), file=sys.stdout)


if __name__ == "__main__":
    cls_common.run_main(main)
