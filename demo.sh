#!/usr/bin/env bash
# The demo in one command on a fresh Debian/Ubuntu machine with Python 3.10+: a virtual environment (.venv) with the
# requirements, the Fashion-MNIST package, then demo.py: DMJD pre-training and linear probes on the CPU.
#
#   bash demo.sh                 # everything; extra arguments go to demo.py (see `python demo.py --help`)
#   bash demo.sh --setup         # only the virtual environment, e.g. for the tests: .venv/bin/python -m pytest -q tests
#
# Without an NVIDIA GPU the environment gets PyTorch's CPU-only build (about 200 MB instead of several GB of CUDA
# libraries); TORCH_INDEX_URL chooses another index. A PyTorch already installed on the system is reused when it
# passes the check below. The check: torch and torchvision import and a torchvision operator runs. An install that
# fails or does not pass it is repaired once from the default index (a matching pair), then checked again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
CPU_INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
DATA_PACKAGE=dataset-fashion-mnist
DATA_DIR=/usr/share/datasets/fashion-mnist
VENV_PYTHON=.venv/bin/python
# Prints "torch X, torchvision Y" (read from the installed metadata, so a pair that fails to import is named too),
# imports both and runs torchvision.ops.nms, the operator a torchvision built for another torch lacks.
TORCH_CHECK='
import importlib.metadata as metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(not installed)"
print("torch", version("torch") + ", torchvision", version("torchvision"), flush=True)
import torch, torchvision
torchvision.ops.nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5)
print("import torch, torchvision and torchvision.ops.nms work",
      "(CUDA available)" if torch.cuda.is_available() else "(CPU)")
'

step() { printf '\n== %s\n' "$*"; }
pip_install() { "$VENV_PYTHON" -m pip install --disable-pip-version-check "$@"; }

# Sets CHECKED to the check's output; succeeds when the pair works.
check_torch() { CHECKED=$("$VENV_PYTHON" -c "$TORCH_CHECK" 2>&1); }
versions() { printf '%s\n' "$CHECKED" | grep -m1 '^torch ' || echo "torch and torchvision (versions unknown)"; }
failure() { printf '%s\n' "$CHECKED" | grep -v '^torch ' | grep . | tail -n 1; }

install_torch() {
    if check_torch; then
        step "PyTorch found and working: $(versions)"
        return
    fi
    if printf '%s\n' "$CHECKED" | grep -q '^torch [0-9]'; then  # something is installed but does not work
        step "PyTorch found but not working ($(versions): $(failure)); installing a pair into .venv"
    fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        step "installing PyTorch with CUDA (an NVIDIA GPU was found; several GB, a few minutes)"
        pip_install --ignore-installed torch torchvision || true
        check_torch || torch_error  # the repair below would repeat this same install
        step "PyTorch installed and checked: $(versions)"
        return
    fi
    local why
    step "no NVIDIA GPU found: installing PyTorch's CPU-only build from $CPU_INDEX (about 200 MB)"
    # 2 retries, not pip's 5: an unreachable index fails sooner
    if ! pip_install --retries 2 --ignore-installed --index-url "$CPU_INDEX" torch torchvision; then
        why="$CPU_INDEX could not be used (unreachable, or it has no build for this Python)"
    elif ! check_torch; then
        why="the pair installed from $CPU_INDEX does not work ($(versions): $(failure))"
    else
        step "PyTorch installed and checked: $(versions)"
        return
    fi
    step "repairing once: $why. Installing a matching torch and torchvision from the default index instead" \
        "(on Linux x86-64 the build with CUDA libraries: about 3 GB to download, an estimated 5 to 15 minutes at" \
        "30 to 100 Mbit/s; set TORCH_INDEX_URL to a reachable index of CPU wheels to avoid it)"
    pip_install --ignore-installed torch torchvision || true
    if check_torch; then
        step "PyTorch installed and checked: $(versions)"
        return
    fi
    torch_error
}

torch_error() {
    {
        echo "error: $(versions) do not work together in .venv: $(failure)"
        echo "Install a matching pair by hand, then run this script again:"
        echo "    $VENV_PYTHON -m pip install --ignore-installed torch torchvision"
        echo "(or the pair for your platform from https://pytorch.org/get-started/locally/)"
    } >&2
    exit 1
}

setup_venv() {
    if [ ! -x "$VENV_PYTHON" ]; then
        step "creating the virtual environment .venv (it sees the system's packages, so a working PyTorch is reused)"
        "$PYTHON" -m venv --system-site-packages .venv
    fi
    install_torch
    step "installing the other requirements into .venv (requirements.txt)"
    pip_install --quiet -r requirements.txt
    check_torch || torch_error  # the requirements must not have changed a working pair
    printf '%s\n' "$CHECKED"
}

install_data() {
    [ -d "$DATA_DIR" ] && return
    if ! command -v apt-get >/dev/null 2>&1; then
        step "no apt-get here: the demo downloads Fashion-MNIST with torchvision instead"
        return
    fi
    local install="apt-get update -qq && apt-get install -y -qq $DATA_PACKAGE"
    if [ "$(id -u)" -eq 0 ]; then
        step "installing the Fashion-MNIST package ($DATA_PACKAGE, 30 MB)"
        bash -c "$install" || step "could not install $DATA_PACKAGE: the demo downloads Fashion-MNIST instead"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        step "installing the Fashion-MNIST package ($DATA_PACKAGE, 30 MB) with sudo"
        sudo -n bash -c "$install" || step "could not install $DATA_PACKAGE: the demo downloads Fashion-MNIST instead"
    else
        step "the Fashion-MNIST package needs root to install; to use it, run once and start the demo again:"
        echo "    sudo apt-get update && sudo apt-get install -y $DATA_PACKAGE"
        echo "   Going on without it: the demo downloads Fashion-MNIST (30 MB) with torchvision."
    fi
}

setup_venv
if [ "${1:-}" = "--setup" ]; then
    echo "ready: run the tests with  .venv/bin/python -m pytest -q tests"
    exit 0
fi
install_data
step "running demo.py (pre-training and its curves, two linear probes, a picture; README.md says how long)"
exec .venv/bin/python demo.py "$@"
