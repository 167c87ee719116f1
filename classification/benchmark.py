#!/usr/bin/env python
"""Parameters, GFLOPs, inference / training throughput and peak memory of classifiers.

Each measured model appends one row to work_dirs/classification/all_benchmark_results.csv.
``--compare`` adds timm peers to the same run; ``--img-sizes 224,448,896`` also times the
backbone (batch 1) at several resolutions, in rounds interleaved over the models' processes as
the table's, and draws latency against pixels on log-log axes (median and range over the rounds),
where linear complexity shows as a line parallel to the slope-1 guide; the points go to
latency_vs_resolution.csv next to the plot.  With the reference model
(``--reference``, default convnext_tiny) in the run, efficiency.png next to the CSV compares how
many FLOPs per second each model achieves relative to it.

    python benchmark.py --model pacavit_tiny_p2cconv_100_0 --img-size 224 --compare --img-sizes 224,448,896

How it measures: every model (and every variant of it: compiled, plain ops, precision) lives in a
process of its own, which builds only that model, so that what one model allocated or ran cannot
speed up or slow down another.  The rounds go round those processes in turn (round 1 of every
model, then round 2, ...), one group of compared rows (same precision and compile setting) at a
time, each round warming up with the same untimed iterations first (a process's first round for a
round's length more); each iteration is timed (``--min-round-seconds``: for at least so long in a
round, so that fast models get as many seconds as slow ones), and a round's figure is
the median of its iterations, so that one interrupted iteration does not move it.  Every process
keeps the memory a batch frees for the next one (``keep_freed_memory``), so that no batch pays
page faults whose cost follows the host's load.  A row reports the median over the rounds, their
spread ((max - min) / median) and the process's peak memory, which holds that one model only; its
efficiency is the median over the rounds of its ratio to the reference in the same round.  The
host (CPU model and instruction sets, threads, OpenMP waiting, malloc setting, library versions)
is printed and written with every row.

``--official PATH`` (or $PACAVIT_OFFICIAL) also measures the official implementation's models of
the run's PaCa models from a checkout of https://github.com/iVMCL/PaCaViT (its models/paca_vit.py,
which needs mmcv, mmengine and einops); nothing of it is part of this repository.

Synthetic inputs; GFLOPs count one multiply-add as one FLOP at batch 1 (fvcore, attention included).
Defaults: on CUDA batch 128, 100 timed iterations after 10 warm-up ones (as the seed's
benchmark.sh); on CPU batch 8, 5 iterations after 2, so a CPU run ends in a minute or two.
"""
import argparse
import csv
import ctypes
import ctypes.util
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime
from typing import Optional, Tuple

import torch
import timm

from classification import cls_common
from models import fuse_for_cpu
from models.flops import count_flops, count_params
from models.layers.fused import cpu_fusion_support
from models.paca_vit import create_downstream
from runtime.cli import run_main
from classification.plots import plot_efficiency, plot_latency_vs_pixels

