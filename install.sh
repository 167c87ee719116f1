#!/usr/bin/env bash
# Installs the PaCa-ViT environment: torch, timm and the OpenMMLab stack (mmcv with compiled ops),
# all pinned in requirements.txt, then the explorer page's extras (requirements-explorer.txt), and
# compiles the project's bfloat16 CPU kernels (about 25 s; not fatal where they cannot be built).
# Idempotent: a rerun checks the installed versions and skips what is there.
#
#   ./install.sh                   virtualenv in <repo>/.venv (or $PACAVIT_VENV)
#   ./install.sh --conda NAME      conda environment NAME from environment.yaml (also: ./install.sh NAME)
#   ./install.sh --with-xformers   also install xformers (memory-efficient attention on CUDA)
#
# Inside an active conda environment other than base, it installs into that environment.
# Environment knobs (all optional):
#   TORCH_VERSION, TORCHVISION_VERSION   other torch/torchvision releases than the pinned ones
#   TORCH_INDEX_URL                      index to take torch from, e.g. https://download.pytorch.org/whl/cu128
#   PIP_FIND_LINKS                       folders with prebuilt wheels (a mmcv wheel there is used, not rebuilt)
#   PACAVIT_WHEEL_CACHE                  where a mmcv wheel built here is kept (default <repo>/.cache/wheels)
#   PACAVIT_KERNEL_CACHE                 where the bfloat16 CPU kernels are compiled (default <repo>/.cache/kernels)
#   PACAVIT_PYTHON                       interpreter that creates the virtualenv (default python3)
#   FORCE_CUDA=1                         build mmcv's CUDA ops even where no GPU is visible (needs nvcc)
#   TORCH_CUDA_ARCH_LIST                 GPU architectures of mmcv's CUDA ops, e.g. '8.0;9.0' (default: the
#                                        visible GPUs', else all of torch's)
#   MAX_JOBS                             parallel compile jobs for mmcv (default: cores, at most GiB free / 2)
#   PACAVIT_DEVICE=cpu                   a CPU-only install on a node whose GPUs torch cannot use
#
# On a node with NVIDIA GPUs it stops (naming the fix) when torch cannot use them, and builds mmcv's
# CUDA ops only with an nvcc of torch's CUDA major version; runtime/gpu_check.py does these checks.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQUIREMENTS="$REPO/requirements.txt"
WHEEL_CACHE="${PACAVIT_WHEEL_CACHE:-$REPO/.cache/wheels}"
STEP="start"
HINT=""

