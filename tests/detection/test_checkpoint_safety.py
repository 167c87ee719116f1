"""The weights_only trap: mmengine's own checkpoints load (through the project's loader and, once
registered, through the Runner's own torch.load), arbitrary pickles still do not."""
import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub

from models.checkpoint import CheckpointError, read_checkpoint
from runtime.openmmlab import load_model_checkpoint, register_checkpoint_safe_globals


def _runner_like_checkpoint(path):
    hub = MessageHub.get_instance("paca-test-hub")
    for step in range(3):
        hub.update_scalar("train/loss", 1.0 / (step + 1))
    hub.update_info("iter", np.int64(3))
    torch.save({"message_hub": hub.state_dict(), "meta": {"seed": np.float64(0.5), "hist": np.arange(3)}}, path)


@pytest.mark.parametrize("loader", ["read_checkpoint", "registered torch.load"])
def test_message_hub_and_numpy_values_load_with_weights_only(tmp_path, loader):
    path = tmp_path / "ckpt.pth"
    _runner_like_checkpoint(path)
    if loader == "read_checkpoint":
        loaded = read_checkpoint(path)
    else:  # what mmengine's Runner does when it resumes
        register_checkpoint_safe_globals()
        loaded = torch.load(path, weights_only=True)

    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer)
    assert buffer.mean() == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert buffer.statistics("current") == pytest.approx(1 / 3)
    assert loaded["meta"]["seed"] == 0.5 and loaded["meta"]["hist"].tolist() == [0, 1, 2]


class _CallsSystem:
    def __reduce__(self):
        return os.system, ("echo should never run",)


class _ReachesThroughGetattr:
    def __reduce__(self):
        return getattr, (HistoryBuffer, "__init__")


@pytest.mark.parametrize("payload", [_CallsSystem(), _ReachesThroughGetattr()], ids=["os.system", "getattr"])
def test_arbitrary_callables_are_still_refused(tmp_path, payload):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": payload}, path)
    register_checkpoint_safe_globals()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        read_checkpoint(path)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": torch.nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth does not fit Linear.*weight: checkpoint \(2, 3\) vs model \(2, 4\)"):
        load_model_checkpoint(torch.nn.Linear(4, 2), str(path))


def test_test_checkpoints_bring_their_dataset_meta(tmp_path):
    path = tmp_path / "runner.pth"
    model = torch.nn.Linear(3, 2)
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": ("cat", "dog")}}}, path)
    fresh = torch.nn.Linear(3, 2)
    load_model_checkpoint(fresh, path)
    assert fresh.dataset_meta == {"classes": ("cat", "dog")}
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