_logger = logging.getLogger("pacavit")
PEERS = ("pvt_v2_b1", "pvt_v2_b2", "swin_tiny_patch4_window7_224", "convnext_tiny")
# fp32; autocast-bf16 / autocast-fp16: torch.autocast; bf16: the model and its input in bfloat16
PRECISIONS = ("fp32", "autocast-bf16", "autocast-fp16", "bf16")
FIELDS = (
    "date", "model", "official", "img_size", "num_classes", "device", "batch_size", "precision", "channels_last",
    "compile", "fused_kernels", "plain_ops", "params_M", "gflops", "rounds", "clock",
    "infer_img_per_s", "infer_spread_pct", "infer_ms_per_batch", "infer_peak_mem_MB",
    "train_img_per_s", "train_spread_pct", "train_ms_per_batch", "train_peak_mem_MB",
    "infer_gflops_per_s", "train_gflops_per_s", "infer_efficiency", "train_efficiency",
    "host", "isa", "threads", "omp_wait_policy", "malloc", "python", "torch", "timm",
)
# how a batch is timed: wall time, or the CPU time of the measuring process (all threads)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "@@benchmark-result "  # a worker's answer on its stdout; anything else passes through


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument("--model", required=True)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default=cls_common.default_device())
    p.add_argument("-b", "--batch-size", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 100 on CUDA, 5 on CPU)")
    p.add_argument("--train-iters", type=int, default=None, help="timed training steps (default: --iters)")
    p.add_argument("--min-round-seconds", type=float, default=0.0,
                   help="a round times more iterations than --iters / --train-iters until they add up to this")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 10 / 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds interleaved over the models' processes; rows report the median and spread")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="cpu: time each batch by the process's CPU time (all its threads) instead of the wall "
                        "clock; steadier on a CPU shared with other work, which then does not count (CPU only)")
    p.add_argument("--precisions", default="fp32",
                   help=f"comma-separated, each measured for every model: {', '.join(PRECISIONS)}; "
                        "bfloat16 ones on a CPU only where it has bfloat16 kernels")
    p.add_argument("--low-precision-models", default="",
                   help="comma-separated: only these models get the precisions other than fp32 (default: all)")
    p.add_argument("--amp", action=flag, default=False, help="same as --precisions autocast-<--amp-dtype> (bf16 / fp16)")
    p.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--channels-last", action=flag, default=False)
    p.add_argument("--compile", action=flag, default=False, help="torch.compile the model first")
    p.add_argument("--compile-modes", choices=("eager", "compiled", "both"), default=None,
                   help="'both' measures every model eager and compiled in the same run (default: per --compile)")
    p.add_argument("--fused-kernels", choices=("on", "off", "both"), default="on",
                   help="models.fuse_for_cpu, PaCa's fused CPU layers (models/layers/fused.py), as validate.py "
                        "and train_timm.py use them on the CPU; 'both' also measures each PaCa model's inference "
                        "without it, in the same run")
    p.add_argument("--train", action=flag, default=True,
                   help="also time fwd+bwd+AdamW steps (fp32, and autocast on CUDA)")
    p.add_argument("--compare", action="store_true", help=f"also run the timm peers {', '.join(PEERS)}")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers for --compare")
    p.add_argument("--official", default=os.environ.get("PACAVIT_OFFICIAL", ""),
                   help="checkout of github.com/iVMCL/PaCaViT: also measure its models of the run's PaCa models "
                        "(default: $PACAVIT_OFFICIAL)")
    p.add_argument("--reference", default="convnext_tiny",
                   help="efficiency = (img/s x GFLOPs) relative to this model when it is measured in the same run")
    p.add_argument("--img-sizes", default="", help="e.g. 224,448,896: backbone latency vs resolution (batch 1)")
    p.add_argument("--curve-models", default="",
                   help="models for --img-sizes (default: all measured models), e.g. pacavit_tiny_p2cconv_100_0,convnext_tiny")
    p.add_argument("--results-csv", default="", help="default: work_dirs/classification/all_benchmark_results.csv")
    p.add_argument("--plot", default="", help="latency PNG (default: next to the CSV)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one model's process
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (128 if on_cuda else 8)
    args.iters = args.iters or (100 if on_cuda else 5)
    args.train_iters = args.train_iters or args.iters
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    work_dirs = os.environ.get("PACAVIT_WORK_DIRS") or os.path.join(REPO_ROOT, "work_dirs")
    args.results_csv = args.results_csv or os.path.join(work_dirs, "classification", "all_benchmark_results.csv")
    args.plot = args.plot or os.path.join(os.path.dirname(args.results_csv), "latency_vs_resolution.png")
    args.efficiency_plot = os.path.join(os.path.dirname(os.path.abspath(args.plot)), "efficiency.png")
    modes = args.compile_modes or ("compiled" if args.compile else "eager")
    args.compile_settings = {"eager": (False,), "compiled": (True,), "both": (False, True)}[modes]
    args.fused_settings = {"on": (True,), "off": (False,), "both": (True, False)}[args.fused_kernels]
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if args.amp:
        args.precisions = [f"autocast-{'bf16' if args.amp_dtype == 'bfloat16' else 'fp16'}"]
    if args.clock == "cpu" and on_cuda:
        raise cls_common.UsageError("--clock cpu times the CPU's work; on CUDA use the wall clock (--clock wall)")
    unknown = [s for s in args.precisions if s not in PRECISIONS]
    if unknown:
        raise cls_common.UsageError(f"--precisions {','.join(unknown)}: choose from {', '.join(PRECISIONS)}")
    return args


# -- the host ----------------------------------------------------------------------------------------
def _cpuinfo() -> str:
    """The first processor's block of /proc/cpuinfo ('' where there is none)."""
    if not os.path.exists("/proc/cpuinfo"):
        return ""
    with open("/proc/cpuinfo") as f:
        return f.read().split("\n\n")[0]


def cpu_flags(cpuinfo: Optional[str] = None) -> set:
    """The instruction-set flags of this CPU (or of the /proc/cpuinfo text ``cpuinfo``)."""
    match = re.search(r"^flags\s*:(.*)$", _cpuinfo() if cpuinfo is None else cpuinfo, re.M)
    return set(match.group(1).split()) if match else set()


def amd_core(family: int, model: int, flags: set) -> str:
    """AMD's core generation from the CPU family and model, where they tell it: a cloud VM's model
    name is often just "AMD EPYC".  In family 23, models below 0x30 are Zen and Zen+ ("Zen 1"), the
    rest Zen 2; family 25 is Zen 3 and Zen 4, told apart by AVX-512 (Zen 4 has it, Zen 3 does not);
    '' for families not listed."""
    if family == 23:
        return "Zen 1" if model < 0x30 else "Zen 2"
    if family == 25:
        return "Zen 4" if "avx512f" in flags else "Zen 3"
    if family == 26:
        return "Zen 5"
    return ""


def cpu_name(cpuinfo: str) -> str:
    """The CPU's model name with its family and model numbers, and for AMD the core generation:
    e.g. 'AMD EPYC (Zen 4; family 25 model 17)'."""
    fields = {key: value.strip() for key, value in
              re.findall(r"^(model name|vendor_id|cpu family|model)\s*:(.*)$", cpuinfo, re.M)}
    name = fields.get("model name") or platform.processor() or platform.machine()
    if not (fields.get("cpu family", "").isdigit() and fields.get("model", "").isdigit()):
        return name
    family, model = int(fields["cpu family"]), int(fields["model"])
    numbers = f"family {family} model {model}"
    core = amd_core(family, model, cpu_flags(cpuinfo)) if fields.get("vendor_id") == "AuthenticAMD" else ""
    return f"{name} ({core}; {numbers})" if core else f"{name} ({numbers})"


def host_info(device: torch.device) -> dict:
    """What a throughput figure depends on besides the model: written with every row."""
    cpuinfo = _cpuinfo()
    flags = cpu_flags(cpuinfo)
    model_name = cpu_name(cpuinfo)
    isa = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "avx512_bf16"),
                                   ("amx_bf16", "AMX")) if flag in flags]
    # what the libraries use, which the environment can limit below what the CPU has
    isa.append(f"ATen {torch.backends.cpu.get_cpu_capability()}")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        isa.append(f"oneDNN max {os.environ['ONEDNN_MAX_CPU_ISA']}")
    # passive waiting (the launchers' choice for jobs that share the cores) slowed every model by
    # about a fifth here, PaCa's many short parallel regions most
    info = {"host": model_name, "isa": " ".join(isa), "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
            "malloc": "freed memory kept" if _glibc() else "system default",
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    if device.type == "cuda":
        info["host"] += f" + {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, " \
                        f"cuDNN {torch.backends.cudnn.version()})"
    return info


def cpu_bfloat16_supported() -> bool:
    """Whether this CPU runs bfloat16 kernels (AVX-512 BF16 / AMX, or oneDNN's AVX-512 emulation)."""
    return torch.bfloat16 in cpu_fusion_support()


# -- measuring, inside a model's process -------------------------------------------------------------
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
    """CUDA: peak allocated since the last reset.  CPU: peak resident size of this process (which
    holds one model) since the last reset on Linux, since it started elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if platform.system() != "Darwin" else kib / 2**20


def _glibc():
    """The C library when it is glibc (whose malloc tuning the measuring processes use), else None."""
    libc = ctypes.util.find_library("c") if platform.system() == "Linux" else None
    library = ctypes.CDLL(libc) if libc else None
    return library if library is not None and hasattr(library, "mallopt") else None


def keep_freed_memory() -> bool:
    """Make glibc keep the memory a batch frees for the next batch (no mmap'ed chunks, no trimming
    at free).  By default glibc maps every block above 32 MB (the largest mmap threshold) afresh and
    unmaps it on free, so each batch page-faults and zeroes such blocks again: convnext_tiny (batch
    8, fp32) took 93,990 page faults per batch here (``host_drift.py --malloc default``), a fifth of
    its time, and what a fault costs varies with the VM host's load.  A figure should measure the
    model, not glibc's mmap policy (jemalloc and tcmalloc keep such memory too).  Returns whether
    glibc took the settings."""
    libc = _glibc()
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc) and bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_free_memory():
    """Hand freed heap pages back to the OS (glibc) after a round: a process waiting for its next
    round holds little memory, and every round starts from the same state (its warm-up maps again
    what the timed batches then reuse)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def time_iterations(step, device, warmup, iters, clock="wall", min_seconds=0.0) -> list:
    """Seconds of each call of ``step`` after ``warmup`` untimed ones, by ``CLOCKS[clock]``: ``iters``
    calls, more while they add up to less than ``min_seconds``."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    while len(seconds) < iters or sum(seconds) < min_seconds:
        start = now()
        step()
        synchronize(device)
        seconds.append(now() - start)
    return seconds


def time_round(step, key, measured: set, args, device, iters: int) -> float:
    """One round of ``step``: the median seconds of its iterations, which one interrupted iteration
    does not move.  The first round of each ``key`` (a phase, an image size) in a process warms up
    for a round's length longer: the first calls build what later ones reuse (oneDNN primitives,
    kept bf16 weights, the allocator's pools)."""
    warmup = args.warmup + (0 if key in measured else iters)
    measured.add(key)
    seconds = time_iterations(step, device, warmup, iters, args.clock, args.min_round_seconds)
    return statistics.median(seconds)


def prepare(model, args, device, compiled=False):
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    return (cls_common.compile_in_place(model) if compiled else model), memory_format


def load_official(checkout: str, name: str):
    """The constructor ``name`` of the official implementation in ``checkout`` (its
    models/paca_vit.py), imported as package ``paca_official`` beside this repository's ``models``."""
    package_dir = os.path.join(os.path.abspath(checkout), "models")
    if "paca_official" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "paca_official", os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir])
        package = importlib.util.module_from_spec(spec)
        sys.modules["paca_official"] = package
        with warnings.catch_warnings():
            # it registers the same names with timm as this repository; we call its functions directly
            warnings.filterwarnings("ignore", message="Overwriting .* in registry")
            spec.loader.exec_module(package)
    return getattr(importlib.import_module("paca_official.paca_vit"), name)


