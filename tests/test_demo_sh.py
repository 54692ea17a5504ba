"""demo.sh's environment setup, driven with a fake `.venv/bin/python` that records its calls and plays pip and the
PyTorch check: an unreachable CPU-wheel index and a torch/torchvision pair that does not work are repaired once from
the default index, and a repair that fails stops with the versions and the command that fixes it."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKS = "0|torch 2.14.1, torchvision 0.29.1"
MISMATCHED = "1|torch 2.13.0+cpu, torchvision 0.29.1"
MISSING = "1|torch (not installed), torchvision (not installed)"

# Plays `python -c CHECK` from the state file (exit status | versions line) and `python -m pip install ...`: an
# install from an --index-url writes FAKE_CPU_INDEX's state (empty: the index cannot be reached), any other torch
# install writes FAKE_DEFAULT_INDEX's.
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = "-c" ]; then
    echo "check" >> "$FAKE_LOG"
    IFS='|' read -r status line < "$FAKE_STATE"
    echo "$line"
    [ "$status" = 0 ] && { echo "import torch, torchvision and torchvision.ops.nms work (CPU)"; exit 0; }
    echo "Traceback (most recent call last):" >&2
    echo "RuntimeError: operator torchvision::nms does not exist" >&2
    exit 1
fi
echo "$*" >> "$FAKE_LOG"
case "$*" in
    *"-r requirements.txt"*) exit 0 ;;
    *--index-url*)
        if [ -z "$FAKE_CPU_INDEX" ]; then
            echo "ERROR: Could not find a version that satisfies the requirement torch" >&2
            exit 1
        fi
        echo "$FAKE_CPU_INDEX" > "$FAKE_STATE" ;;
    *) echo "$FAKE_DEFAULT_INDEX" > "$FAKE_STATE" ;;
esac
"""


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_setup(tmp_path, installed: str, cpu_index: str, default_index: str):
    """`bash demo.sh --setup` in a scratch copy with the fake python; (completed process, recorded calls)."""
    shutil.copy(ROOT / "demo.sh", tmp_path / "demo.sh")
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    executable(tmp_path / ".venv" / "bin" / "python", FAKE_PYTHON)
    executable(tmp_path / "bin" / "nvidia-smi", "#!/bin/sh\nexit 1\n")  # no GPU, whatever the machine has
    (tmp_path / "state").write_text(installed + "\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
           "FAKE_STATE": str(tmp_path / "state"), "FAKE_CPU_INDEX": cpu_index, "FAKE_DEFAULT_INDEX": default_index}
    env.pop("TORCH_INDEX_URL", None)
    proc = subprocess.run(["bash", str(tmp_path / "demo.sh"), "--setup"], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, (tmp_path / "log").read_text().splitlines()


def torch_installs(calls):
    return [call for call in calls if "torch torchvision" in call]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_an_unreachable_cpu_index_is_repaired_from_the_default_index(tmp_path):
    proc, calls = run_setup(tmp_path, MISSING, cpu_index="", default_index=WORKS)
    assert proc.returncode == 0, proc.stderr
    installs = torch_installs(calls)
    assert len(installs) == 2
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[0]
    assert "--index-url" not in installs[1] and "--ignore-installed" in installs[1]
    out = proc.stdout
    assert "https://download.pytorch.org/whl/cpu could not be used" in out
    assert "about 3 GB" in out and "TORCH_INDEX_URL" in out  # why, how large, and how to avoid it
    assert "PyTorch installed and checked: torch 2.14.1, torchvision 0.29.1" in out
    assert calls[-1] == "check" and "ready:" in out  # checked again after the other requirements, then done


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_mismatched_pair_is_named_and_repaired_once(tmp_path):
    proc, calls = run_setup(tmp_path, MISMATCHED, cpu_index=MISMATCHED, default_index=WORKS)
    assert proc.returncode == 0, proc.stderr
    assert len(torch_installs(calls)) == 2
    assert ("PyTorch found but not working (torch 2.13.0+cpu, torchvision 0.29.1: RuntimeError: operator "
            "torchvision::nms does not exist)") in proc.stdout
    assert "the pair installed from https://download.pytorch.org/whl/cpu does not work" in proc.stdout
    assert "PyTorch installed and checked: torch 2.14.1, torchvision 0.29.1" in proc.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_failed_repair_stops_naming_both_versions_and_the_fix(tmp_path):
    proc, calls = run_setup(tmp_path, MISSING, cpu_index="", default_index=MISMATCHED)
    assert proc.returncode == 1
    assert len(torch_installs(calls)) == 2  # one repair, not a loop
    assert not any("requirements.txt" in call for call in calls)  # nothing runs on a broken PyTorch
    assert ("error: torch 2.13.0+cpu, torchvision 0.29.1 do not work together in .venv: RuntimeError: operator "
            "torchvision::nms does not exist") in proc.stderr
    assert ".venv/bin/python -m pip install --ignore-installed torch torchvision" in proc.stderr
    assert "ready:" not in proc.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_working_pytorch_is_reused_without_installing(tmp_path):
    proc, calls = run_setup(tmp_path, WORKS, cpu_index="", default_index="")
    assert proc.returncode == 0, proc.stderr
    assert torch_installs(calls) == []
    assert "PyTorch found and working: torch 2.14.1, torchvision 0.29.1" in proc.stdout
