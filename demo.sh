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
#
# Every install of the pair says where pip took each package from (pip's configuration may add sources to the index
# asked for), first removes the pair that .venv holds (so that .venv never records two versions of a package, and
# `pip list` names the version that imports) and says how much disk it needs, and how much is free, before it
# downloads.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
CPU_INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
DATA_PACKAGE=dataset-fashion-mnist
DATA_DIR=/usr/share/datasets/fashion-mnist
VENV_PYTHON=.venv/bin/python
# Disk that .venv needs, in MB: with the CPU build, torch (about 650 MB installed) and the other requirements (about
# 550 MB); with the build with CUDA libraries, torch, its nvidia-* and triton packages (5.3 GB) and the others: .venv
# measured 5.8 GB. Both with a margin. What the demo writes: data/ (the Fashion-MNIST ImageFolder, 280 MB, and the
# probe's subsample, 120 MB) and output_dir/demo (under 100 MB).
CPU_VENV_MB=1500
CUDA_VENV_MB=6500
DEMO_FILES_MB=500
# Prints "torch X, torchvision Y" (read from the installed metadata, so a pair that fails to import is named too),
# imports both and runs torchvision.ops.nms, the operator a torchvision built for another torch lacks.
TORCH_CHECK='# demo.sh: the PyTorch check
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
# "name version" of each package that .venv itself records (not the system's, which it only sees), once per record:
# a name twice is a package recorded in two versions, of which pip list shows one and Python may import the other.
VENV_RECORDS='# demo.sh: the records of .venv
import importlib.metadata as metadata, re, sysconfig
places = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
for dist in metadata.distributions(path=places):
    print(re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(), dist.version)
'
# "torch X from URL, torchvision Y from URL": where pip took the pair, from its installation report (pip 22.2+).
REPORTED_SOURCES='# demo.sh: the sources in a pip report
import json, sys
installed = {item["metadata"]["name"].lower(): item for item in json.load(open(sys.argv[1]))["install"]}
print(", ".join(name + " " + installed[name]["metadata"]["version"] + " from " + installed[name]["download_info"]["url"]
                for name in ("torch", "torchvision") if name in installed))
'
PIP_REPORT=$(mktemp)
trap 'rm -f "$PIP_REPORT"' EXIT

step() { printf '\n== %s\n' "$*"; }
pip_run() { "$VENV_PYTHON" -m pip --disable-pip-version-check "$@"; }
pip_install() { pip_run install "$@"; }

# Sets CHECKED to the check's output; succeeds when the pair works.
check_torch() { CHECKED=$("$VENV_PYTHON" -c "$TORCH_CHECK" 2>&1); }
versions() { printf '%s\n' "$CHECKED" | grep -m1 '^torch ' || echo "torch and torchvision (versions unknown)"; }
failure() { printf '%s\n' "$CHECKED" | grep -v '^torch ' | grep . | tail -n 1; }

# --- disk --------------------------------------------------------------------------------------------------------
megabytes() { awk -v mb="$1" 'BEGIN { if (mb >= 1024) printf "%.1f GB", mb / 1024; else printf "%d MB", mb }'; }
free_mb() { df -Pm . 2>/dev/null | awk 'NR == 2 { print $4 }'; }
# "about 1.5 GB of disk; 40.2 GB free in /home/me/dmjd"; stops when df says less is free than `need` MB.
disk_needed() {
    local need=$1 what=$2 free
    free=$(free_mb)
    if [ -z "$free" ]; then
        echo "about $(megabytes "$need") of disk for $what"
        return
    fi
    if [ "$free" -lt "$need" ]; then
        {
            echo "error: $what needs about $(megabytes "$need") of disk, and $(pwd) has $(megabytes "$free") free."
            echo "Free some space and run this script again."
        } >&2
        exit 1
    fi
    echo "about $(megabytes "$need") of disk for $what; $(megabytes "$free") free in $(pwd)"
}

# --- the pair's installs -----------------------------------------------------------------------------------------
# The pair's records in .venv, "torch 2.6.0" per line (none: .venv has none, whatever the system has).
venv_pair() { "$VENV_PYTHON" -c "$VENV_RECORDS" 2>/dev/null | grep -E '^(torch|torchvision) ' || true; }

# Uninstalls the torch and torchvision that .venv records, every record of them (an earlier install may have left two),
# so that the next install does not write its files over them.
remove_pair() {
    local records pass
    records=$(venv_pair)
    [ -n "$records" ] || return 0
    records=$(printf '%s' "$records" | paste -sd, - | sed 's/,/, /g')
    step "removing the pair that .venv holds before installing another: $records"
    for pass in 1 2 3; do
        pip_run uninstall --yes --quiet torch torchvision || true
        [ -n "$(venv_pair)" ] || return 0
    done
    {
        echo "error: could not remove torch and torchvision from .venv; remove the environment and run this script"
        echo "again:  rm -rf .venv && bash demo.sh"
    } >&2
    exit 1
}

pip_reports() {
    [ -n "${PIP_HELP:-}" ] || PIP_HELP=$(pip_install --help 2>/dev/null || echo "(no help)")
    case "$PIP_HELP" in *--report*) return 0 ;; *) return 1 ;; esac
}