class ClassifierBench:
    """One model's inference and training steps on synthetic data, timed on demand."""

    def __init__(self, spec: dict, args, device):
        name, precision = spec["model"], spec["precision"]
        if spec["official"]:
            model = load_official(args.official, name)(num_classes=args.num_classes)
        else:
            model = cls_common.create_classifier(name, args.num_classes)
        self.row = {"params_M": round(count_params(model) / 1e6, 3),
                    "gflops": round(count_flops(model, (1, 3, args.img_size, args.img_size)) / 1e9, 3)}
        if spec["fused"]:
            model = fuse_for_cpu(model)
        self.model, memory_format = prepare(model, args, device, spec["compile"])
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model.to(self.dtype)
        self.args, self.device = args, device
        if precision.startswith("autocast-"):
            dtype = torch.bfloat16 if precision == "autocast-bf16" else torch.float16
            self.autocast = lambda: torch.autocast(device.type, dtype=dtype)
        else:
            self.autocast = cls_common.autocast_for(device, False)
        shape = (args.batch_size, 3, args.img_size, args.img_size)
        self.images = torch.randn(shape, device=device, dtype=self.dtype).contiguous(memory_format=memory_format)
        self.target = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        # bfloat16 has float32's range: only float16 needs loss scaling
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "autocast-fp16" and device.type == "cuda")
        self.measured = set()  # the phases measured in an earlier round

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

    def measure(self, phase: str) -> dict:
        """One round of one phase ('infer' or 'train'): seconds per batch (the median of the round's
        iterations, which one interrupted iteration does not move) and peak memory."""
        self.model.train(phase == "train")
        # a fresh optimizer each round: its state is made in the warm-up, as in every other round
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4) if phase == "train" else None
        reset_peak_memory(self.device)
        step = self.infer if phase == "infer" else self.train_step
        iters = self.args.iters if phase == "infer" else self.args.train_iters
        seconds = time_round(step, phase, self.measured, self.args, self.device, iters)
        peak = peak_memory_mb(self.device)
        self.optimizer = None
        release_free_memory()  # idle until its next round, the process holds little memory
        return {"seconds": seconds, "peak_mem_MB": round(peak, 1)}


