"""Pictures of PaCa cluster maps: overlays as numpy images, composed into fixed-size PNG figures.

Every figure is laid out in pixels (dpi 100, no tight bounding box), so a figure's size depends
only on what it shows; ``*_size`` functions give that size.  Cluster ``m`` is drawn in
``palette(M)[m]`` everywhere (hard maps, tile borders, bars), so one cluster can be followed
across figures.
"""
import colorsys
import math
import textwrap
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

DPI = 100
TILE = 128  # one soft-assignment tile of the grid
PANEL = 288  # one picture of the hard-map and query figures
LEGEND_W = 224  # legend column of the hard-map figure
BARS_W = 320  # bar-chart column of the query figure
HEADER = 40  # title strip on top of every figure
OVERVIEW_TILE = 144  # one picture of the overview
OVERVIEW_SOFT = 3  # soft maps per stage in the overview
LEGEND_ROWS = 12
HEAT = colormaps["turbo"]


def palette(num: int) -> np.ndarray:
    """``num`` distinguishable RGB colours in [0, 1]: golden-ratio hue steps, alternating brightness."""
    colours = []
    for i in range(num):
        hue = (0.07 + i * 0.618034) % 1.0
        saturation, value = ((0.85, 0.95), (0.6, 0.8), (0.95, 0.65))[i % 3]
        colours.append(colorsys.hsv_to_rgb(hue, saturation, value))
    return np.asarray(colours, dtype=np.float32).reshape(num, 3)


# -- numbers behind the pictures ---------------------------------------------------------------
def membership(assignments: torch.Tensor) -> torch.Tensor:
    """(M, H, W) softmax-over-patches assignments -> each patch's share in each cluster (sums to 1 over M).

    Every cluster's assignments sum to 1 over the patches, so a cluster's raw mass says nothing about
    its size; normalising over the clusters per patch gives how much of each patch a cluster holds.
    """
    return assignments / assignments.sum(dim=0, keepdim=True).clamp_min(1e-12)


def cluster_usage(assignments: torch.Tensor) -> torch.Tensor:
    """(M,) fraction of the image each cluster holds (soft patch count / number of patches)."""
    return membership(assignments).flatten(1).mean(dim=1)


def hard_assignment(assignments: torch.Tensor) -> torch.Tensor:
    """(H, W) index of the cluster with the largest assignment weight on each patch."""
    return assignments.argmax(dim=0)


def upsample(maps: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(..., h, w) -> (..., H, W)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode=mode, align_corners=None if mode == "nearest" else False)
    return out.reshape(*lead, *size)