# Installs torch and torchvision with the given pip arguments (an index) into .venv, in place of any pair there:
# --force-reinstall, not --ignore-installed, so that what .venv holds of the pair's dependencies is uninstalled before
# its new version is written (the system's packages stay; .venv's copy comes first). Sets SOURCES to where pip took
# each package from. Fails as pip fails.
install_pair() {
    SOURCES=""
    remove_pair
    if pip_reports; then
        : > "$PIP_REPORT"
        pip_install --force-reinstall --report "$PIP_REPORT" "$@" torch torchvision || return 1
        SOURCES=$("$VENV_PYTHON" -c "$REPORTED_SOURCES" "$PIP_REPORT" 2>/dev/null) || SOURCES=""
    else
        pip_install --force-reinstall "$@" torch torchvision || return 1
    fi
    if [ -z "$SOURCES" ]; then  # a pip before 22.2: no report; name what it could use
        SOURCES="$(versions_installed), from the index given or from a source that pip's configuration adds"
        SOURCES+=" (.venv/bin/python -m pip config list)"
    fi
    step "pip installed $SOURCES"
}
versions_installed() { check_torch || true; versions; }

install_torch() {
    if check_torch; then
        step "PyTorch found and working: $(versions)"
        return
    fi
    if printf '%s\n' "$CHECKED" | grep -q '^torch [0-9]'; then  # something is installed but does not work
        step "PyTorch found but not working ($(versions): $(failure)); installing a pair into .venv"
    fi
    local disk
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        disk=$(disk_needed "$CUDA_VENV_MB" ".venv with the CUDA build") || exit 1
        step "installing PyTorch with CUDA (an NVIDIA GPU was found: about 3 GB to download, $disk)"
        install_pair || true
        check_torch || torch_error  # the repair below would repeat this same install
        step "PyTorch installed and checked: $(versions)"
        return
    fi
    local why
    disk=$(disk_needed "$CPU_VENV_MB" ".venv with the CPU build") || exit 1
    step "no NVIDIA GPU found: installing PyTorch's CPU-only build from $CPU_INDEX (about 200 MB to download, $disk)"
    # 2 retries, not pip's 5: an unreachable index fails sooner
    if ! install_pair --retries 2 --index-url "$CPU_INDEX"; then
        why="$CPU_INDEX could not be used (unreachable, or it has no build for this Python)"
    elif ! check_torch; then
        why="the pair pip installed does not work ($SOURCES: $(failure))"
    else
        step "PyTorch installed and checked: $(versions)"
        return
    fi
    disk=$(disk_needed "$CUDA_VENV_MB" ".venv with the CUDA build") || exit 1
    step "repairing once: $why. Installing a matching torch and torchvision from the default index instead" \
        "(on Linux x86-64 the build with CUDA libraries: about 3 GB to download, an estimated 5 to 15 minutes at" \
        "30 to 100 Mbit/s, $disk; set TORCH_INDEX_URL to a reachable index of CPU wheels to avoid it)"
    install_pair || true
    if check_torch; then
        step "PyTorch installed and checked: $(versions)"
        return
    fi
    torch_error
}

torch_error() {
    {
        echo "error: $(versions) do not work together in .venv: $(failure)"
        [ -z "${SOURCES:-}" ] || echo "pip installed $SOURCES"
        echo "Install a matching pair by hand, then run this script again:"
        echo "    $VENV_PYTHON -m pip uninstall -y torch torchvision &&" \
            "$VENV_PYTHON -m pip install --force-reinstall torch torchvision"
        echo "(or the pair for your platform from https://pytorch.org/get-started/locally/)"
    } >&2
    exit 1
}

# .venv records each package once (pip list names what imports), and pip check finds what it installed consistent.
check_records() {
    local duplicates broken
    duplicates=$("$VENV_PYTHON" -c "$VENV_RECORDS" | sort | awk '{ seen[$1] = n[$1]++ ? seen[$1] ", " $2 : $2 }
        END { for (name in n) if (n[name] > 1) printf "%s (%s) ", name, seen[name] }')
    if [ -n "$duplicates" ]; then
        {
            echo "error: .venv records more than one version of: ${duplicates% }; pip list then names a version that"
            echo "may not be the one that imports (an earlier install wrote over them). Remove the environment and run"
            echo "this script again:"
            echo "    rm -rf .venv && bash demo.sh"
        } >&2
        exit 1
    fi
    if ! broken=$(pip_run check 2>&1); then
        step "warning: pip check finds requirements unmet (packages of the system that .venv sees may need other" \
            "versions than .venv holds):"
        printf '%s\n' "$broken"
    fi
}

# torchrun of this environment: a PyTorch reused from the system has its torchrun outside .venv, running the system's
# Python, which lacks what .venv adds (timm, ...); with .venv activated, `torchrun` is then this one.
add_torchrun() {
    [ -e .venv/bin/torchrun ] && return
    printf '%s\n' '#!/bin/sh' '# torchrun with the interpreter of this environment (its PyTorch is the system'"'"'s)' \
        'exec "$(dirname "$0")/python" -m torch.distributed.run "$@"' > .venv/bin/torchrun
    chmod +x .venv/bin/torchrun
}

setup_venv() {
    if [ ! -x "$VENV_PYTHON" ]; then
        step "creating the virtual environment .venv (it sees the system's packages, so a working PyTorch is reused)"
        "$PYTHON" -m venv --system-site-packages .venv
    fi
    install_torch
    step "installing the other requirements into .venv (requirements.txt; about 100 MB to download)"
    pip_install --quiet -r requirements.txt
    check_torch || torch_error  # the requirements must not have changed a working pair
    check_records
    add_torchrun
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
    echo "(or activate the environment, source .venv/bin/activate, and run the docs' commands as written)"
    exit 0
fi
disk=$(disk_needed "$DEMO_FILES_MB" "the demo's data and runs") || exit 1
step "the demo writes data/ and output_dir/demo: $disk"
install_data
step "running demo.py (pre-training and its curves, two linear probes, a picture; README.md says how long)"
# the environment's part of the demo's time, which demo.py reports with its own
DEMO_SETUP_SECONDS=$SECONDS exec .venv/bin/python demo.py "$@"
