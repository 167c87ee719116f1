#!/usr/bin/env python
"""Can this node's torch (and mmcv) use its NVIDIA GPUs?  Asked before a launch and by install.sh.

    python runtime/gpu_check.py device [--mmcv-ops]   print the device to run on (cuda|cpu), or stop
    python runtime/gpu_check.py mmcv-wheel CUDA       print install.sh's mmcv build plan (CUDA: 0|1)
    python runtime/gpu_check.py nvcc                  stop unless nvcc can build CUDA ops for this torch

``device`` stops (exit 2, one ``error:`` line with the fix) where a silent CPU run would follow:
the driver lists GPUs (``nvidia-smi -L``, or ``/dev/nvidia0`` exists) but torch cannot use them
(a CPU build, a driver older than the wheel's CUDA, no kernels for the GPU's architecture), an
installed ``nvidia-smi`` fails or hangs (a broken driver) while torch sees no GPU, or,
with ``--mmcv-ops`` (detection, segmentation), mmcv's compiled ops are CPU-only while torch runs
on the GPUs (the first NMS would fail, hours in).  PACAVIT_DEVICE=cpu skips the check: a CPU run
on a GPU node is then chosen, not fallen into; so does a CUDA_VISIBLE_DEVICES that names no device
(empty, -1, SLURM's NoDevFiles), which the launcher's note then names.  nvidia-smi is given
PACAVIT_NVIDIA_SMI_TIMEOUT seconds (default 30) to answer.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

import torch

# what the NVIDIA driver creates for the first GPU, where nvidia-smi is not installed
NVIDIA_DEVICE_FILES = ("/dev/nvidia0",)
CUDA_WHEEL_FIX = ("install a torch build for this driver and GPU, e.g. the CUDA 12.8 one: "
                  "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./install.sh")
CPU_ON_PURPOSE = "(to run on the CPU anyway: PACAVIT_DEVICE=cpu)"
# parallel compile jobs per GiB of free memory: an nvcc or g++ job of mmcv's ops takes up to ~2 GiB
GIB_PER_BUILD_JOB = 2


class GpuCheckError(RuntimeError):
    """The node's GPUs, torch, mmcv or nvcc do not fit together; the message says how to fix it."""