usage() {
    sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

on_error() {
    local status=$?
    # a failing command substitution or subshell reports nothing itself: the main shell does, once
    [[ $BASHPID == "$$" ]] || exit "$status"
    echo >&2
    echo "install.sh: FAILED (exit $status) at step: $STEP" >&2
    [[ -z "$HINT" ]] || echo "  hint: $HINT" >&2
    echo "  The environment is not ready. Fix the cause and rerun ./install.sh (finished steps are skipped)." >&2
    exit "$status"
}
trap on_error ERR

step() {
    STEP="$1"
    HINT="${2:-}"
    echo "==> $STEP"
}

fail() {
    HINT="$1"
    false
}

# --------------------------------------------------------------------------- arguments
CONDA_NAME=""
WITH_XFORMERS=0
while (($#)); do
    case "$1" in
        --conda)
            [[ $# -ge 2 && "$2" != -* ]] || { echo "install.sh: --conda needs an environment name" >&2; exit 2; }
            CONDA_NAME="$2"
            shift 2
            ;;
        --with-xformers) WITH_XFORMERS=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "install.sh: unknown option '$1' (see ./install.sh --help)" >&2; exit 2 ;;
        *) CONDA_NAME="$1"; shift ;;
    esac
done

# --------------------------------------------------------------------------- pins
# the name==version lines of a requirements file (default: requirements.txt)
pins() {
    sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "${1:-$REQUIREMENTS}"
}

pin_of() {
    pins | grep -i "^$1==" || { echo "install.sh: requirements.txt has no 'name==version' line for $1" >&2; return 1; }
}

# the pins installed in steps of their own; every other line goes into one pip call
OWN_STEP_PACKAGES='pip|setuptools|ninja|torch|torchvision|mmcv|xformers'

TORCH_PIN="torch==${TORCH_VERSION:-$(pin_of torch | cut -d= -f3)}"
TORCHVISION_PIN="torchvision==${TORCHVISION_VERSION:-$(pin_of torchvision | cut -d= -f3)}"
MMCV_PIN="$(pin_of mmcv)"

# --------------------------------------------------------------------------- pip's wheel folders
# A PIP_FIND_LINKS set by the caller replaces the find-links of the machine's pip configuration instead of
# adding to them, so keep both. Relative folders are made absolute: pip also runs from other folders here.
absolute_links() {
    local link
    for link in "$@"; do
        if [[ "$link" == *://* || "$link" == /* ]]; then
            echo "$link"
        else
            realpath -m "$link"
        fi
    done
}

configured_links="$("${PACAVIT_PYTHON:-python3}" -m pip config get global.find-links 2>/dev/null || true)"
# shellcheck disable=SC2086  # the lists are whitespace separated, as pip reads them
PIP_FIND_LINKS="$(absolute_links ${PIP_FIND_LINKS:-} $configured_links | awk '!seen[$0]++' | paste -sd' ')"
if [[ -n "$PIP_FIND_LINKS" ]]; then export PIP_FIND_LINKS; else unset PIP_FIND_LINKS; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# --------------------------------------------------------------------------- the environment's python
if [[ -n "$CONDA_NAME" ]]; then
    step "conda environment '$CONDA_NAME' from environment.yaml" \
        "conda could not create or run the environment; read its message above (channel access? disk space?)"
    command -v conda >/dev/null || fail "conda is not on PATH: install Miniforge, or run ./install.sh without a name for a virtualenv"
    if ! conda env list | awk -v name="$CONDA_NAME" '$1 == name {found = 1} END {exit !found}'; then
        conda env create --quiet --name "$CONDA_NAME" --file "$REPO/environment.yaml"
    fi
    PY="$(conda run --name "$CONDA_NAME" python -c 'import sys; print(sys.executable)')"
    ENV_NAME="conda environment '$CONDA_NAME' (conda activate $CONDA_NAME)"
elif [[ -n "${CONDA_PREFIX:-}" && "${CONDA_DEFAULT_ENV:-base}" != base ]]; then
    step "active conda environment '$CONDA_DEFAULT_ENV'"
    PY="$CONDA_PREFIX/bin/python"
    ENV_NAME="conda environment '$CONDA_DEFAULT_ENV' (conda activate $CONDA_DEFAULT_ENV)"
else
    VENV="${PACAVIT_VENV:-$REPO/.venv}"
    step "virtualenv $VENV" \
        "needs Python >= 3.10 with venv (Debian: apt-get install python3-venv); pick one with PACAVIT_PYTHON=/path/to/python3"
    if [[ ! -x "$VENV/bin/python" ]]; then
        [[ ! -e "$VENV" ]] || fail "$VENV exists but has no working bin/python: remove it (rm -rf $VENV) and rerun"
        "${PACAVIT_PYTHON:-python3}" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    ENV_NAME="virtualenv $VENV (source $VENV/bin/activate)"
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); torch $TORCH_PIN needs >= 3.10"

pip_install() {
    "$PY" -m pip install --progress-bar off "$@"
}

# Prints the pins (name==version) that the environment does not have. Local version labels are ignored,
# so torch==2.14.1 is satisfied by a CUDA build 2.14.1+cu128.
unsatisfied() {
    "$PY" - "$@" <<'EOF'
import re
import sys
from importlib import metadata

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
for pin in sys.argv[1:]:
    name, _, version = pin.partition("==")
    if installed.get(canonical(name), "").split("+")[0] != version:
        print(pin)
EOF
}

# Added to the pip calls of ensure: the index of the torch step, then the torch pins, so that no later
# dependency can replace the torch build installed first.
ENSURE_EXTRA_ARGS=()

# Installs the pins given as arguments that are missing; says so when none is.
ensure() {
    local missing
    missing="$(unsatisfied "$@")"
    if [[ -z "$missing" ]]; then
        if (($# > 3)); then echo "    already installed: all $# pins"; else echo "    already installed: $*"; fi
        return
    fi
    # shellcheck disable=SC2086  # one pin per word
    pip_install $missing "${ENSURE_EXTRA_ARGS[@]}"
}

# --------------------------------------------------------------------------- packages
step "build tools ($(pins | grep -E '^(pip|setuptools|ninja)==' | paste -sd' '))" \
    "pip could not reach the package index; check the network or proxy settings (PIP_INDEX_URL)"
# shellcheck disable=SC2046
ensure $(pins | grep -E '^(pip|setuptools|ninja)==')

step "$TORCH_PIN $TORCHVISION_PIN${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}" \
    "set TORCH_INDEX_URL for another CPU/CUDA build, TORCH_VERSION/TORCHVISION_VERSION for another (matching) release; a pip constraint file can cap them (pip config list)"
ENSURE_EXTRA_ARGS=(${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"})
ensure "$TORCH_PIN" "$TORCHVISION_PIN"
ENSURE_EXTRA_ARGS=("$TORCH_PIN" "$TORCHVISION_PIN")

step "torch can use this node's GPUs (if any)" \
    "the line above names the fix; PACAVIT_DEVICE=cpu ./install.sh installs for the CPU on purpose"
"$PY" "$REPO/runtime/gpu_check.py" device >/dev/null

step "timm, OpenMMLab, test tools, ecosystem extras (PEFT, ONNX) and their locked dependencies (requirements.txt)" \
    "pip could not install a pin of requirements.txt; its message above names the package"
# shellcheck disable=SC2046
ensure $(pins | grep -viE "^($OWN_STEP_PACKAGES)==")

step "explorer page extras: Gradio and the browser-test driver Playwright (requirements-explorer.txt)" \
    "pip could not install a pin of requirements-explorer.txt; its message above names the package"
# shellcheck disable=SC2046
ensure $(pins "$REPO/requirements-explorer.txt")

if ((WITH_XFORMERS)); then
    step "$(pin_of xformers)" "xformers wheels exist only for some torch/CUDA pairs: pick a matching pin in requirements.txt"
    ensure "$(pin_of xformers)"
fi

# --------------------------------------------------------------------------- timm's own model tests
# The pacavit models are checked with timm's test suite, which ships only in timm's source distribution.
TIMM_PIN="$(pin_of timm)"
TIMM_SDIST_DIR="$REPO/.cache/sdist"
TIMM_TESTS="$REPO/.cache/${TIMM_PIN/==/-}/tests"
step "timm's model tests from the $TIMM_PIN source distribution into ${TIMM_TESTS#"$REPO/"}" \
    "pip could not download the timm source; offline? put ${TIMM_PIN/==/-}.tar.gz into $TIMM_SDIST_DIR"
if [[ -f "$TIMM_TESTS/test_models.py" ]]; then
    echo "    already unpacked"
else
    mkdir -p "$TIMM_SDIST_DIR"
    if [[ ! -f "$TIMM_SDIST_DIR/${TIMM_PIN/==/-}.tar.gz" ]]; then
        "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$TIMM_SDIST_DIR" "$TIMM_PIN"
    fi
    HINT="$TIMM_SDIST_DIR/${TIMM_PIN/==/-}.tar.gz has no tests/ folder: remove it and rerun"
    unpack_dir="$(mktemp -d "$TIMM_SDIST_DIR/unpack.XXXXXX")"
    tar -xzf "$TIMM_SDIST_DIR/${TIMM_PIN/==/-}.tar.gz" -C "$unpack_dir" "${TIMM_PIN/==/-}/tests"
    # moved into place whole, so an interrupted run never leaves a half-unpacked folder that looks done
    rm -rf "$TIMM_TESTS"
    mkdir -p "$(dirname "$TIMM_TESTS")"
    mv "$unpack_dir/${TIMM_PIN/==/-}/tests" "$TIMM_TESTS"
    rm -rf "$unpack_dir"
    echo "    unpacked $(find "$TIMM_TESTS" -name '*.py' | wc -l) files"
fi

# --------------------------------------------------------------------------- mmcv with compiled ops
# CUDA ops wherever torch sees a GPU (a CPU-only mmcv would fail at the first NMS on it); FORCE_CUDA=1
# asks for them on a GPU-less build node.
if [[ "${FORCE_CUDA:-0}" == 1 ]] || "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    MMCV_CUDA=1
else
    MMCV_CUDA=0
fi

# Succeeds when mmcv imports at the pinned version and its compiled ops run (CUDA ops too where wanted).
mmcv_works() {
    "$PY" - "${MMCV_PIN#mmcv==}" "$MMCV_CUDA" <<'EOF'
import sys
import torch
import mmcv
from mmcv.ops import get_compiling_cuda_version, nms

assert mmcv.__version__ == sys.argv[1], f"mmcv {mmcv.__version__} installed, {sys.argv[1]} pinned"
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
_, kept = nms(boxes, torch.tensor([0.9, 0.8]), iou_threshold=0.5)
assert kept.shape[0] == 1, "mmcv.ops.nms gave a wrong result"
if sys.argv[2] == "1" and get_compiling_cuda_version() == "not available":
    raise SystemExit("this mmcv has CPU ops only, CUDA ops are wanted")
if sys.argv[2] == "1" and torch.cuda.is_available():  # a wheel built for other GPUs: "no kernel image"
    nms(boxes.cuda(), torch.tensor([0.9, 0.8], device="cuda"), iou_threshold=0.5)
EOF
}

# Installs mmcv from the wheel folders given as arguments (only those), then checks that its ops work.
install_mmcv_wheel_from() {
    PIP_FIND_LINKS="$*" pip_install --no-index --only-binary mmcv --no-deps --force-reinstall "$MMCV_PIN" \
        >/dev/null 2>&1 && mmcv_works >/dev/null 2>&1
}

# Compiles the ops from mmcv's PyPI source distribution into a wheel in the folder given as argument.
build_mmcv_wheel() {
    local wheel_dir="$1" src_dir="$WHEEL_CACHE/src" build_dir log started line done_count total elapsed eta
    build_dir="$(mktemp -d "${TMPDIR:-/tmp}/mmcv-build.XXXXXX")"
    log="$WHEEL_CACHE/${MMCV_PIN/==/-}-build.log"
    mkdir -p "$src_dir" "$wheel_dir"

    if ! compgen -G "$src_dir/${MMCV_PIN/==/-}.tar.gz" >/dev/null; then
        HINT="pip could not download the mmcv source; offline? put ${MMCV_PIN/==/-}.tar.gz into $src_dir"
        # pip runs the sdist's setup.py to read its metadata, and that imports pkg_resources,
        # which setuptools 81 and later no longer ship: allow an older setuptools for that step only.
        echo 'setuptools<81' >"$build_dir/build-constraints.txt"
        "$PY" -m pip download --quiet --no-deps --no-binary mmcv --build-constraint "$build_dir/build-constraints.txt" \
            --dest "$src_dir" "$MMCV_PIN"
    fi
    tar -xzf "$src_dir/${MMCV_PIN/==/-}.tar.gz" -C "$build_dir"

    HINT="patching mmcv's setup.py failed: the source layout is not the one of $MMCV_PIN"
    "$PY" - "$build_dir/${MMCV_PIN/==/-}/setup.py" <<'EOF'
import re
import sys

import torch
from packaging.version import Version

path = sys.argv[1]
with open(path) as f:
    source = f.read()
# torch >= 2.10 headers use C++20, but mmcv's setup.py passes -std=c++14/c++17 to the compilers, which
# comes after torch's own flag and wins: the build then fails in torch's headers. Ask for C++20 instead.
if Version(torch.__version__).release >= (2, 10):
    source, count = re.subn(r"([-/]std[=:])c\+\+1[47]", r"\1c++20", source)
    assert count, "no -std flag found in setup.py"
# setuptools >= 81 no longer ships pkg_resources; the three names setup.py takes from it exist elsewhere.
old_import = "from pkg_resources import DistributionNotFound, get_distribution, parse_version"
assert old_import in source, "setup.py no longer imports pkg_resources as expected"
source = source.replace(
    old_import,
    "from importlib.metadata import PackageNotFoundError as DistributionNotFound\n"
    "from importlib.metadata import distribution as get_distribution\n"
    "from packaging.version import parse as parse_version",
)
with open(path, "w") as f:
    f.write(source)
EOF

    HINT="the mmcv build failed; the compiler's messages are in $log (needs g++ >= 10 for C++20, and nvcc for CUDA ops)"
    echo "    compiling mmcv's ops ($([[ $MMCV_CUDA == 1 ]] && echo CUDA+CPU || echo CPU)); this takes 20-40 min on 2 cores, log: $log"
    started=$SECONDS
    : >"$log"
    # ninja prints "[done/total] command" per source file: turn that into a progress line with an ETA.
    # CUDA_VISIBLE_DEVICES is emptied for a CPU build: setup.py would otherwise compile CUDA ops for any visible GPU.
    (
        cd "$build_dir/${MMCV_PIN/==/-}"
        MAX_JOBS="${MAX_JOBS:-$MMCV_BUILD_JOBS}"
        PATH="$(dirname "$PY"):$PATH"  # the ninja installed next to python
        export MMCV_WITH_OPS=1 FORCE_CUDA="$MMCV_CUDA" MAX_JOBS PATH
        if [[ $MMCV_CUDA == 1 ]]; then export TORCH_CUDA_ARCH_LIST="$MMCV_CUDA_ARCHS"; else export CUDA_VISIBLE_DEVICES=""; fi
        "$PY" -m pip wheel --verbose --no-build-isolation --no-deps --wheel-dir "$wheel_dir" . 2>&1
    ) | while IFS= read -r line; do
        printf '%s\n' "$line" >>"$log"
        if [[ "$line" =~ ^[[:space:]]*\[([1-9][0-9]*)/([0-9]+)\] ]]; then
            done_count=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]} elapsed=$((SECONDS - started))
            eta=$((elapsed * (total - done_count) / done_count))
            printf '    mmcv build: source %d of %d, %dm%02ds elapsed, about %dm%02ds left\n' \
                "$done_count" "$total" $((elapsed / 60)) $((elapsed % 60)) $((eta / 60)) $((eta % 60))
        fi
    done
    rm -rf "$build_dir"
    echo "    built $(ls "$wheel_dir") in $(((SECONDS - started) / 60)) min"
}

step "$MMCV_PIN with compiled $([[ $MMCV_CUDA == 1 ]] && echo CUDA+CPU || echo CPU) ops"
if mmcv_works >/dev/null 2>&1; then
    echo "    already installed, ops work"
else
    # a wheel built here is only valid for the torch, CUDA and GPU architectures it was compiled for:
    # one folder per combination, named after them
    HINT="the line above says what to set or install"
    mmcv_plan="$("$PY" "$REPO/runtime/gpu_check.py" mmcv-wheel "$MMCV_CUDA")"
    read -r variant MMCV_CUDA_ARCHS MMCV_BUILD_JOBS <<<"$mmcv_plan"
    built_dir="$WHEEL_CACHE/$variant"
    if install_mmcv_wheel_from "$built_dir"; then
        echo "    installed the wheel built before in $built_dir"
    elif [[ -n "${PIP_FIND_LINKS:-}" ]] && install_mmcv_wheel_from "$PIP_FIND_LINKS"; then
        echo "    installed a prebuilt wheel from PIP_FIND_LINKS ($PIP_FIND_LINKS)"
    else
        echo "    no working $MMCV_PIN wheel in $built_dir or PIP_FIND_LINKS: building it from source"
        if [[ $MMCV_CUDA == 1 ]]; then
            HINT="the line above says which CUDA toolkit to put on PATH"
            "$PY" "$REPO/runtime/gpu_check.py" nvcc
            echo "    CUDA ops for the GPU architectures $MMCV_CUDA_ARCHS (TORCH_CUDA_ARCH_LIST)"
        fi
        build_mmcv_wheel "$built_dir"
        HINT="the wheel built in $built_dir does not install or its ops fail; read the error above"
        PIP_FIND_LINKS="$built_dir" pip_install --no-index --only-binary mmcv --no-deps --force-reinstall "$MMCV_PIN"
    fi
    HINT="mmcv installed but its compiled ops fail (error above): remove $built_dir to force a rebuild"
    mmcv_works
fi

# --------------------------------------------------------------------------- this repository
# Installed in place (editable): scripts, tools and tests import models, runtime, tools, classification and the
# mmdet/mmseg plug-ins by name from any folder, and edits to the tree take effect without reinstalling.
step "this repository as the editable package pacavit (pyproject.toml)" \
    "pip could not install the repository itself; its message above names the cause"
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("models", "runtime", "tools", "classification", "mmdet_custom", "mmseg_custom")))' 2>/dev/null \
   || [[ "$("$PY" -c 'import runtime, os; print(os.path.dirname(os.path.dirname(os.path.realpath(runtime.__file__))))' 2>/dev/null)" != "$(realpath "$REPO")" ]]; then
    pip_install --no-deps --no-build-isolation -e "$REPO"
else
    echo "    already installed: $REPO"
fi

# --------------------------------------------------------------------------- the CPU kernels
# Compiled once per torch version into .cache/kernels (models/layers/cpu_kernels.py), so that the first
# bfloat16 run does not wait for them.  Not fatal: without them bfloat16 layers run on PyTorch's ops.
step "the CPU kernels (models/csrc: bfloat16 ones for CPUs with AVX512-BF16, a float32 one for AVX-512 / AVX2)"
if ! "$PY" "$REPO/tools/build_cpu_kernel.py"; then
    echo "    not built: bfloat16 layers will run on PyTorch's and oneDNN's ops (the warning above says why)"
fi

# --------------------------------------------------------------------------- report
step "environment report" "an installed package fails to import; its error is above"
"$PY" - <<'EOF'
import platform
from importlib import metadata

import torch
import torchvision
import timm
import mmengine
import mmcv
import mmdet
import mmseg
import fvcore  # noqa: F401  (FLOPs counting)
import onnx
import onnxruntime
import onnxscript
import peft
from mmcv.ops import RoIAlign, get_compiling_cuda_version, nms

def ops_check(device):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]], device=device)
    _, kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=device), iou_threshold=0.5)
    assert kept.shape[0] == 2, "mmcv.ops.nms gave a wrong result"
    features = torch.arange(64.0, device=device).reshape(1, 1, 8, 8)
    rois = torch.tensor([[0.0, 0.0, 0.0, 7.0, 7.0]], device=device)
    pooled = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2)(features, rois)
    assert pooled.shape == (1, 1, 2, 2) and torch.isfinite(pooled).all(), "mmcv.ops.RoIAlign gave a wrong result"
    return f"nms and RoIAlign run on {device.upper()}"

