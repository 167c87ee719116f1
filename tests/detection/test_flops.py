"""get_flops.py: the whole PaCa-Tiny Mask R-CNN has the seed table's 32.0M parameters, and the
attention computed by scaled_dot_product_attention is part of the FLOPs."""
import re
import subprocess
import sys

import pytest

from .conftest import DETECTION

TINY = "configs/paca_vit/mask_rcnn_1x/mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.py"


def test_params_match_the_seed_table():
    # parameters do not depend on the image size; a small one keeps the trace cheap
    result = subprocess.run(
        [sys.executable, "get_flops.py", TINY, "--shape", "256", "160", "--cfg-options", "model.backbone.init_cfg=None"],
        cwd=DETECTION, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    params = float(re.search(r"params: ([\d.]+)M", result.stdout).group(1))
    flops = float(re.search(r"FLOPs: ([\d.]+)G", result.stdout).group(1))
    assert abs(params - 32.0) <= 0.1
    assert flops > 0
    assert "scaled_dot_product_attention" not in result.stdout  # counted, so not listed as skipped


@pytest.mark.parametrize("args, message", [
    ([TINY, "--shape", "0", "-5"], "--shape: each side must be at least 32 (the backbone's stride), got [0, -5]"),
    ([TINY, "--cfg-options", "foo"], "--cfg-options takes KEY=VALUE items (e.g. train_cfg.max_epochs=12), got 'foo'"),
    (["configs/no_such_config.py"], "config file not found: configs/no_such_config.py"),
])
def test_bad_arguments_are_one_usage_line(args, message):
    result = subprocess.run([sys.executable, "get_flops.py", *args], cwd=DETECTION, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"get_flops.py: error: {message}"
    assert "Traceback" not in result.stderr