def _run(command: Sequence[str]) -> str:
    """A command's stdout, or '' where it is missing, fails or hangs (a broken driver can)."""
    if shutil.which(command[0]) is None:
        return ""
    try:
        return subprocess.run(list(command), capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def nvidia_smi_list() -> Tuple[List[str], Optional[str]]:
    """``nvidia-smi -L``'s GPU lines, and what went wrong with an installed nvidia-smi (None: it is
    not installed, or it answered).  One that fails or hangs marks a node whose driver is broken or
    mid-update, not a CPU machine: the launch must not fall back to CPU processes there."""
    if shutil.which("nvidia-smi") is None:
        return [], None
    timeout = float(os.environ.get("PACAVIT_NVIDIA_SMI_TIMEOUT", 30))
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"it did not answer within {timeout:g} s"
    except OSError as err:
        return [], f"it could not be started ({err})"
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        return [], f"it exits with status {done.returncode}" + (f": {said[0].strip()}" if said else "")
    return [line.strip() for line in done.stdout.splitlines() if line.startswith("GPU ")], None


def gpus_hidden() -> bool:
    """CUDA_VISIBLE_DEVICES set to no device ('', -1, SLURM's NoDevFiles): GPUs hidden on purpose.

    CUDA reads the list up to its first entry that names no device, so the first entry decides.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return False
    first = visible.split(",")[0].strip()
    return not re.fullmatch(r"\d+|GPU-[0-9A-Fa-f-]+|MIG-.+", first)


def driver_version() -> str:
    versions = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split()
    return f"driver {versions[0]}" if versions else "the installed driver"


def _compiled_archs() -> List[tuple]:
    """(major, minor, is_ptx) of the GPU code in this torch build: sm_XY cubins and compute_XY PTX."""
    archs = []
    for name in torch.cuda.get_arch_list():
        kind, _, digits = name.partition("_")
        archs.append((int(digits[:-1]), int(digits[-1]), kind == "compute"))
    return archs


def runs_on(capability: tuple, archs: List[tuple]) -> bool:
    """A cubin runs on its own major version at an equal or higher minor; PTX on any later GPU."""
    major, minor = capability
    return any((m == major and n <= minor) or (ptx and (m, n) <= (major, minor)) for m, n, ptx in archs)


def unusable_gpus_problem() -> Optional[str]:
    """Why torch cannot use the GPUs the driver shows (None: it can, or there are none, or they
    are hidden on purpose)."""
    if gpus_hidden():
        return None
    listed, failure = nvidia_smi_list()
    if failure and not torch.cuda.is_available():
        return (f"nvidia-smi is installed but fails ({failure}): the NVIDIA driver of this node is not working, "
                f"so torch sees no GPU. Fix the driver (after a driver update the node usually needs a reboot; "
                f"`nvidia-smi` alone shows the problem) {CPU_ON_PURPOSE}")
    gpus = listed or [path for path in NVIDIA_DEVICE_FILES if os.path.exists(path)]
    if not gpus:
        return None
    shown = f"{len(gpus)} NVIDIA GPU(s) on this node ({gpus[0]})"
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        else:
            why = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which {driver_version()} cannot "
                   f"run (torch.cuda.is_available() is False: CUDA 13.0 needs driver R580 or newer, 12.8 R570)")
        return f"{shown}, but {why}: {CUDA_WHEEL_FIX} {CPU_ON_PURPOSE}"
    archs = _compiled_archs()
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if not runs_on(capability, archs):
            return (f"GPU {index} ({torch.cuda.get_device_name(index)}) is sm_{capability[0]}{capability[1]}, "
                    f"but torch {torch.__version__} has kernels only for {', '.join(torch.cuda.get_arch_list())} "
                    f"(every CUDA call would fail with 'no kernel image'): {CUDA_WHEEL_FIX} {CPU_ON_PURPOSE}")
    return None


def mmcv_ops_problem() -> Optional[str]:
    """Why mmcv's compiled ops cannot run next to a torch that uses the GPUs (None: they can)."""
    import mmcv
    from mmcv.ops import get_compiling_cuda_version

    if get_compiling_cuda_version() != "not available":
        return None
    return (f"mmcv {mmcv.__version__} has CPU ops only, but torch runs on the GPUs (NMS and RoIAlign would fail at "
            f"the first step): rebuild it with CUDA ops by rerunning ./install.sh on this GPU node with the CUDA "
            f"{torch.version.cuda} toolkit's nvcc on PATH {CPU_ON_PURPOSE}")


def choose_device(requested: str = "", mmcv_ops: bool = False) -> str:
    """'cuda' or 'cpu' for a launch; raises GpuCheckError instead of a silent CPU run on a GPU node."""
    if requested == "cpu":
        return "cpu"
    problem = unusable_gpus_problem() or (mmcv_ops and torch.cuda.is_available() and mmcv_ops_problem())
    if problem:
        raise GpuCheckError(problem)
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# install.sh's mmcv build
def build_jobs(cpus: int, available_bytes: int) -> int:
    """Parallel compile jobs: one per core, as far as the free memory carries them."""
    return max(1, min(cpus, available_bytes // (GIB_PER_BUILD_JOB << 30)))


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def cuda_arch_list() -> str:
    """The GPU architectures to compile mmcv's CUDA ops for, as TORCH_CUDA_ARCH_LIST spells them:
    the variable itself, else the visible GPUs', else (a build node without GPUs) torch's own."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return ";".join(re.split(r"[;,\s]+", given))
    if torch.cuda.is_available():
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in capabilities)
    archs = sorted({(major, minor) for major, minor, _ in _compiled_archs()})
    if not archs:
        raise GpuCheckError("FORCE_CUDA=1 without a visible GPU, and torch names no architectures to build for: "
                            "set TORCH_CUDA_ARCH_LIST to the GPUs' compute capabilities, e.g. "
                            "TORCH_CUDA_ARCH_LIST='8.0;9.0' for A100 and H100")
    return ";".join(f"{major}.{minor}" for major, minor in archs)


def mmcv_wheel_plan(cuda: bool, cpus: int, available_bytes: int) -> str:
    """'FOLDER ARCHS JOBS': the wheel-cache folder of this torch/CUDA/architectures, the
    TORCH_CUDA_ARCH_LIST to build with ('-' for CPU ops only) and the default MAX_JOBS."""
    release = torch.__version__.split("+")[0]
    if not cuda:
        return f"torch{release}-cpu - {build_jobs(cpus, available_bytes)}"
    if torch.version.cuda is None:
        raise GpuCheckError(f"mmcv's CUDA ops need a CUDA build of torch, and torch {torch.__version__} is CPU-only: "
                            f"{CUDA_WHEEL_FIX}")
    archs = cuda_arch_list()
    tag = "sm" + "_".join(arch.replace(".", "").replace("+PTX", "ptx") for arch in archs.split(";"))
    return f"torch{release}-cu{torch.version.cuda.replace('.', '')}-{tag} {archs} {build_jobs(cpus, available_bytes)}"


def nvcc_problem() -> Optional[str]:
    """Why nvcc on PATH cannot build CUDA ops for this torch (None: it can)."""
    version = re.search(r"release (\d+)\.(\d+)", _run(["nvcc", "--version"]))
    if version is None:
        return (f"mmcv's CUDA ops need nvcc, and none answers on PATH: install the CUDA {torch.version.cuda} "
                f"toolkit and put its bin/ on PATH (or export CUDA_HOME and add $CUDA_HOME/bin)")
    if version.group(1) != torch.version.cuda.split(".")[0]:
        return (f"nvcc on PATH ({shutil.which('nvcc')}) is CUDA {version.group(1)}.{version.group(2)}, but torch "
                f"{torch.__version__} is built for CUDA {torch.version.cuda}: the major versions must match. Put the "
                f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit first on PATH, or install the torch build for "
                f"your toolkit (e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for CUDA 12.8)")
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    device = commands.add_parser("device", help="the device a launch runs on (cuda|cpu)")
    device.add_argument("--mmcv-ops", action="store_true", help="the run needs mmcv's compiled ops on the GPU")
    wheel = commands.add_parser("mmcv-wheel", help="install.sh's mmcv build plan")
    wheel.add_argument("cuda", choices=("0", "1"), help="1: CUDA and CPU ops, 0: CPU ops only")
    commands.add_parser("nvcc", help="check nvcc against torch's CUDA version")
    args = parser.parse_args(argv)
    try:
        if args.command == "device":
            print(choose_device(os.environ.get("PACAVIT_DEVICE", ""), args.mmcv_ops))
        elif args.command == "mmcv-wheel":
            print(mmcv_wheel_plan(args.cuda == "1", len(os.sched_getaffinity(0)), available_memory()))
        else:
            problem = nvcc_problem()
            if problem:
                raise GpuCheckError(problem)
    except GpuCheckError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