def _answer(message: dict):
    print(RESULT_PREFIX + json.dumps(message), flush=True)


def worker_main(args, spec: dict):
    """A model's process: build it, say so, then measure one phase per line read from stdin."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train_timm.py trains
    keep_freed_memory()
    if spec.get("curve"):
        curve = CurveBench(spec["model"], spec["curve"], args, device)
        _answer({})
        for line in sys.stdin:  # "curve SIZE"
            _answer(curve.measure(int(line.split()[1])))
        return
    bench = ClassifierBench(spec, args, device)
    _answer(bench.row)
    for line in sys.stdin:
        _answer(bench.measure(line.strip()))


class Worker:
    """The parent's handle on one model's process (``script``: the measuring script it runs)."""

    def __init__(self, spec: dict, argv: list, script: str = __file__):
        self.spec = spec
        # the libraries' deprecation notes would repeat once per process: the parent's own show once
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
        command = [sys.executable, os.path.abspath(script), *argv, "--worker", json.dumps(spec)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, line: str = "") -> dict:
        if line:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        for out in self.process.stdout:
            if out.startswith(RESULT_PREFIX):
                return json.loads(out[len(RESULT_PREFIX):])
            sys.stdout.write(out)
        code = self.process.wait()
        raise cls_common.UsageError(f"measuring {label(self.spec)} failed (exit code {code}); its error is above")

    def close(self):
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait()


def label(spec: dict) -> str:
    precision = spec.get("precision", "fp32")
    return (("official " if spec.get("official") else "") + spec["model"]
            + (" (compiled)" if spec.get("compile") else "") + (" (plain ops)" if spec.get("plain_ops") else "")
            + ("" if precision == "fp32" else f" [{precision}]"))


def official_models(checkout: str, names: list) -> list:
    """Those of ``names`` that the official checkout defines (read, not imported, here)."""
    source = os.path.join(checkout, "models", "paca_vit.py")
    if not os.path.isfile(source):
        raise cls_common.UsageError(f"--official {checkout}: no models/paca_vit.py there; give a checkout of "
                                    "https://github.com/iVMCL/PaCaViT")
    with open(source) as f:
        defined = set(re.findall(r"^def (pacavit_\w+)\(", f.read(), re.M))
    missing = [n for n in names if n.startswith("pacavit_") and n not in defined]
    if missing:
        _logger.info(f"note: the official checkout has no {', '.join(missing)}: no official row for it")
    return [n for n in names if n in defined]


def run_specs(names, args, device) -> list:
    """One spec per measured row: model x compile x fused setting x precision (official ones too)."""
    bf16_ok = device.type != "cpu" or cpu_bfloat16_supported()
    precisions = [p for p in args.precisions if bf16_ok or p == "fp32"]
    if not precisions:
        raise cls_common.UsageError(f"this CPU has no bfloat16 kernels (lscpu: avx512_bf16, amx_bf16) for "
                                    f"{', '.join(args.precisions)}; measure --precisions fp32")
    if precisions != args.precisions:
        _logger.info(f"note: this CPU has no bfloat16 kernels: skipping {', '.join(sorted(set(args.precisions) - set(precisions)))}")
    official = []
    if args.official:
        official = official_models(args.official, names)
    else:
        _logger.info("note: no official rows (give --official PATH or $PACAVIT_OFFICIAL: a checkout of "
                     "https://github.com/iVMCL/PaCaViT)")
    low_precision = [m for m in args.low_precision_models.split(",") if m] or names
    specs = []
    for precision in precisions:
        for name in names + [f"official:{n}" for n in official]:
            is_official = name.startswith("official:")
            name = name.split(":", 1)[-1]
            if precision != "fp32" and name not in low_precision:
                continue
            # the fused kernels are this repository's PaCa models' on the CPU: others are measured once
            ours_on_cpu = name.startswith("pacavit_") and not is_official and device.type == "cpu"
            for compiled in args.compile_settings:
                for fused in (args.fused_settings if ours_on_cpu else (False,)):
                    specs.append({"model": name, "official": is_official, "compile": compiled, "precision": precision,
                                  "fused": fused, "plain_ops": ours_on_cpu and not fused})
    return specs


def trains(spec, args, device) -> bool:
    """Training is timed in fp32 (and under autocast on CUDA), as train_timm.py trains: on the CPU
    with the fused layers (whose depthwise convs run the float32 training kernel where the CPU has
    AVX-512), and a plain-ops twin without them.  The official models are there for the inference
    comparison: their training is not timed."""
    precision_ok = spec["precision"] == "fp32" or (device.type == "cuda" and spec["precision"] != "bf16")
    return args.train and precision_ok and not spec["official"]


def comparison_groups(specs: list) -> list:
    """The specs grouped by (precision, compile setting): the rows that efficiency compares.

    A group's processes are measured in the same rounds, and only they are alive meanwhile: a
    round then comes round to each process sooner, and fewer idle processes hold memory."""
    groups = {}
    for spec in specs:
        groups.setdefault((spec["precision"], spec["compile"]), []).append(spec)
    return list(groups.values())


def measure_group(specs: list, args, device, argv, times: dict):
    """Start a process per spec, then ``args.rounds`` rounds over them; the seconds go to ``times``."""
    workers = []
    try:
        for spec in specs:
            workers.append(Worker(spec, argv))
            spec["row"] = workers[-1].ask()  # built: params and GFLOPs
        for round_index in range(args.rounds):
            for spec, worker in zip(specs, workers):
                for phase in ("infer", "train") if trains(spec, args, device) else ("infer",):
                    result = worker.ask(phase)
                    times[id(spec)][phase].append(result["seconds"])
                    spec["row"][f"{phase}_peak_mem_MB"] = max(spec["row"].get(f"{phase}_peak_mem_MB", 0),
                                                             result["peak_mem_MB"])
                    _logger.info(f"round {round_index + 1}/{args.rounds} {label(spec)} {phase}: "
                                 f"{args.batch_size / result['seconds']:.2f} img/s, peak {result['peak_mem_MB']} MB")
    finally:
        for worker in workers:
            worker.close()


def benchmark_classifiers(names, args, device, argv) -> Tuple[list, list]:
    """Measure every spec in its own process, ``args.rounds`` rounds interleaved over the processes
    of one comparison group (see ``comparison_groups``), one group after the other.  Returns the
    rows and, for each, its seconds per batch round by round ({phase: [seconds]})."""
    specs = run_specs(names, args, device)
    times = {id(spec): {"infer": [], "train": []} for spec in specs}
    for group in comparison_groups(specs):
        measure_group(group, args, device, argv, times)
    rows = []
    for spec in specs:
        row = {"model": spec["model"], "official": spec["official"], "compile": spec["compile"],
               "plain_ops": spec["plain_ops"], "precision": spec["precision"], "rounds": args.rounds, **spec["row"]}
        # the kernels run where the transform was applied (only ours, on the CPU) and the dtype allows
        dtype = torch.float32 if spec["precision"] == "fp32" else torch.bfloat16
        row["fused_kernels"] = spec["fused"] and dtype in cpu_fusion_support()
        for phase, seconds in times[id(spec)].items():
            if seconds:
                median = statistics.median(seconds)
                row.update({f"{phase}_img_per_s": round(args.batch_size / median, 2),
                            f"{phase}_ms_per_batch": round(median * 1e3, 2),
                            f"{phase}_spread_pct": round((max(seconds) - min(seconds)) / median * 100, 1)})
        rows.append(row)
    return rows, [times[id(spec)] for spec in specs]


def create_backbone(name, img_size):
    """Feature extractor without classifier: PaCa's dense backbone, or timm's features_only."""
    if name.startswith("pacavit_"):
        return create_downstream(name)
    cls_common.check_model_name(name)
    fixed = timm.get_pretrained_cfg(name) and timm.get_pretrained_cfg(name).fixed_input_size
    return timm.create_model(name, features_only=True, **({"img_size": img_size} if fixed else {}))


class CurveBench:
    """One model's backbone at batch 1 and fp32 at each of ``sizes``, timed on demand (a process
    of its own, as ``ClassifierBench``)."""

    def __init__(self, name: str, sizes: list, args, device):
        self.args, self.device = args, device
        fused = args.fused_settings[0] and name.startswith("pacavit_")
        self.models, self.images = {}, {}
        for size in sizes:
            model = create_backbone(name, size).eval()
            self.models[size], memory_format = prepare(fuse_for_cpu(model) if fused else model, args, device)
            self.images[size] = torch.randn(1, 3, size, size, device=device).contiguous(memory_format=memory_format)
        self.measured = set()

    def measure(self, size: int) -> dict:
        """One round at one size: ms per image (``time_round``)."""
        model, image = self.models[size], self.images[size]

        def infer():
            with torch.inference_mode():
                model(image)

        seconds = time_round(infer, size, self.measured, self.args, self.device, self.args.iters)
        release_free_memory()
        return {"ms": seconds * 1e3}


def measure_curves(names: list, sizes: list, args, argv) -> dict:
    """Backbone latency against resolution: a process per model, ``args.rounds`` rounds
    interleaved over them as the table's rows are (round 1 of every model at every size, then round
    2, ...).  Returns {model: {size: [ms per image in each round]}}."""
    workers, rounds = [], {name: {size: [] for size in sizes} for name in names}
    try:
        for name in names:
            workers.append(Worker({"model": name, "curve": sizes}, argv))
            workers[-1].ask()  # built
        for round_index in range(args.rounds):
            for size in sizes:
                for name, worker in zip(names, workers):
                    ms = worker.ask(f"curve {size}")["ms"]
                    rounds[name][size].append(ms)
                    _logger.info(f"round {round_index + 1}/{args.rounds} {name} backbone at {size}x{size}: "
                                 f"{ms:.1f} ms/image")
    finally:
        for worker in workers:
            worker.close()
    return rounds


def curve_points(per_size: dict) -> list:
    """[(size, median ms, min ms, max ms)] over the rounds, by size."""
    return [(size, round(statistics.median(ms), 2), round(min(ms), 2), round(max(ms), 2))
            for size, ms in sorted(per_size.items())]


def growth(per_size: dict) -> tuple:
    """(median, min, max) over the rounds of the latency ratio between the largest and the smallest
    size, each round's ratio taken within that round (so that the host's drift between rounds
    does not count)."""
    small, large = min(per_size), max(per_size)
    ratios = [b / a for a, b in zip(per_size[small], per_size[large])]
    return statistics.median(ratios), min(ratios), max(ratios)


def write_curves(path: str, rounds: dict, common: dict):
    """The latency curve's points, one CSV row per model and size (rewritten by every run)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("model", "img_size", "rounds", "median_ms", "min_ms", "max_ms", "date", "host", "isa",
                         "threads", "torch"))
        for name, per_size in rounds.items():
            for size, median, low, high in curve_points(per_size):
                writer.writerow((name, size, len(per_size[size]), median, low, high, common["date"], common["host"],
                                 common["isa"], common["threads"], common["torch"]))


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


