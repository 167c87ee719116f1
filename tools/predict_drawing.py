"""Pictures of predictions, drawn on the input image at its own size (``tools/predict.py``).

Every picture starts with the photo, H x W as it was read; ``--clusters`` appends a panel (the
same height) with the PaCa clusters, and segmentation appends a legend column.  Text size follows
the image size, so labels stay legible on thumbnails and on large photos alike.
"""
import textwrap
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tools import cluster_figures as figures

LEGEND_ROWS = 20


def font_for(image_size: Tuple[int, int], scale: float = 1.0) -> ImageFont.FreeTypeFont:
    """A font whose height is about ``scale``/30 of the image's larger side (at least 10 px)."""
    return ImageFont.load_default(size=max(10, round(scale * max(image_size) / 30)))


def fit_lines(lines: Sequence[str], font, max_width: float) -> List[str]:
    """``lines`` wrapped (at spaces, else anywhere) so that each fits into ``max_width`` pixels."""
    chars = max(8, int(max_width / max(1.0, font.getlength("x"))))
    return [part for line in lines for part in (textwrap.wrap(line, chars) or [""])]


def text_box(draw: ImageDraw.ImageDraw, xy: Tuple[int, int], lines: Sequence[str], font):
    """Lines of white text on a dark translucent box whose top-left corner is ``xy``, wrapped to
    the width of the picture."""
    lines = fit_lines(lines, font, draw.im.size[0] - xy[0] - font.size)
    line_h = font.size + max(2, font.size // 5)
    width = max(draw.textlength(line, font=font) for line in lines)
    pad = max(2, font.size // 4)
    x, y = xy
    draw.rectangle((x, y, x + width + 2 * pad, y + line_h * len(lines) + 2 * pad), fill=(0, 0, 0, 160))
    for i, line in enumerate(lines):
        draw.text((x + pad, y + pad + i * line_h), line, fill=(255, 255, 255, 255), font=font)


def _to_image(array: np.ndarray) -> Image.Image:
    """(H, W, 3) float in [0, 1] or uint8 -> RGBA image."""
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGBA")


def _colour(rgb) -> Tuple[int, int, int]:
    """An RGB colour in [0, 1] as 0-255 integers (PIL's colours)."""
    return tuple(int(v) for v in (np.asarray(rgb, dtype=np.float64) * 255).round())


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if fraction >= 0.0005 else "<0.1%"


# -- one panel per task -------------------------------------------------------------------------
def classification_panel(image: np.ndarray, top: List[dict], title: str) -> Image.Image:
    """The photo with the top-k labels and scores in its top-left corner."""
    canvas = _to_image(image)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    font = font_for(canvas.size)
    lines = [title] + [f"{100 * p['score']:5.1f}%  {p['class_name']}" for p in top]
    text_box(ImageDraw.Draw(overlay), (4, 4), lines, font)
    return Image.alpha_composite(canvas, overlay)


def detection_panel(image: np.ndarray, instances: List[dict], masks: Sequence[np.ndarray], title: str,
                    colours: np.ndarray) -> Image.Image:
    """The photo with each instance's mask tinted, its box outlined and ``class score`` on the box."""
    picture = image.astype(np.float32) / 255.0
    for instance, mask in zip(instances, masks):
        colour = colours[instance["label"] % len(colours)]
        picture[mask] = 0.5 * picture[mask] + 0.5 * colour
    canvas = _to_image(picture)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = font_for(canvas.size, scale=0.7)  # many labels: smaller than the other pictures' text
    width = max(1, round(max(canvas.size) / 300))
    for instance in instances:
        x1, y1, x2, y2 = instance["bbox"]
        draw.rectangle((x1, y1, x2, y2), outline=_colour(colours[instance["label"] % len(colours)]) + (255,),
                       width=width)
    for instance in reversed(instances):  # labels after all boxes, the highest scores on top
        x1, y1 = instance["bbox"][:2]
        label = f"{instance['class_name']} {instance['score']:.2f}"
        text_box(draw, (int(x1), max(0, int(y1) - font.size - font.size // 2 - 4)), [label], font)
    text_box(draw, (4, 4), [title], font_for(canvas.size))
    return Image.alpha_composite(canvas, overlay)


def segmentation_panel(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, title: str) -> Image.Image:
    """The class map blended over the photo, class borders darkened."""
    picture = figures.label_overlay(image.astype(np.float32) / 255.0, labels, colours)
    canvas = _to_image(picture)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    text_box(ImageDraw.Draw(overlay), (4, 4), [title], font_for(canvas.size))
    return Image.alpha_composite(canvas, overlay)


def legend_column(height: int, present: List[dict], colours: np.ndarray, image_size) -> Image.Image:
    """A white column listing the classes present (colour, name, pixel share), largest first."""
    font = font_for(image_size)
    line_h = font.size + max(3, font.size // 3)
    rows = present[: max(1, min(LEGEND_ROWS, (height - line_h) // line_h - 1))]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [f"{c['class_name']} {percent(c['fraction'])}" for c in rows]
    if len(rows) < len(present):
        texts.append(f"+{len(present) - len(rows)} more (predictions.json)")
    width = int(max(measure.textlength(t, font=font) for t in texts + ["classes present"])) + 2 * line_h
    column = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(column)
    draw.text((line_h // 2, line_h // 4), "classes present", fill=(0, 0, 0, 255), font=font)
    for i, text in enumerate(texts, start=1):
        y = line_h // 4 + i * line_h
        if i <= len(rows):
            swatch = _colour(colours[rows[i - 1]["label"] % len(colours)]) + (255,)
            draw.rectangle((line_h // 2, y + 2, line_h // 2 + font.size, y + font.size), fill=swatch)
        draw.text((line_h // 2 + font.size + 4, y), text, fill=(0, 0, 0, 255), font=font)
    return column


# -- the PaCa clusters ----------------------------------------------------------------------------
def cluster_panel(image: np.ndarray, assignments: torch.Tensor, caption: List[str]) -> Image.Image:
    """Each pixel of ``image`` coloured by its argmax cluster, as the forward explainer draws it.

    ``assignments``: (M, h, w) soft assignments covering exactly ``image``.
    """
    photo = image.astype(np.float32) / 255.0
    picture = figures.hard_picture(photo, assignments.float().cpu(), figures.palette(assignments.shape[0]))
    canvas = _to_image(picture)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    text_box(ImageDraw.Draw(overlay), (4, 4), caption, font_for(canvas.size))
    return Image.alpha_composite(canvas, overlay)


def side_by_side(panels: List[Image.Image]) -> Image.Image:
    """Panels left to right, top-aligned, on white; the height is the tallest panel's."""
    height = max(p.size[1] for p in panels)
    out = Image.new("RGB", (sum(p.size[0] for p in panels), height), (255, 255, 255))
    x = 0
    for panel in panels:
        out.paste(panel.convert("RGB"), (x, 0))
        x += panel.size[0]
    return out


def resize_panel(panel: Image.Image, height: int) -> Image.Image:
    """``panel`` scaled to ``height`` (square crops beside a photo of another height)."""
    width = max(1, round(panel.size[0] * height / panel.size[1]))
    return panel.resize((width, height), Image.BICUBIC)


def class_colours(num_classes: int, palette: Optional[Sequence] = None) -> np.ndarray:
    """(num_classes, 3) RGB in [0, 1]: the dataset's palette when it has one for every class."""
    if palette is not None and len(palette) >= num_classes:
        return np.asarray(palette[:num_classes], dtype=np.float32) / 255.0
    return figures.palette(num_classes)