# -- numpy overlays (H, W, 3) in [0, 1] ---------------------------------------------------------
def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` (H, W) in [0, 1] over a dimmed ``image``: hot where it is large, the photo elsewhere."""
    alpha = (0.15 + 0.75 * heat)[..., None]
    return (1 - alpha) * image * 0.8 + alpha * HEAT(heat)[..., :3]


def label_overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Colour each pixel by its cluster over the photo, with darkened borders between clusters."""
    out = 0.4 * image + 0.6 * colours[labels]
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    out[edge] *= 0.3
    return out


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3); every picture of a figure starts from one resized photo."""
    return upsample(torch.from_numpy(image).permute(2, 0, 1), (size, size)).permute(1, 2, 0).clamp(0, 1).numpy()


def soft_tile(photo: np.ndarray, cluster_map: torch.Tensor, colour: np.ndarray) -> np.ndarray:
    """One cluster's assignment map (h, w), upsampled to the photo and scaled to its maximum, over
    the photo, framed in the cluster's colour."""
    heat = upsample(cluster_map, photo.shape[:2])
    heat = (heat / heat.max().clamp_min(1e-12)).clamp(0, 1).numpy()
    tile = heat_overlay(photo, heat)
    tile[:3, :], tile[-3:, :], tile[:, :3], tile[:, -3:] = colour, colour, colour, colour
    return tile


def hard_picture(photo: np.ndarray, assignments: torch.Tensor, colours: np.ndarray) -> np.ndarray:
    labels = upsample(hard_assignment(assignments), photo.shape[:2], mode="nearest").long().numpy()
    return label_overlay(photo, labels, colours)


def query_heat(assignments: torch.Tensor, query_attention: torch.Tensor) -> torch.Tensor:
    """(h, w) attention that the query pays to the clusters each patch belongs to: the sum over
    clusters of attention(query, m) times the patch's share in m.  Uniform attention gives 1/M."""
    return torch.einsum("m,mhw->hw", query_attention, membership(assignments))


def query_picture(photo: np.ndarray, assignments: torch.Tensor, query_attention: torch.Tensor):
    """The query heat stretched from its minimum to its maximum over the photo; also returns that
    range relative to uniform attention (1 = 1/M), since the stretch hides how flat it is."""
    heat = query_heat(assignments, query_attention)
    low, high = heat.min(), heat.max()
    scaled = (upsample(heat, photo.shape[:2]) - low) / (high - low).clamp_min(1e-12)
    M = assignments.shape[0]
    return heat_overlay(photo, scaled.clamp(0, 1).numpy()), (float(low * M), float(high * M))


def mark_query(ax, query_cell: Tuple[int, int], hw: Tuple[int, int], size: int, x0: float = 0.0):
    """Outline the query patch (row, col of an ``hw`` grid) on a ``size`` picture drawn at x = ``x0``."""
    step_y, step_x = size / hw[0], size / hw[1]
    box = (x0 + query_cell[1] * step_x, query_cell[0] * step_y)
    ax.add_patch(Rectangle(box, step_x, step_y, fill=False, edgecolor="white", linewidth=2.0))
    ax.add_patch(Rectangle(box, step_x, step_y, fill=False, edgecolor="black", linewidth=0.8))


# -- figures ------------------------------------------------------------------------------------
def _figure(width: int, height: int):
    return plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _picture_axes(fig, left: int, top: int, width: int, height: int):
    """Axes covering a pixel rectangle of ``fig`` (origin top-left); images drawn in it map 1:1."""
    W, H = fig.get_size_inches() * DPI
    ax = fig.add_axes((left / W, 1 - (top + height) / H, width / W, height / H))
    ax.set_axis_off()
    return ax


def _title(fig, text: str):
    """Title in the header strip, wrapped to the figure's width."""
    W, H = fig.get_size_inches() * DPI
    lines = textwrap.wrap(text, width=max(20, int(W / 6.5)))[:2]
    fig.text(6 / W, 1 - 0.5 * HEADER / H, "\n".join(lines), va="center", ha="left", fontsize=9 if len(lines) < 2 else 8)


def _caption(ax, x: float, y: float, text: str, va: str = "top"):
    ax.text(x, y, text, fontsize=7, va=va, color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1.2, linewidth=0))


def _save(fig, path):
    """Write an adaptive 256-colour PNG: about a quarter of the size of a true-colour one."""
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def _name(index: int, names: Optional[Sequence[str]]) -> str:
    return names[index] if names else f"#{index}"


def grid_shape(count: int) -> Tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(count)))
    return math.ceil(count / cols), cols


def soft_grid_size(count: int) -> Tuple[int, int]:
    """(width, height) in pixels of the grid of ``count`` soft maps."""
    rows, cols = grid_shape(count)
    return cols * TILE, rows * TILE + HEADER


def draw_soft_grid(path, image, assignments, order: Sequence[int], title: str, names=None):
    """Grid of the soft assignment maps of the clusters in ``order``, labelled with their share."""
    colours, usage = palette(assignments.shape[0]), cluster_usage(assignments)
    photo = resize_image(image, TILE)
    rows, cols = grid_shape(len(order))
    mosaic = np.ones((rows * TILE, cols * TILE, 3), dtype=np.float32)
    for k, m in enumerate(order):
        r, c = divmod(k, cols)
        mosaic[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = soft_tile(photo, assignments[m], colours[m])
    width, height = soft_grid_size(len(order))
    fig = _figure(width, height)
    _title(fig, title)
    ax = _picture_axes(fig, 0, HEADER, cols * TILE, rows * TILE)
    ax.imshow(mosaic, interpolation="nearest")
    for k, m in enumerate(order):
        r, c = divmod(k, cols)
        _caption(ax, c * TILE + 5, r * TILE + 5, f"{_name(m, names)} {100 * usage[m]:.1f}%")
    _save(fig, path)


def hard_map_size() -> Tuple[int, int]:
    return 2 * PANEL + LEGEND_W, PANEL + HEADER


def draw_hard_map(path, image, assignments, title: str, names=None):
    """Photo | argmax cluster per patch in its colour, with a legend of the largest clusters."""
    M = assignments.shape[0]
    colours, usage = palette(M), cluster_usage(assignments)
    labels = hard_assignment(assignments)
    photo = resize_image(image, PANEL)
    width, height = hard_map_size()
    fig = _figure(width, height)
    _title(fig, title)
    ax = _picture_axes(fig, 0, HEADER, 2 * PANEL, PANEL)
    ax.imshow(np.concatenate([photo, hard_picture(photo, assignments, colours)], axis=1), interpolation="nearest")
    area = torch.bincount(labels.flatten(), minlength=M).float() / labels.numel()
    present = torch.nonzero(area).flatten()
    shown = present[area[present].argsort(descending=True)][:LEGEND_ROWS].tolist()
    legend = _picture_axes(fig, 2 * PANEL + 8, HEADER, LEGEND_W - 8, PANEL)
    legend.set_xlim(0, 1)
    legend.set_ylim(LEGEND_ROWS + 1, 0)
    legend.text(0, 0.5, f"{len(present)} of {M} clusters win a patch;\nlargest (argmax area, soft share):",
                fontsize=7.5, va="center")
    for row, m in enumerate(shown, start=1):
        legend.add_patch(Rectangle((0, row + 0.1), 0.08, 0.8, color=colours[m]))
        legend.text(0.11, row + 0.5, f"{_name(m, names)}: {100 * area[m]:.1f}%, {100 * usage[m]:.1f}%",
                    fontsize=7.5, va="center")
    _save(fig, path)


def query_figure_size(blocks: int) -> Tuple[int, int]:
    return PANEL + BARS_W, blocks * PANEL + HEADER


def draw_query(path, image, rows: List[Tuple[str, torch.Tensor, torch.Tensor]], query_cell, hw, topk: int, title: str,
               names=None):
    """One row per block: the query's attention spread over the image through the clusters, and a
    bar chart of its ``topk`` most attended clusters.  ``rows``: (label, assignments, attention (M,))."""
    width, height = query_figure_size(len(rows))
    fig = _figure(width, height)
    _title(fig, title)
    photo = resize_image(image, PANEL)
    for i, (label, assignments, attention) in enumerate(rows):
        M = assignments.shape[0]
        colours = palette(M)
        picture, (low, high) = query_picture(photo, assignments, attention)
        ax = _picture_axes(fig, 0, HEADER + i * PANEL, PANEL, PANEL)
        ax.imshow(picture, interpolation="nearest")
        mark_query(ax, query_cell, hw, PANEL)
        _caption(ax, 5, 5, label)
        _caption(ax, 5, PANEL - 5, f"colour range: {low:.2f}x to {high:.2f}x uniform", va="bottom")
        top = attention.argsort(descending=True)[:topk].tolist()
        bars = _picture_axes(fig, PANEL + 90, HEADER + i * PANEL + 30, BARS_W - 105, PANEL - 75)
        bars.set_axis_on()
        values = attention[top].numpy()
        bars.barh(range(len(top)), values, color=colours[top])
        bars.axvline(1 / M, color="black", linestyle="--", linewidth=0.8)
        bars.set_xlim(0, 1.3 * max(values.max(), 1 / M))
        for row, value in enumerate(values):  # near-uniform attention is invisible in bar lengths alone
            bars.text(value, row, f" {value * M:.2f}x", va="center", fontsize=6)
        bars.set_yticks(range(len(top)), [_name(m, names) for m in top], fontsize=7)
        bars.invert_yaxis()
        bars.xaxis.set_major_locator(MaxNLocator(4))
        bars.tick_params(axis="x", labelsize=7)
        bars.set_xlabel("attention, mean over heads (dashed, 1x: uniform)", fontsize=7)
        bars.set_title(f"top {len(top)} of {M} clusters", fontsize=7)
    _save(fig, path)


def overview_size(stages: int) -> Tuple[int, int]:
    return (3 + OVERVIEW_SOFT) * OVERVIEW_TILE, stages * OVERVIEW_TILE + HEADER


def draw_overview(path, image, stages: List[dict], title: str):
    """One row per stage: photo with the query | hard map | query attention | the largest soft maps.

    ``stages``: dicts with ``label``, ``assignments`` (M, h, w), ``attention`` (M,) or None,
    ``query_cell``, ``hw`` and ``names``.
    """
    T = OVERVIEW_TILE
    width, height = overview_size(len(stages))
    fig = _figure(width, height)
    _title(fig, title)
    photo = resize_image(image, T)
    blank = np.ones_like(photo)
    for i, stage in enumerate(stages):
        assignments = stage["assignments"]
        colours = palette(assignments.shape[0])
        attention = stage["attention"]
        query = blank if attention is None else query_picture(photo, assignments, attention)[0]
        order = cluster_usage(assignments).argsort(descending=True)[:OVERVIEW_SOFT].tolist()
        tiles = [photo, hard_picture(photo, assignments, colours), query]
        tiles += [soft_tile(photo, assignments[m], colours[m]) for m in order]
        tiles += [blank] * (3 + OVERVIEW_SOFT - len(tiles))
        ax = _picture_axes(fig, 0, HEADER + i * T, width, T)
        ax.imshow(np.concatenate(tiles, axis=1), interpolation="nearest")
        captions = [stage["label"], "argmax cluster", "query attention" if attention is not None else ""]
        captions += [f"{_name(m, stage['names'])} (soft)" for m in order]
        for c, caption in enumerate(captions):
            if caption:
                _caption(ax, c * T + 4, T - 4, caption, va="bottom")
        if attention is not None:
            for x0 in (0, 2 * T):
                mark_query(ax, stage["query_cell"], stage["hw"], T, x0=x0)
    _save(fig, path)
