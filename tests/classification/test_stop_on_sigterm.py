"""StopOnSigterm: every rank stops after the same step, whichever rank the signal reached."""
import json
import os
import signal

import torch.distributed as dist
import torch.multiprocessing as mp

from classification.train_timm import StopOnSigterm

from .cls_helpers import free_port


def _rank_main(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    stop = StopOnSigterm(distributed=True)
    answers = []
    for step in range(8):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # only this rank is told, before its 4th check
        answers.append(stop.agreed())
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(answers, f)


def test_ranks_agree_on_the_step_after_the_signal(tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2)
    answers = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # rank 1's flag goes into the all-reduce started at its 4th check, which the 5th reads: both
    # ranks stop after the same (5th) step, though rank 0 never saw the signal
    assert answers[0] == answers[1] == [False] * 4 + [True] * 4


def test_one_process_stops_after_the_step_that_saw_the_signal():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopOnSigterm(distributed=False)
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed()
    finally:
        signal.signal(signal.SIGTERM, previous)
