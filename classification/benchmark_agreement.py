#!/usr/bin/env python
"""How far two benchmark runs on the same host agree, row by row.

    python classification/benchmark_agreement.py [work_dirs/classification/all_benchmark_results.csv]

Takes the two latest runs in the CSV that ``benchmark.py`` (``speed_report.sh``) appends to, pairs
their rows (same model, implementation, precision, compile and plain-ops setting) and prints, for
every figure both runs have (img/s and efficiency, inference and training), the two values and
how far apart they are: larger / smaller - 1.  Prints a README-ready table and exits with 1 when a
pair differs by more than ``--tolerance`` (default 10%).
"""
import argparse
import csv
import os
import sys

from runtime.cli import UsageError, run_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEY = ("model", "official", "precision", "compile", "plain_ops", "device", "batch_size", "img_size")
HOST_KEY = ("host", "isa", "threads", "omp_wait_policy", "malloc", "torch", "timm")
FIGURES = ("infer_img_per_s", "train_img_per_s", "infer_efficiency", "train_efficiency")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work_dirs = os.environ.get("PACAVIT_WORK_DIRS") or os.path.join(REPO_ROOT, "work_dirs")
    p.add_argument("csv", nargs="?", default=os.path.join(work_dirs, "classification", "all_benchmark_results.csv"))
    p.add_argument("--tolerance", type=float, default=0.10, help="largest allowed larger / smaller - 1")
    return p.parse_args(argv)


def last_two_runs(path: str):
    """The rows of the two latest runs (a run's rows share its ``date``), oldest first."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; run classification/speed_report.sh twice first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    dates = list(dict.fromkeys(r["date"] for r in rows))
    if len(dates) < 2:
        raise UsageError(f"{path} holds {len(dates)} run(s); two are compared: run speed_report.sh again")
    runs = [[r for r in rows if r["date"] == date] for date in dates[-2:]]
    hosts = [{k: run[0][k] for k in HOST_KEY} for run in runs]
    if hosts[0] != hosts[1]:
        raise UsageError(f"the two latest runs come from different hosts or versions: {hosts[0]} vs {hosts[1]}")
    return runs


def differences(first: list, second: list) -> list:
    """(row, figure, value in run 1, value in run 2, larger / smaller - 1) for every shared figure."""
    later = {tuple(r[k] for k in ROW_KEY): r for r in second}
    out = []
    for row in first:
        twin = later.get(tuple(row[k] for k in ROW_KEY))
        for figure in FIGURES if twin else ():
            if row.get(figure) and twin.get(figure):
                a, b = float(row[figure]), float(twin[figure])
                out.append((row, figure, a, b, max(a, b) / min(a, b) - 1))
    return out


def label(row: dict) -> str:
    return (("official " if row["official"] == "True" else "") + f"`{row['model']}`"
            + (" (plain ops)" if row["plain_ops"] == "True" else "") + (" (compiled)" if row["compile"] == "True" else ""))


def main(argv=None):
    args = parse_args(argv)
    first, second = last_two_runs(args.csv)
    pairs = differences(first, second)
    print(f"runs of {first[0]['date']} and {second[0]['date']} on {first[0]['host']} ({first[0]['isa']}), "
          f"{first[0]['threads']} threads:\n")
    print("| model | precision | figure | run 1 | run 2 | apart |\n|:---|:---|:---|---:|---:|---:|")
    for row, figure, a, b, apart in pairs:
        print(f"| {label(row)} | {row['precision']} | {figure} | {a:g} | {b:g} | {apart:.1%} |")
    worst = max(pairs, key=lambda p: p[-1])
    outside = [p for p in pairs if p[-1] > args.tolerance]
    print(f"\n{len(pairs)} figures; the largest difference is {worst[-1]:.1%} ({label(worst[0])} {worst[0]['precision']} "
          f"{worst[1]}); {len(outside)} beyond {args.tolerance:.0%}")
    return 1 if outside else 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
