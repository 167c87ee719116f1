"""Reading images for the entry points: classification's evaluation data and the tools' inputs."""
import logging

import numpy as np
from PIL import Image

_logger = logging.getLogger("pacavit")


def to_rgb8(image: Image.Image, name: str) -> Image.Image:
    """``image`` as 8-bit RGB, named ``name`` in a warning.

    Pillow's ``convert("RGB")`` clips the grey values of 16-bit (``I;16*``), 32-bit (``I``) and float
    (``F``) images at 255, which turns a 16-bit PNG almost white; those are scaled by their bit depth
    (65535, or 1.0 for float) instead.  Values outside that range cannot be scaled faithfully: they
    are stretched from their own minimum and maximum, with a warning.  Pillow reads 16-bit RGB(A)
    PNGs as 8-bit itself.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    low, high = 0.0, 1.0 if image.mode == "F" else 65535.0
    if values.size and (values.min() < low or values.max() > high):
        low, high = float(values.min()), float(values.max())
        _logger.warning("%s: its %s values (%g to %g) exceed the range of its bit depth; stretched from their "
                        "own range to 8 bit, so its brightness is not what was stored", name, image.mode, low, high)
    grey = np.round((values - low) * (255.0 / max(high - low, 1e-12)))
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
