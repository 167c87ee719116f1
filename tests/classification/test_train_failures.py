"""train_timm.py where GPUs, processes and disks differ from the happy path, simulated on CPU:
a resume that sees fewer GPUs, evaluation beside DDP, a disk that fills during a save."""
import os

import pytest
import torch
import torch.distributed as dist
from timm.utils import CheckpointSaver

from models.checkpoint import read_checkpoint

from .cls_helpers import CLS_DIR, MODEL, write_colour_dataset

from classification import cls_common
from classification import train_timm


def train_args(tmp_path, epochs):
    data = write_colour_dataset(tmp_path / "data", per_class={"train": 3, "val": 1})
    return ["-c", str(CLS_DIR / "configs" / "digits_demo.yml"), "--model", MODEL, "--data-dir", str(data),
            "--output", str(tmp_path / "run"), "--epochs", str(epochs), "-b", "9", "-j", "0", "--img-size", "32"]


def test_resume_restores_the_rng_of_the_gpus_this_process_sees(monkeypatch):
    """Saved by a process that saw 8 GPUs, resumed by one that sees 2 (another CUDA_VISIBLE_DEVICES):
    the two visible GPUs get their states back, and nothing asks for GPU 2..7 (IndexError before)."""
    restored = {}

    def set_rng_state(state, device="cuda"):
        if int(device) >= 2:
            raise IndexError(f"list index out of range (GPU {device} of 2)")
        restored[int(device)] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    saved = dict(train_timm.rng_state(), cuda=[torch.full((16,), gpu, dtype=torch.uint8) for gpu in range(8)])
    train_timm.set_rng_state(saved)
    assert sorted(restored) == [0, 1]
    assert all(torch.equal(restored[gpu], saved["cuda"][gpu]) for gpu in (0, 1))


def test_evaluation_bypasses_the_ddp_wrapper(tmp_path, monkeypatch):
    """Under torch.distributed (one gloo process here) training goes through DDP, evaluation does not:
    DDP's forward broadcasts buffers, a collective that hangs when the ranks' shards differ by a batch."""
    def init_one_process_group(args):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        args.distributed, args.world_size, args.rank, args.local_rank, args.device = True, 1, 0, 0, "cpu"
        return torch.device("cpu")

    evaluated = []
    evaluate = cls_common.evaluate
    monkeypatch.setattr(train_timm, "init_distributed_device", init_one_process_group)
    monkeypatch.setattr(cls_common, "evaluate",
                        lambda model, *args: evaluated.append(type(model)) or evaluate(model, *args))
    train_timm.main(train_args(tmp_path, epochs=1))
    assert not dist.is_initialized(), "main() ends the process group it ran in"
    assert evaluated and torch.nn.parallel.DistributedDataParallel not in evaluated, evaluated


def test_full_disk_during_a_save_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    """The second epoch's checkpoint goes to /dev/full (every write: ENOSPC, as on a full disk, where
    torch only says 'iostream error'): one clear line naming the folder, exit 2 (so the launcher
    repeats it instead of a resume hint), the partial file removed, epoch 1's checkpoint intact."""
    save_checkpoint = CheckpointSaver.save_checkpoint

    def save_onto_a_full_disk_from_epoch_2(saver, epoch, metric=None):
        if epoch == 1:
            os.symlink("/dev/full", os.path.join(saver.checkpoint_dir, "tmp" + saver.extension))
        return save_checkpoint(saver, epoch, metric)

    monkeypatch.setattr(CheckpointSaver, "save_checkpoint", save_onto_a_full_disk_from_epoch_2)
    with pytest.raises(SystemExit) as stopped:
        train_timm.run_main(lambda: train_timm.main(train_args(tmp_path, epochs=2)))
    run = tmp_path / "run"
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: No space left on device in {run} while saving epoch 2;")
    assert f"the last intact checkpoint {run / 'last.pth.tar'} is kept" in line
    assert not os.path.lexists(run / "tmp.pth.tar")
    assert read_checkpoint(str(run / "last.pth.tar"))["epoch"] == 0