def start_run(argv, parse) -> Tuple[list, argparse.Namespace]:
    """A measuring script's command line (``parse``: its parser), with logging on and the threads
    set: in the parent and in each model's process alike."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return argv, args


def main(argv=None):
    argv, args = start_run(argv, parse_args)
    if args.worker:
        return worker_main(args, json.loads(args.worker))
    device = torch.device(args.device)
    names = [args.model] + ([p for p in args.peers.split(",") if p] if args.compare else [])
    for name in names:
        cls_common.check_model_name(name)
    host = host_info(device)
    common = {"date": datetime.now().isoformat(timespec="seconds"), "img_size": args.img_size,
              "num_classes": args.num_classes, "device": _device_name(device), "batch_size": args.batch_size,
              "channels_last": args.channels_last, "clock": args.clock, **host}
    _logger.info(f"host: {host['host']}; ISA: {host['isa']}; {host['threads']} threads; "
                 f"OpenMP waiting {host['omp_wait_policy']}; malloc {host['malloc']}; "
                 f"python {host['python']}, torch {host['torch']}, timm {host['timm']}")
    _logger.info(f"benchmarking {', '.join(names)} at {args.img_size}x{args.img_size}, batch {args.batch_size}, "
                 f"{args.rounds} round(s) of {args.iters} iterations on {common['device']}, one process per model, "
                 f"timed by the {'process CPU time' if args.clock == 'cpu' else 'wall clock'}")
    rows, round_seconds = benchmark_classifiers(names, args, device, _worker_argv(argv, args))
    rows = [{**common, **row} for row in rows]
    add_efficiency(rows, args.reference, round_seconds)
    append_rows(args.results_csv, rows)
    _print_table(rows, host)
    _logger.info(f"appended {len(rows)} row(s) to {args.results_csv}")
    if any("infer_efficiency" in row for row in rows):
        title = f"img/s x GFLOPs relative to {args.reference}, batch {args.batch_size}\n{host_line(host)}"
        _logger.info(f"efficiency plot: {plot_efficiency(rows, args.efficiency_plot, title)}")

    if args.img_sizes:
        sizes = [int(s) for s in args.img_sizes.split(",")]
        curve_models = [m for m in args.curve_models.split(",") if m] or names
        rounds = measure_curves(curve_models, sizes, args, _worker_argv(argv, args))
        for name, per_size in rounds.items():
            median, low, high = growth(per_size)
            points = curve_points(per_size)
            (small, first), (large, last) = points[0][:2], points[-1][:2]
            _logger.info(f"{name}: latency x{median:.2f} (rounds x{low:.2f}-x{high:.2f}) from {small}^2 to {large}^2 "
                         f"(pixels x{(large / small) ** 2:.0f}): {first} -> {last} ms, medians over "
                         f"{len(per_size[small])} round(s)")
        curves_csv = os.path.splitext(args.plot)[0] + ".csv"
        write_curves(curves_csv, rounds, common)
        _logger.info(f"latency points: {curves_csv}")
        title = f"backbone latency vs resolution, batch 1, fp32, median of {args.rounds} round(s)\n{host_line(host)}"
        curves = {name: curve_points(per_size) for name, per_size in rounds.items()}
        _logger.info(f"latency plot: {plot_latency_vs_pixels(curves, args.plot, title)}")


def _worker_argv(argv, args) -> list:
    """The run's options for a model's process, with the device and threads settled here."""
    return [*argv, "--device", args.device, "--threads", str(torch.get_num_threads())]


def add_efficiency(rows, reference, round_seconds: Optional[list] = None):
    """Work rate (img/s x GFLOPs per image) of each model, and its ratio to the reference model's
    (this repository's, same compile setting and precision): how well a model turns its FLOPs into
    throughput on this machine.

    With ``round_seconds`` (per row, {phase: seconds per batch in each round}, as measured in the
    same rounds), the ratio is taken round by round and the row gets the median of those: a model
    and the reference are then compared over the same stretch of time, so that the host speeding up
    or slowing down between rounds does not count as a difference between them."""
    for row in rows:
        for phase in ("infer", "train"):
            if f"{phase}_img_per_s" in row:
                row[f"{phase}_gflops_per_s"] = round(row[f"{phase}_img_per_s"] * row["gflops"], 2)
    for i, row in enumerate(rows):
        j = next((j for j, r in enumerate(rows) if r["model"] == reference and not r.get("official")
                  and r["compile"] == row["compile"] and r.get("precision") == row.get("precision")), None)
        if j is None:
            continue
        ref = rows[j]
        for phase in ("infer", "train"):
            if f"{phase}_gflops_per_s" not in row or f"{phase}_gflops_per_s" not in ref:
                continue
            own, theirs = (round_seconds[k][phase] if round_seconds else [] for k in (i, j))
            if own and len(own) == len(theirs):
                ratio = statistics.median(t / s for s, t in zip(own, theirs)) * row["gflops"] / ref["gflops"]
            else:
                ratio = row[f"{phase}_gflops_per_s"] / ref[f"{phase}_gflops_per_s"]
            row[f"{phase}_efficiency"] = round(ratio, 3)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def host_line(host) -> str:
    waiting = "" if host["omp_wait_policy"] == "default" else f" (OMP_WAIT_POLICY={host['omp_wait_policy']})"
    return f"{host['host']} ({host['isa']}), {host['threads']} threads{waiting}, torch {host['torch']}"


def _print_table(rows, host):
    columns = ("model", "official", "precision", "compile", "fused_kernels", "plain_ops", "gflops", "infer_img_per_s",
               "infer_spread_pct", "train_img_per_s", "train_spread_pct", "infer_efficiency", "train_efficiency",
               "infer_peak_mem_MB", "train_peak_mem_MB")
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(f"host: {host_line(host)}")
    for line in [columns] + [[str(r.get(c, "")) for c in columns] for r in rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)), file=sys.stdout)
    print(f"\nas a README table ({host_line(host)}, batch {rows[0]['batch_size']} at {rows[0]['img_size']}, "
          f"median of {rows[0]['rounds']} rounds, +- spread):\n")
    print("| model | precision | GFLOPs | inference img/s | training img/s | inference efficiency | "
          "training efficiency | peak MB (inference) |\n|:---|:---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = ("official " if r["official"] else "") + f"`{r['model']}`" + (" (plain ops)" if r["plain_ops"] else "") \
            + (" (compiled)" if r["compile"] else "")
        speeds = [f"{r[f'{phase}_img_per_s']} +-{r[f'{phase}_spread_pct']}%" if f"{phase}_img_per_s" in r else ""
                  for phase in ("infer", "train")]
        print(f"| {name} | {r['precision']} | {r['gflops']} | {speeds[0]} | {speeds[1]} | {r.get('infer_efficiency', '')} "
              f"| {r.get('train_efficiency', '')} | {r.get('infer_peak_mem_MB', '')} |")


if __name__ == "__main__":
    run_main(main)
