"""bfloat16 on CPUs that have the kernels: validate.py --amp and predict.py classify --bf16 run under
bfloat16 autocast there, and refuse in one line elsewhere (the CPU probe forced both ways)."""
import argparse
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from classification import validate
from tools import predict, predict_tasks

WITH_BF16 = frozenset({torch.float32, torch.bfloat16})
WITHOUT_BF16 = frozenset({torch.float32})


def amp_args(*argv):
    return validate.parse_args(["--data-dir", "unused", "--model", "pacavit_tiny_p2cconv_100_0", "--checkpoint", "unused",
                                *argv])


def test_validate_amp_on_a_cpu_with_bfloat16_kernels_autocasts_to_bfloat16(monkeypatch):
    monkeypatch.setattr(validate, "cpu_fusion_support", lambda: WITH_BF16)
    with validate.amp_context(amp_args("--amp"), torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with validate.amp_context(amp_args(), torch.device("cpu"))():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("argv, support", [(["--amp"], WITHOUT_BF16), (["--amp", "--amp-dtype", "float16"], WITH_BF16)])
def test_validate_amp_refuses_what_the_cpu_cannot_run(monkeypatch, argv, support):
    monkeypatch.setattr(validate, "cpu_fusion_support", lambda: support)
    with pytest.raises(validate.UsageError, match="--amp on a CPU runs bfloat16.*leave --amp out"):
        validate.amp_context(amp_args(*argv), torch.device("cpu"))


def test_predict_bf16_runs_the_classifier_in_bfloat16(monkeypatch):
    monkeypatch.setattr(predict, "cpu_fusion_support", lambda: WITH_BF16)
    args = argparse.Namespace(task="classify", model="pacavit_tiny_p2cconv_100_0", checkpoint=None, device="cpu",
                              clusters=False, bf16=True, img_size=None)
    classifier = predict.build_predictor(args)
    head_dtypes = []
    classifier.model.get_classifier().register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    picture = predict_tasks.Picture("x.png", "x", np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    (result,) = classifier.predict([picture])
    assert head_dtypes == [torch.bfloat16] and len(result.entry["top5"]) == 5


def test_predict_bf16_without_the_kernels_is_one_clear_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(predict, "cpu_fusion_support", lambda: WITHOUT_BF16)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with caplog.at_level(logging.ERROR):
        code = predict.main(["classify", str(image), "--out", str(tmp_path / "out"), "--model",
                             "pacavit_tiny_p2cconv_100_0", "--bf16", "--device", "cpu"])
    assert code == 2
    assert any("--bf16: this CPU has no bfloat16 kernels" in m for m in caplog.messages)
