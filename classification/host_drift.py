#!/usr/bin/env python
"""How steady this host's speed is: one model's inference in a loop, the same work every batch.

    python classification/host_drift.py --seconds 80

Prints, for each window of ``--window`` seconds, the median wall-clock and CPU time per batch, their
ratio (about the thread count while the process has its cores to itself) and the page faults per
batch, then how far the window medians lie apart.  The loop keeps freed memory as benchmark.py's
measuring processes do; ``--malloc default`` leaves glibc's defaults, under which blocks above
32 MB are mapped afresh (and page-faulted again) every batch.  A shared VM whose wall and CPU time
move together is running slower, not being paused: benchmark figures taken minutes apart then
differ although the code did not change, which is why benchmark.py compares each model with the
reference measured in the same rounds.
"""
import argparse
import resource
import statistics
import sys
import time

import timm
import torch

from classification.benchmark import host_info, host_line, keep_freed_memory
from runtime.cli import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=80.0, help="how long to run")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reported window")
    p.add_argument("--malloc", choices=("kept", "default"), default="kept",
                   help="kept: glibc keeps freed memory (as benchmark.py measures); default: glibc's defaults")
    return p.parse_args(argv)


def windows(samples, window: float):
    """(start, [(wall, cpu, faults), ...]) per ``window`` seconds of the (time, wall, cpu, faults) samples."""
    grouped = {}
    for at, *batch in samples:
        grouped.setdefault(int((at - samples[0][0]) // window), []).append(tuple(batch))
    return [(index * window, batches) for index, batches in sorted(grouped.items())]


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None):
    args = parse_args(argv)
    if args.malloc == "kept":
        keep_freed_memory()
    print(f"host: {host_line(host_info(torch.device('cpu')))}; malloc: {args.malloc}")
    model = timm.create_model(args.model).eval()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    samples = []
    with torch.inference_mode():
        for _ in range(3):  # the first calls build what later ones reuse
            model(images)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            wall, cpu, faults = time.perf_counter(), time.process_time(), minor_faults()
            model(images)
            samples.append((time.monotonic(), time.perf_counter() - wall, time.process_time() - cpu,
                            minor_faults() - faults))
    print(f"{args.model}, batch {args.batch_size} at {args.img_size}: median seconds per batch in each "
          f"{args.window:g}-second window")
    medians = []
    for start, batches in windows(samples, args.window):
        wall, cpu, faults = (statistics.median(batch[i] for batch in batches) for i in range(3))
        medians.append(wall)
        print(f"  from {start:6.1f} s: {len(batches):3d} batches, wall {wall:.3f}, cpu {cpu:.3f} "
              f"(cpu / wall {cpu / wall:.2f}), {faults:.0f} page faults")
    print(f"window medians from {min(medians):.3f} to {max(medians):.3f} s: {max(medians) / min(medians) - 1:.0%} apart")


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
