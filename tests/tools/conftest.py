"""Fixtures of the tools tests: photos the project does not ship, in a folder with a space in its name."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"

SKLEARN_IMAGES = Path(sklearn.datasets.__file__).parent / "images"
GENERATED_SIZE = (150, 100)  # width, height: unlike either photo, so sizes are told apart


def generated_image() -> np.ndarray:
    """A sky, a meadow and a red square, with some noise (uint8 RGB)."""
    width, height = GENERATED_SIZE
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), dtype=np.float64)
    image[: height // 2] = (70, 130, 200)
    image[height // 2:] = (60, 150, 60)
    image[30:70, 50:100] = (210, 40, 40)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict:
    """``folder``: "my photos/" holding "sub dir/flower.jpg", "generated.webp", a broken "broken.jpg"
    and a text file; ``china``: the path of scikit-learn's china.jpg, given as a file."""
    folder = tmp_path_factory.mktemp("inputs") / "my photos"
    (folder / "sub dir").mkdir(parents=True)
    shutil.copy(SKLEARN_IMAGES / "flower.jpg", folder / "sub dir" / "flower.jpg")
    Image.fromarray(generated_image()).save(folder / "generated.webp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "notes.txt").write_text("not an image")
    return dict(folder=folder, china=str(SKLEARN_IMAGES / "china.jpg"))
