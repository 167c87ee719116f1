"""runtime/gpu_check.py and its callers (launchers, install.sh) on GPU nodes, simulated on this GPU-less
machine: ``nvidia-smi`` and ``nvcc`` stubs on PATH, torch.cuda monkeypatched, a fake /dev/nvidia0."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import gpu_check

REPO = Path(__file__).resolve().parents[2]
H100_LIST = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def stub(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """A PATH folder for stubs, searched first; /dev/nvidia0 is never taken from the real machine."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setattr(gpu_check, "NVIDIA_DEVICE_FILES", (str(tmp_path / "dev" / "nvidia0"),))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # GPUs the test's node would hide
    return folder


def smi_with_gpus(bin_dir, driver="550.54.15"):
    stub(bin_dir, "nvidia-smi",
         f'case "$1" in -L) printf "%s\\n" "{H100_LIST}";; *) echo {driver}; echo {driver};; esac')


def gpus_usable_by_torch(monkeypatch, capability=(9, 0), count=2, archs=CU130_ARCHS):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")


def test_no_gpus_means_cpu(bin_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.choose_device() == "cpu"


def test_gpus_that_an_old_driver_hides_from_a_cuda_13_torch_stop_the_launch(bin_dir, monkeypatch):
    smi_with_gpus(bin_dir, driver="535.104.05")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_check.GpuCheckError) as stopped:
        gpu_check.choose_device()
    message = str(stopped.value)
    assert message.startswith("2 NVIDIA GPU(s) on this node (GPU 0: NVIDIA H100 80GB HBM3")
    assert "built for CUDA 13.0, which driver 535.104.05 cannot run" in message
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./install.sh" in message
    assert gpu_check.choose_device("cpu") == "cpu", "PACAVIT_DEVICE=cpu is a CPU run chosen on purpose"


def test_a_device_file_without_nvidia_smi_and_a_cpu_torch(bin_dir, monkeypatch, tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    monkeypatch.setenv("PATH", str(bin_dir))  # no nvidia-smi anywhere
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_check.GpuCheckError, match=r"nvidia0\), but torch .* is a CPU-only build: .*whl/cu128"):
        gpu_check.choose_device()


def test_a_gpu_without_kernels_in_the_torch_build_stops_the_launch(bin_dir, monkeypatch):
    smi_with_gpus(bin_dir)
    gpus_usable_by_torch(monkeypatch, capability=(7, 0))  # V100 under the CUDA 13.0 wheel
    with pytest.raises(gpu_check.GpuCheckError, match=r"GPU 0 \(Tesla V100-SXM2-32GB\) is sm_70, but torch .* has "
                                                      r"kernels only for sm_75, sm_80.*no kernel image.*cu128"):
        gpu_check.choose_device()


@pytest.mark.parametrize("visible, hidden", [
    (None, False), ("0,1", False), ("GPU-5c3e2a1b-0f4d", False), ("MIG-GPU-1/0/0", False),
    ("", True), ("-1", True), ("NoDevFiles", True), ("-1,0", True),  # CUDA stops at the first non-device
])
def test_gpus_hidden_reads_cuda_visible_devices_as_cuda_does(monkeypatch, visible, hidden):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_check.gpus_hidden() == hidden


def test_a_broken_driver_is_named_even_where_its_device_file_exists(bin_dir, monkeypatch, tmp_path):
    """nvidia-smi fails and /dev/nvidia0 exists: the driver is the cause, not the torch build."""
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    stub(bin_dir, "nvidia-smi", 'echo "Failed to initialize NVML: Driver/library version mismatch"; exit 18')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_check.GpuCheckError, match=r"^nvidia-smi is installed but fails \(it exits with status 18: "
                                                      r"Failed to initialize NVML: Driver/library version mismatch\)"):
        gpu_check.choose_device()
    assert gpu_check.choose_device("cpu") == "cpu"


