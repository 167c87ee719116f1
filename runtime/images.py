"""Reading images for the entry points: classification's evaluation data and the tools' inputs (predict,
the cluster visualiser and the explorer page read every image here)."""
import logging

import numpy as np
from PIL import Image, ImageOps

_logger = logging.getLogger("pacavit")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SKLEARN_PREFIX = "sklearn:"
SKLEARN_SAMPLES = ("china.jpg", "flower.jpg")  # photos shipped with scikit-learn


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


class ImageReadError(RuntimeError):
    """An input image could not be read (the other images of a folder are still drawn)."""


def read_image(source: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, turned upright by its EXIF orientation; 16-bit and
    32-bit images are scaled to 8 bits by their bit depth (``runtime.images.to_rgb8``)."""
    try:
        with Image.open(source) as image:
            image.load()
            return np.asarray(to_rgb8(ImageOps.exif_transpose(image), source))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{type(e).__name__}: {e}") from e


def read_source(source: str) -> np.ndarray:
    """``read_image`` of a file, or ``sklearn:NAME`` for one of scikit-learn's bundled photos."""
    if source.startswith(SKLEARN_PREFIX):
        from sklearn.datasets import load_sample_image

        return load_sample_image(source[len(SKLEARN_PREFIX):])
    return read_image(source)
