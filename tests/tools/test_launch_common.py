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
    # as CUDA reads the variable: the devices listed before its first entry that names none
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return 8
    count = 0
    for entry in value.split(","):
        if not entry.strip().isdigit():
            break
        count += 1
    return count

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


def rendezvous_port(port_argument, **env):
    script = f'source {REPO}/runtime/launch_common.sh; paca_rendezvous_port "$1"'
    clean = {k: v for k, v in os.environ.items() if k not in ("NNODES", "MASTER_PORT")}
    return subprocess.run(["bash", "-c", script, "port", port_argument], env=dict(clean, PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=60)


def test_several_nodes_need_one_named_port():
    """Without MASTER_PORT or a Port argument each node would pick its own free port and wait there
    for the others forever; one node may pick one."""
    refused = rendezvous_port("", NNODES="2")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: NNODES=2 needs one rendezvous port for all nodes: set MASTER_PORT")
    assert rendezvous_port("", NNODES="2", MASTER_PORT="29511").stdout == "29511\n"
    assert rendezvous_port("29512", NNODES="2").stdout == "29512\n"
    assert int(rendezvous_port("", NNODES="1").stdout) > 0


# a stand-in interpreter: prints the torchrun command line it is given, as one line
ECHO_PYTHON = '#!/bin/sh\necho "torchrun $*"\n'


@pytest.mark.parametrize("nnodes, expected_addr", [("1", "127.0.0.1"), ("2", "10.0.0.1")])
def test_master_addr_counts_only_across_nodes(tmp_path, nnodes, expected_addr):
    """A MASTER_ADDR inherited by a one-node launch (the shell, another job's scheduler variables)
    is not where its torchrun meets itself; several nodes meet there, and each says so."""
    python = tmp_path / "python"
    python.write_text(ECHO_PYTHON)
    python.chmod(0o755)
    script = f'source {REPO}/runtime/launch_common.sh; PACA_NPROC=1; paca_torchrun 29513 train.py --x'
    env = dict(os.environ, PYTHON=str(python), NNODES=nnodes, NODE_RANK="1" if nnodes == "2" else "0",
               MASTER_ADDR="10.0.0.1")
    env.pop("MASTER_PORT", None)
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendezvous = " --rdzv-conf timeout=600" if nnodes == "2" else ""
    assert f"--master_addr={expected_addr} --master_port=29513{rendezvous} train.py --x" in result.stdout
    waits = "note: node 1 of 2 waits for the others at 10.0.0.1:29513 for up to 600 s (PACAVIT_RENDEZVOUS_TIMEOUT)"
    assert (waits in result.stdout) == (nnodes == "2")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("node_rank, cause", [
    ("1", "torch.distributed.DistNetworkError: The client socket has timed out after 3000ms while trying to connect "
          "to (127.0.0.1, {port})."),
    ("0", "torch.distributed.DistStoreError: Timed out after 4 seconds waiting for clients. 1/2 clients joined."),
])
def test_a_node_whose_partners_never_start_stops_after_the_rendezvous_timeout_and_says_why(tmp_path, node_rank,
                                                                                          cause):
    """Node 0 failed before it started (or node 1 never came): the real torchrun, with
    PACAVIT_RENDEZVOUS_TIMEOUT=3, stops within seconds instead of torchrun's 10 minutes, and the
    launcher's last lines name the cause and what to do."""
    (tmp_path / "hello.py").write_text("print('hello')\n")
    port = free_port()
    script = f"""
        source {REPO}/runtime/launch_common.sh
        paca_check_nodes
        PACA_NPROC=1
        paca_torchrun "" "$1/hello.py" || paca_training_failed classification "$1/run" "hint"
    """
    env = dict(os.environ, PYTHON=sys.executable, NNODES="2", NODE_RANK=node_rank, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PACAVIT_RENDEZVOUS_TIMEOUT="3")
    result = subprocess.run(["bash", "-c", script, "node", str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert f"node {node_rank} of 2 waits for the others at 127.0.0.1:{port} for up to 3 s" in result.stdout
    assert result.stderr.strip().splitlines()[-2:] == [
        f"training failed before its first checkpoint: {cause.format(port=port)}; fix the cause above and launch again",
        "the 2 nodes did not all start within 3 s (PACAVIT_RENDEZVOUS_TIMEOUT): launch every node, NODE_RANK 0 to 1, "
        "with the same MASTER_ADDR and MASTER_PORT (node 0 at MASTER_ADDR=127.0.0.1)",
    ]


@pytest.mark.parametrize("value", ["0", "10m", "-5"])
def test_a_rendezvous_timeout_that_is_not_seconds_is_refused_before_anything(value):
    script = f"source {REPO}/runtime/launch_common.sh; paca_check_nodes; echo checked"
    env = dict(os.environ, NNODES="2", NODE_RANK="0", MASTER_ADDR="10.0.0.1", PACAVIT_RENDEZVOUS_TIMEOUT=value)
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "checked" not in result.stdout
    assert result.stderr == f"error: PACAVIT_RENDEZVOUS_TIMEOUT must be a number of seconds (at least 1), got '{value}'\n"


@pytest.mark.parametrize("hidden", ["", "-1", "NoDevFiles"])
def test_gpus_hidden_by_the_job_mean_a_cpu_run_that_says_why(gpu_env, hidden):
    """CUDA_VISIBLE_DEVICES naming no GPU (a scheduler that gave the job none) on a GPU node: CPU
    processes, and the note names the variable instead of a broken torch or driver."""
    result = select_devices(gpu_env, "0", 1, GPU_COUNT, CUDA_VISIBLE_DEVICES=hidden)
    assert result.returncode == 0, result.stderr
    assert f"note: CUDA_VISIBLE_DEVICES='{hidden}' names no GPU (set by your shell or scheduler)" in result.stdout
    assert "device=cpu" in result.stdout and "process sees 0 GPUs" in result.stdout


@pytest.mark.parametrize("smi", ['echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA '
                                 'driver." ; exit 9', "exec sleep 60"])
def test_a_failing_nvidia_smi_stops_the_launch_instead_of_a_cpu_run(gpu_env, tmp_path, smi):
    """A GPU node whose driver is broken (nvidia-smi fails or hangs, torch sees no GPU) is not a
    CPU machine: the launch stops with the cause instead of training on its CPUs."""
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
    (tmp_path / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: False\n")
    result = select_devices(gpu_env, "0", 1, "", PACAVIT_NVIDIA_SMI_TIMEOUT="1")
    assert result.returncode == 2 and "device=" not in result.stdout, result.stdout + result.stderr
    assert result.stderr.startswith("error: nvidia-smi is installed but fails (")
    said = "it exits with status 9: NVIDIA-SMI has failed" if "exit" in smi else "it did not answer within 1 s"
    assert said in result.stderr and "PACAVIT_DEVICE=cpu" in result.stderr


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


def test_a_rank_prefixed_worker_exception_is_the_failures_cause(tmp_path):
    """torchrun may prefix the workers' lines with their rank: the exception still ends up in the
    launcher's last line (torchrun's own ChildFailedError does not)."""
    log = tmp_path / "torchrun.log"
    stream = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"train_timm.py\", line 3\n"
              "[rank1]: RuntimeError: CUDA error: an illegal memory access was encountered\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    script = f"""
        source {REPO}/runtime/launch_common.sh
        _paca_stderr_filter "$1" 2>/dev/null
        PACA_TORCHRUN_LOG="$1" PACA_STOPPED_BY=""
        paca_resume_point() {{ :; }}  # no checkpoint yet
        paca_training_failed classification "$2" hint
    """
    result = subprocess.run(["bash", "-c", script, "failed", str(log), str(tmp_path)], input=stream,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("training failed before its first checkpoint: [rank1]: RuntimeError: CUDA error: "
                                     "an illegal memory access was encountered; fix the cause above and launch again")


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


def test_a_mistake_in_the_classification_command_is_one_line_before_any_folder_or_process(tmp_path):
    """train_timm.sh runs train_timm.py --check-args first: an unknown option, a value out of range
    or a mistyped model name is one error line, exit 2, no run folder, no torchrun."""
    for split in ("train", "val"):
        (tmp_path / "datasets" / "TINY" / split / "class0").mkdir(parents=True)
    env = dict(os.environ, PACAVIT_WORK_DIRS=str(tmp_path / "work_dirs"), PACAVIT_DATASETS=str(tmp_path / "datasets"),
               PYTHON=sys.executable, PACAVIT_DEVICE="cpu")

    def launch(model, *others):
        return subprocess.run(["bash", str(REPO / "classification" / "train_timm.sh"), "configs/digits_demo.yml", model,
                               "TINY", "32", "1", "0", "e", "t", "0", "1", "0", "", *others], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)

    for model, others, message in [
        ("pacavit_tiny_p2cconv_100_0", ["--bogus"], "train_timm.py: error: unrecognized arguments: --bogus"),
        ("pacavit_tiny_p2cconv_100_0", ["--grad-accumulation-steps", "0"],
         "train_timm.py: error: --grad-accumulation-steps must be at least 1, got 0"),
        ("pacavit_tiny_p2cconv_100", [], "error: unknown model 'pacavit_tiny_p2cconv_100'. Did you mean"),
    ]:
        result = launch(model, *others)
        assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
        assert "torchrun" not in result.stdout + result.stderr
    assert not (tmp_path / "work_dirs").exists()


def test_a_mistake_in_the_validation_command_is_one_line_before_torchrun(tmp_path):
    """validate.sh runs validate.py --check-args first: an unknown option, a mistyped model name or a
    missing split is one error line, exit 2, and no torchrun."""
    (tmp_path / "datasets" / "TINY" / "val" / "class0").mkdir(parents=True)
    env = dict(os.environ, PACAVIT_DATASETS=str(tmp_path / "datasets"), PYTHON=sys.executable, PACAVIT_DEVICE="cpu")

    def launch(model, *others):
        return subprocess.run(["bash", str(REPO / "classification" / "validate.sh"), model, "pretrained", "TINY", "32",
                               "0", "1", *others], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=300)

    for model, others, message in [
        ("pacavit_tiny_p2cconv_100_0", ["--bogus"], "validate.py: error: unrecognized arguments: --bogus"),
        ("pacavit_tiny_p2cconv_100_0", ["-b", "0"], "validate.py: error: --batch-size must be at least 1, got 0"),
        ("pacavit_tiny_p2cconv_100", [], "error: unknown model 'pacavit_tiny_p2cconv_100'. Did you mean"),
        ("pacavit_tiny_p2cconv_100_0", ["--split", "test"], f"error: dataset folder {tmp_path}/datasets/TINY/test "
                                                             "not found"),
    ]:
        result = launch(model, *others)
        assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
        assert "torchrun" not in result.stdout + result.stderr