@pytest.mark.parametrize("capability, archs, runs", [
    ((8, 6), ["sm_80"], True),  # a cubin runs on later minors of its major
    ((8, 0), ["sm_86"], False),
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX is compiled for later GPUs by the driver
    ((9, 0), ["sm_80"], False),
])
def test_kernel_compatibility_rules(capability, archs, runs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    assert gpu_check.runs_on(capability, gpu_check._compiled_archs()) == runs


def test_cpu_only_mmcv_under_a_cuda_torch_stops_openmmlab_launches(bin_dir, monkeypatch):
    """This machine's mmcv has CPU ops only: on a GPU node that is caught before training."""
    smi_with_gpus(bin_dir)
    gpus_usable_by_torch(monkeypatch)
    assert gpu_check.choose_device(mmcv_ops=False) == "cuda"  # classification needs no mmcv
    with pytest.raises(gpu_check.GpuCheckError, match=r"mmcv .* has CPU ops only, but torch runs on the GPUs"):
        gpu_check.choose_device(mmcv_ops=True)


def test_launcher_stops_before_torchrun_on_gpus_torch_cannot_use(tmp_path):
    """train_timm.sh on a node whose driver lists GPUs that this (GPU-less) torch cannot use: the
    reason and the fix, exit 2, and no CPU processes started (they were, after one 'note' line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi_with_gpus(bin_dir)
    env = {key: value for key, value in os.environ.items() if key not in ("PACAVIT_DEVICE", "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PACAVIT_WORK_DIRS=str(tmp_path / "work_dirs"),
               PACAVIT_DATASETS=str(tmp_path / "datasets"), PYTHON=sys.executable)
    for split in ("train", "val"):
        (tmp_path / "datasets" / "TINY" / split / "a").mkdir(parents=True)
    result = subprocess.run(
        ["bash", str(REPO / "classification" / "train_timm.sh"), "configs/digits_demo.yml",
         "pacavit_tiny_p2cconv_100_0", "TINY", "32", "0", "0", "gpu_check", "t", "0", "1", "0", "29999"],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "error: 2 NVIDIA GPU(s) on this node" in result.stderr and "whl/cu128" in result.stderr
    assert "torch.distributed.run" not in result.stdout + result.stderr
    assert "note: no CUDA device visible" not in result.stdout


# ---------------------------------------------------------------------------------------------
# install.sh's mmcv build
@pytest.mark.parametrize("cpus, free_gib, jobs", [(64, 32, 16), (2, 64, 2), (8, 1, 1)])
def test_build_jobs_are_bounded_by_memory(cpus, free_gib, jobs):
    assert gpu_check.build_jobs(cpus, free_gib << 30) == jobs


def test_wheel_cache_folder_names_the_gpu_architectures(monkeypatch):
    """A wheel built for A100s is not reused for H100s: the folder differs."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plans = {}
    for archs in ("8.0", "9.0", "8.0;9.0+PTX"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
        plans[archs] = gpu_check.mmcv_wheel_plan(True, cpus=4, available_bytes=64 << 30).split()
    release = torch.__version__.split("+")[0]
    assert plans["8.0"] == [f"torch{release}-cu130-sm80", "8.0", "4"]
    assert plans["9.0"][0] == f"torch{release}-cu130-sm90"
    assert plans["8.0;9.0+PTX"][:2] == [f"torch{release}-cu130-sm80_90ptx", "8.0;9.0+PTX"]
    assert gpu_check.mmcv_wheel_plan(False, cpus=4, available_bytes=4 << 30) == f"torch{release}-cpu - 2"


def test_arch_list_comes_from_the_visible_gpus_else_from_torch(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU130_ARCHS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # FORCE_CUDA=1 on a build node
    assert gpu_check.cuda_arch_list() == "7.5;8.0;8.6;9.0;10.0;12.0"
    gpus_usable_by_torch(monkeypatch, capability=(8, 0))
    assert gpu_check.cuda_arch_list() == "8.0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    with pytest.raises(gpu_check.GpuCheckError, match="set TORCH_CUDA_ARCH_LIST"):
        gpu_check.cuda_arch_list()


def test_nvcc_must_match_torchs_cuda_major(bin_dir, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "none answers on PATH" in gpu_check.nvcc_problem()
    stub(bin_dir, "nvcc", 'echo "Cuda compilation tools, release 12.8, V12.8.93"')
    problem = gpu_check.nvcc_problem()
    assert f"nvcc on PATH ({bin_dir / 'nvcc'}) is CUDA 12.8, but torch" in problem
    assert "built for CUDA 13.0: the major versions must match" in problem
    stub(bin_dir, "nvcc", 'echo "Cuda compilation tools, release 13.1, V13.1.20"')
    assert gpu_check.nvcc_problem() is None


def run_install(tmp_path, bin_dir, **env):
    """install.sh on this repository's own environment.  Without PIP_FIND_LINKS: a CPU mmcv wheel
    there (CI has one) would be force-reinstalled into that environment to try it, while the other
    test process imports mmcv from it (an mmdet training failed with ModuleNotFoundError that way)."""
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(("CONDA", "PACAVIT_DEVICE", "PIP_FIND_LINKS"))}
    clean.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PACAVIT_VENV=str(REPO / ".venv"),
                 PACAVIT_WHEEL_CACHE=str(tmp_path / "wheels"), **env)
    return subprocess.run(["bash", str(REPO / "install.sh")], env=clean, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_install_stops_right_after_torch_on_gpus_it_cannot_use(tmp_path):
    """(It built a CPU-only mmcv before, with no word about the GPUs.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi_with_gpus(bin_dir)
    result = run_install(tmp_path, bin_dir)
    assert result.returncode != 0
    assert "error: 2 NVIDIA GPU(s) on this node" in result.stderr and "whl/cu128" in result.stderr
    assert "at step: torch can use this node's GPUs (if any)" in result.stderr
    assert "mmcv" not in result.stdout.split("torch can use this node's GPUs")[1]


@pytest.mark.slow
def test_install_checks_nvcc_before_a_forced_cuda_build(tmp_path):
    """FORCE_CUDA=1 on this GPU-less node: the architectures default to torch's, and an nvcc of
    another CUDA major version stops the install before compiling, naming both versions."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir, "nvcc", 'echo "Cuda compilation tools, release 12.8, V12.8.93"')
    mmcv_init = Path(importlib.util.find_spec("mmcv").origin)
    installed = mmcv_init.stat().st_mtime_ns
    result = run_install(tmp_path, bin_dir, FORCE_CUDA="1")
    assert mmcv_init.stat().st_mtime_ns == installed, "the environment's mmcv was reinstalled"
    assert result.returncode != 0
    assert f"nvcc on PATH ({bin_dir / 'nvcc'}) is CUDA 12.8, but torch" in result.stderr
    assert f"built for CUDA {torch.version.cuda}" in result.stderr
    assert "compiling mmcv's ops" not in result.stdout
    assert not (tmp_path / "wheels").exists() or not any((tmp_path / "wheels").rglob("*.whl"))
