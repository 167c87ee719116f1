"""Helpers for the classification tests: a tiny colour dataset and launcher command lines."""
import socket
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CLS_DIR = REPO / "classification"

MODEL = "pacavit_tiny_p2cconv_100_0"
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))  # one class per colour: learnable in a step or two


def write_colour_dataset(root: Path, per_class=None):
    """A tiny ImageFolder: noisy 32x32 images, one colour per class."""
    per_class = per_class or {"train": 6, "val": 3}
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noisy = np.asarray(colour)[None, None] + rng.normal(0, 40, (32, 32, 3))
                Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root




def run(cmd, env, **kwargs):
    """Run a launcher non-interactively (stdin is not a terminal, as in a batch job)."""
    return subprocess.run([str(c) for c in cmd], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600, **kwargs)


def run_folder(env, exp, tag, dataset="TINY", img=32, model=MODEL):
    """Where train_timm.sh trains (and leaves, marked FINISHED) the run of these names."""
    return Path(env["PACAVIT_WORK_DIRS"]) / "classification" / exp / f"{dataset}_{img}_{model}_{tag}"


def train_cmd(exp, tag, *others, remove_old=0, resume=0, dataset="TINY"):
    """train_timm.sh with the digits demo config, 1 CPU process, no loader workers."""
    return [CLS_DIR / "train_timm.sh", "configs/digits_demo.yml", MODEL, dataset, 32, remove_old, resume,
            exp, tag, 0, 1, 0, free_port(), "-b", 9, "--log-interval", 1, *others]


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
