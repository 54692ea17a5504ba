#!/usr/bin/env bash
# The demo in one command on a fresh Debian/Ubuntu machine with Python 3.10+: a virtual environment with the
# requirements, the Fashion-MNIST package, then demo.py (pre-training and linear probes on the CPU, ~10 minutes).
# Extra arguments go to demo.py (see `python demo.py --help`).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# --system-site-packages reuses a PyTorch that is already installed instead of downloading another one.
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing the Fashion-MNIST package (dataset-fashion-mnist) ..."
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } ||
        echo "could not install dataset-fashion-mnist; the demo will try to download Fashion-MNIST instead"
fi

exec .venv/bin/python demo.py "$@"
