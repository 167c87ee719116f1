"""runtime/launch_common.sh on a cluster, on this GPU-less machine: the devices a launcher gives its
processes (8 simulated GPUs, a job's inherited CUDA_VISIBLE_DEVICES) and the checks of a
several-node launch; and the filter that keeps torchrun's own traceback of a signal off the
launcher's output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# torch.cuda as on a machine with 8 GPUs, following CUDA_VISIBLE_DEVICES like a CUDA build
FAKE_CUDA = '''
import os
import torch

def _visible():
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return 8 if value is None else len([index for index in value.split(",") if index])

torch.cuda.is_available = lambda: _visible() > 0
torch.cuda.device_count = _visible
torch.cuda.get_device_capability = lambda device=None: (9, 0)  # H100s, as nvidia-smi lists (runtime/gpu_check.py)
torch.cuda.get_device_name = lambda device=None: "NVIDIA H100 80GB HBM3"
'''


@pytest.fixture
def gpu_env(tmp_path):
    """Environment of a launcher on an 8-GPU node: the simulated torch.cuda (sitecustomize) and an
    ``nvidia-smi`` that lists the GPUs."""
    (tmp_path / "sitecustomize.py").write_text(FAKE_CUDA)
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n')
    smi.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PATH=f"{tmp_path}:{os.environ['PATH']}",
               PYTHON=sys.executable)
    for name in ("CUDA_VISIBLE_DEVICES", "PACAVIT_DEVICE", "NNODES", "NODE_RANK", "MASTER_ADDR"):
        env.pop(name, None)
    return env


def select_devices(env, gpus, nb_gpus, then="", **extra):
    """paca_select_devices GPUS NB_GPUS, then prints the device and CUDA_VISIBLE_DEVICES and runs
    the shell command ``then`` in the launcher's environment."""
    script = f"""
        source {REPO}/runtime/launch_common.sh
        paca_select_devices "$1" "$2"
        echo "device=$PACA_DEVICE visible=${{CUDA_VISIBLE_DEVICES-unset}}"
        {then}
    """
    return subprocess.run(["bash", "-c", script, "select", gpus, str(nb_gpus)], env=dict(env, **extra),
                          capture_output=True, text=True, timeout=120)


# what a process started by the launcher sees
GPU_COUNT = '"$PYTHON" -c "import torch; print(\'process sees\', torch.cuda.device_count(), \'GPUs\')"'


def test_gpus_list_names_the_devices(gpu_env):
    result = select_devices(gpu_env, "0,1,2,3", 2)
    assert result.returncode == 0, result.stderr
    assert "device=cuda visible=0,1,2,3" in result.stdout


def test_cpu_device_hides_the_gpus(gpu_env):
    """PACAVIT_DEVICE=cpu on a GPU node: no process of the run sees a GPU (no NCCL, no SyncBN)."""
    result = select_devices(gpu_env, "0,1", 2, GPU_COUNT, PACAVIT_DEVICE="cpu", CUDA_VISIBLE_DEVICES="0,1")
    assert result.returncode == 0, result.stderr
    assert "device=cpu visible=\n" in result.stdout and "process sees 0 GPUs" in result.stdout


def test_more_processes_than_listed_gpus_is_an_error(gpu_env):
    result = select_devices(gpu_env, "0,1", 4)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: Nb_gpus=4 but gpus '0,1' lists 2 device(s): list at least 4 GPUs or lower Nb_gpus")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_malformed_gpus_list_is_refused_on_any_host(gpu_env, device):
    """The same command must not work on a laptop and fail on the cluster."""
    result = select_devices(gpu_env, "x", 1, **({"PACAVIT_DEVICE": "cpu"} if device == "cpu" else {}))
    assert result.returncode == 2 and "device=" not in result.stdout
    assert result.stderr.strip() == "error: gpus must list device numbers like 0,1,2,3, got 'x'"