if torch.cuda.is_available():
    device = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
else:
    device = "CPU only" + (f" (CUDA {torch.version.cuda} build, no GPU visible)" if torch.version.cuda else "")
cuda_ops = get_compiling_cuda_version()
ops = [ops_check("cpu")]
if torch.cuda.is_available() and cuda_ops != "not available":
    ops.append(ops_check("cuda"))
try:
    xformers = metadata.version("xformers")
except metadata.PackageNotFoundError:
    xformers = "not installed (./install.sh --with-xformers)"
rows = [
    ("python", platform.python_version()),
    ("torch", f"{torch.__version__}, {device}"),
    ("torchvision", torchvision.__version__),
    ("timm", timm.__version__),
    ("mmengine", mmengine.__version__),
    ("mmcv", f"{mmcv.__version__}, ops compiled for {'CPU' if cuda_ops == 'not available' else 'CPU+CUDA ' + cuda_ops}"),
    ("mmcv ops", "; ".join(ops)),
    ("mmdet", mmdet.__version__),
    ("mmseg", mmseg.__version__),
    ("peft", peft.__version__),
    ("explorer", f"gradio {metadata.version('gradio')}, playwright {metadata.version('playwright')}"),
    ("onnx", f"{onnx.__version__}, onnxscript {onnxscript.__version__}, onnxruntime {onnxruntime.__version__}"),
    ("xformers", xformers),
]
for name, value in rows:
    print(f"    {name:<12} {value}")
EOF

HINT="the line above names the fix"
"$PY" "$REPO/runtime/gpu_check.py" device --mmcv-ops >/dev/null

echo "install.sh: environment ready: $ENV_NAME"
