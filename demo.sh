#!/usr/bin/env bash
# The demo in one command on a fresh Debian/Ubuntu machine with Python 3.10+: a virtual environment (.venv) with the
# requirements, the Fashion-MNIST package, then demo.py: DMJD pre-training and linear probes on the CPU.
#
#   bash demo.sh                 # everything; extra arguments go to demo.py (see `python demo.py --help`)
#   bash demo.sh --setup         # only the virtual environment, e.g. for the tests: .venv/bin/python -m pytest -q tests
#
# Without an NVIDIA GPU the environment gets PyTorch's CPU-only build (about 200 MB instead of several GB of CUDA
# libraries); TORCH_INDEX_URL chooses another index. A PyTorch already installed on the system is reused.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
CPU_INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
DATA_PACKAGE=dataset-fashion-mnist
DATA_DIR=/usr/share/datasets/fashion-mnist

step() { printf '\n== %s\n' "$*"; }

setup_venv() {
    if [ ! -x .venv/bin/python ]; then
        step "creating the virtual environment .venv (it sees the system's packages, so an installed PyTorch is reused)"
        "$PYTHON" -m venv --system-site-packages .venv
    fi
    if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            step "installing PyTorch with CUDA (an NVIDIA GPU was found; several GB, a few minutes)"
            .venv/bin/python -m pip install --disable-pip-version-check torch torchvision
        else
            step "no NVIDIA GPU found: installing PyTorch's CPU-only build from $CPU_INDEX (about 200 MB)"
            .venv/bin/python -m pip install --disable-pip-version-check --index-url "$CPU_INDEX" torch torchvision || {
                step "$CPU_INDEX could not be used: installing PyTorch from the default index (with CUDA libraries, several GB)"
                .venv/bin/python -m pip install --disable-pip-version-check torch torchvision
            }
        fi
    fi
    step "installing the other requirements into .venv (requirements.txt)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
    .venv/bin/python -c "import torch; print('PyTorch', torch.__version__, '(CUDA available)' if torch.cuda.is_available() else '(CPU)')"
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