def test_inherited_visible_devices_are_kept(gpu_env):
    """SLURM gave the job GPUs 4-7: gpus counts within them, and a GPU outside them is refused."""
    inside = select_devices(gpu_env, "0,1", 2, CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert inside.returncode == 0, inside.stderr
    assert "device=cuda visible=4,5" in inside.stdout
    outside = select_devices(gpu_env, "0,4", 2, CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert outside.returncode == 2 and "device=" not in outside.stdout
    assert "gpus '0,4' names GPU 4, but this job may use only CUDA_VISIBLE_DEVICES=4,5,6,7" in outside.stderr
    assert "use 0..3" in outside.stderr


def test_node_rank_must_fit_nnodes(gpu_env):
    result = select_devices(gpu_env, "0", 1, NNODES="2", NODE_RANK="2", MASTER_ADDR="10.0.0.1")
    assert result.returncode == 2 and "NODE_RANK must be 0..1 with NNODES=2, got '2'" in result.stderr


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_several_nodes_need_master_addr(gpu_env, tmp_path, task):
    """Every training launcher refuses NNODES=2 without MASTER_ADDR at once, before touching the
    run folder (with 127.0.0.1 each node would wait for itself until killed)."""
    datasets, work_dirs = tmp_path / "datasets", tmp_path / "work_dirs"
    for split in ("train", "val"):
        (datasets / "TINY" / split).mkdir(parents=True)
    launchers = {
        "classification": ["train_timm.sh", "configs/digits_demo.yml", "pacavit_tiny_p2cconv_100_0", "TINY", 32, 1, 0,
                           "nodes", "t1", 0, 1, 0, 29500],
        "detection": ["train_mmdet.sh", "configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py", 1,
                      "nodes", "t1", 0, 1, 29500],
        "segmentation": ["train_mmseg.sh",
                         "configs/paca_vit/paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py", 1,
                         "nodes", "t1", 0, 1, 29500],
    }
    launcher, *args = launchers[task]
    env = dict(gpu_env, NNODES="2", NODE_RANK="0", PACAVIT_DATASETS=str(datasets), PACAVIT_WORK_DIRS=str(work_dirs))
    result = subprocess.run([str(REPO / task / launcher), *map(str, args)], env=env, cwd=REPO / task,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: NNODES=2 needs MASTER_ADDR: set it on every node to node 0's address" in result.stderr
    assert not work_dirs.exists()


# torchrun's report of a SIGTERM as CI once caught it: a frame stopped on a `def` line prints an
# empty line inside the traceback
SIGTERM_TRACEBACK = """\
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 984, in _poll
    self._capture_process_failures(done_local_ranks)
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 967, in _capture
    def _capture_process_failures(self, done_local_ranks: set[int]):

  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 12362 got signal: 15
"""
WORKER_TRACEBACK = """\
Traceback (most recent call last):
  File "train_timm.py", line 10, in <module>
    main()
ValueError: a worker's own error
"""


def test_stderr_filter_drops_torchruns_signal_traceback_and_keeps_the_rest(tmp_path):
    copy = tmp_path / "errors"
    stream = "starting\n" + SIGTERM_TRACEBACK + "train_timm.py: error: bad option\n" + WORKER_TRACEBACK + "last\n"
    result = subprocess.run(["bash", "-c", f'source {REPO}/runtime/launch_common.sh; _paca_stderr_filter "$1"',
                             "filter", str(copy)], input=stream, capture_output=True, text=True, timeout=60)
    assert result.stderr == "starting\ntrain_timm.py: error: bad option\n" + WORKER_TRACEBACK + "last\n"
    assert copy.read_text() == "train_timm.py: error: bad option\nValueError: a worker's own error\n"


@pytest.mark.parametrize("launcher, positionals, script_option", [
    ("classification/train_timm.sh", ["configs/digits_demo.yml", "pacavit_tiny_p2cconv_100_0", "NO_SUCH_SET", "32",
                                      "0", "0", "e", "t", "0", "1", "0", ""], "--grad-accumulation-steps"),
    ("detection/train_mmdet.sh", ["configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py",
                                  "0", "e", "t", "0", "1", ""], "--auto-scale-lr"),
])
def test_help_in_others_shows_the_scripts_options_and_makes_no_run_folder(tmp_path, launcher, positionals,
                                                                          script_option):
    env = dict(os.environ, PACAVIT_WORK_DIRS=str(tmp_path / "work_dirs"), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / launcher), *positionals, "--help"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and script_option in result.stdout
    assert not (tmp_path / "work_dirs").exists()
