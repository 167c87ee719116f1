"""PNG figures for the classification scripts (matplotlib, no display needed)."""
import csv
import os
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _read_columns(path: str) -> Dict[str, List[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(row[key]) for row in rows if row.get(key) not in (None, "")] for key in rows[0]}


def plot_training_curves(summary_csv: str, png: str = "") -> str:
    """Loss, accuracy and learning rate per epoch from the trainer's summary.csv."""
    columns = _read_columns(summary_csv)
    epochs = [e + 1 for e in columns["epoch"]]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax_loss.plot(epochs, columns["train_loss"], "o-", label="train")
    ax_loss.plot(epochs, columns["eval_loss"], "s-", label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    for key, style in (("eval_top1", "o-"), ("eval_top5", "s--"), ("eval_ema_top1", "^-")):
        if key in columns:
            ax_acc.plot(epochs, columns[key], style, label=key.replace("eval_", "val "))
    ax_acc.set(title="validation accuracy (%)", xlabel="epoch")
    ax_lr.plot(epochs, columns["lr"], "o-")
    ax_lr.set(title="learning rate", xlabel="epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in (ax_loss, ax_acc):
        ax.legend()
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    png = png or os.path.join(os.path.dirname(summary_csv), "training_curves.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_latency_vs_pixels(curves: Dict[str, Sequence[tuple]], png: str, title: str) -> str:
    """Log-log latency against input pixels, one line per model, with a slope-1 (linear) guide.

    ``curves`` maps a model name to (img_size, latency_ms) or (img_size, median_ms, min_ms, max_ms)
    points; the latter draw the range over the rounds as error bars.  A model whose cost grows
    linearly with the number of pixels runs parallel to the dashed guide; quadratic attention
    bends upwards towards slope 2.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    anchor = None
    for name, points in curves.items():
        pixels = [p[0] ** 2 for p in points]
        latency = [p[1] for p in points]
        ranges = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]] if len(points[0]) == 4 else None
        ax.errorbar(pixels, latency, yerr=ranges, fmt="o-", capsize=3, label=name)
        anchor = anchor or (pixels[0], latency[0])
    if anchor:
        xs = sorted({p[0] ** 2 for points in curves.values() for p in points})
        ax.plot(xs, [anchor[1] * x / anchor[0] for x in xs], "k--", alpha=0.5, label="linear in pixels")
    ax.set(xscale="log", yscale="log", xlabel="input pixels (H x W)", ylabel="latency per image (ms)", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png


def plot_efficiency(rows: Sequence[dict], png: str, title: str) -> str:
    """Horizontal bars of each model's inference and training efficiency (1 = the reference)."""
    rows = [row for row in rows if "infer_efficiency" in row]
    labels = [("official " if str(row.get("official")) == "True" else "") + row["model"]
              + (" (compiled)" if row.get("compile") else "") + (" (plain ops)" if str(row.get("plain_ops")) == "True" else "")
              + (f" [{row['precision']}]" if row.get("precision", "fp32") != "fp32" else "") for row in rows]
    phases = [phase for phase in ("infer", "train") if any(f"{phase}_efficiency" in row for row in rows)]
    height = 0.8 / len(phases)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.45 * len(rows) * len(phases)))
    for k, phase in enumerate(phases):
        measured = [i for i, row in enumerate(rows) if f"{phase}_efficiency" in row]
        ys = [i + (k - (len(phases) - 1) / 2) * height for i in measured]
        values = [rows[i][f"{phase}_efficiency"] for i in measured]
        bars = ax.barh(ys, values, height, label={"infer": "inference", "train": "training"}[phase])
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax.axvline(1.0, color="k", linestyle="--", alpha=0.5)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="FLOPs per second relative to the reference", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png


def plot_layer_times(per_model: Dict[str, Dict[str, float]], png: str, title: str) -> str:
    """Stacked horizontal bars: each model's ms per image, split by kind of layer (``layer_times.py``);
    a kind keeps its colour across the models."""
    kinds = list(dict.fromkeys(kind for times in per_model.values() for kind in times))
    colours = dict(zip(kinds, plt.get_cmap("tab10").colors * 2))
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.6 * len(per_model)))
    for row, (name, times) in enumerate(per_model.items()):
        left = 0.0
        for kind, ms in times.items():
            ax.barh(row, ms, left=left, color=colours[kind], label=kind, edgecolor="white", linewidth=0.5)
            if ms >= 0.06 * sum(times.values()):
                ax.text(left + ms / 2, row, f"{ms:.1f}", ha="center", va="center", fontsize=7, color="white")
            left += ms
        ax.text(left, row, f" {left:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(per_model)), list(per_model), fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="ms per image", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="x")
    by_label = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per kind
    ax.legend(by_label.values(), by_label.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png
