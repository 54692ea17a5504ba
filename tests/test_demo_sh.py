"""demo.sh's environment setup, driven with a fake `.venv/bin/python` that records its calls and plays pip and the
PyTorch check: an unreachable CPU-wheel index and a torch/torchvision pair that does not work are repaired once from
the default index, and a repair that fails stops with the versions and the command that fixes it. Each install names
where pip took each package from, removes the pair .venv holds first and says how much disk it needs. One test runs
the real pip in a real virtual environment, on local indexes of tiny stand-in wheels."""
import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKS = "0|torch 2.14.1, torchvision 0.29.1"
MISMATCHED = "1|torch 2.13.0+cpu, torchvision 0.29.1"
MISSING = "1|torch (not installed), torchvision (not installed)"
DEFAULT_INDEX_FILES = "https://files.example.org/packages"  # where the fake's default index serves its wheels

# Plays the snippets demo.sh runs with `python -c` (each starts with a comment naming it) from the state file
# (exit status | versions line), and `python -m pip ...`: an install from an --index-url writes FAKE_CPU_INDEX's
# state (empty: the index cannot be reached), any other torch install writes FAKE_DEFAULT_INDEX's, and with --report
# a report naming the wheels' URLs; an uninstall leaves nothing installed. FAKE_RECORDS: more records of .venv.
FAKE_PYTHON = r"""#!/usr/bin/env bash
state() { IFS='|' read -r status line < "$FAKE_STATE"; }
if [ "$1" = "-c" ]; then
    case "$2" in
        "# demo.sh: the PyTorch check"*)
            echo "check" >> "$FAKE_LOG"
            state
            echo "$line"
            [ "$status" = 0 ] && { echo "import torch, torchvision and torchvision.ops.nms work (CPU)"; exit 0; }
            echo "Traceback (most recent call last):" >&2
            echo "RuntimeError: operator torchvision::nms does not exist" >&2
            exit 1 ;;
        "# demo.sh: the records of .venv"*)
            state
            case "$line" in *"not installed"*) ;; *) printf '%s\n' "$line" | sed -E 's/, /\n/' ;; esac
            [ -z "${FAKE_RECORDS:-}" ] || printf '%s\n' "$FAKE_RECORDS"
            exit 0 ;;
        *) shift; exec python3 -c "$@" ;;  # the report's reading: plain Python
    esac
fi
echo "$*" >> "$FAKE_LOG"
case "$*" in
    *"-m torch.distributed.run"*) echo "torch.distributed.run ran"; exit 0 ;;
    *"install --help"*) echo "  --report <file>   Generate a JSON file describing what pip did"; exit 0 ;;
    *" check"*) echo "No broken requirements found."; exit 0 ;;
    *" uninstall "*) echo "$MISSING_STATE" > "$FAKE_STATE"; exit 0 ;;
    *"-r requirements.txt"*) exit 0 ;;
    *--index-url*)
        if [ -z "$FAKE_CPU_INDEX" ]; then
            echo "ERROR: Could not find a version that satisfies the requirement torch" >&2
            exit 1
        fi
        echo "$FAKE_CPU_INDEX" > "$FAKE_STATE"
        source="$(printf '%s\n' "$@" | grep -A1 -x -- --index-url | tail -n 1)" ;;
    *) echo "$FAKE_DEFAULT_INDEX" > "$FAKE_STATE"; source="$DEFAULT_INDEX_FILES" ;;
esac
report=$(printf '%s\n' "$@" | grep -A1 -x -- --report | tail -n 1)
if [ -n "$report" ]; then
    state
    torch=$(printf '%s\n' "$line" | sed -E 's/^torch ([^,]*),.*/\1/')
    vision=$(printf '%s\n' "$line" | sed -E 's/.*torchvision (.*)$/\1/')
    printf '{"install": [{"metadata": {"name": "torch", "version": "%s"}, "download_info": {"url": "%s/torch-%s.whl"}},
        {"metadata": {"name": "torchvision", "version": "%s"}, "download_info": {"url": "%s/torchvision-%s.whl"}}]}' \
        "$torch" "$source" "$torch" "$vision" "$source" "$vision" > "$report"
fi
"""


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def fake_df(free_mb: int) -> str:
    """`df -Pm .` with `free_mb` megabytes available."""
    return (f"#!/bin/sh\necho 'Filesystem 1048576-blocks Used Available Capacity Mounted on'\n"
            f"echo '/dev/sda1 500000 1000 {free_mb} 1% /'\n")


def run_setup(tmp_path, installed: str, cpu_index: str, default_index: str, free_mb: int = 50000, **env_extra):
    """`bash demo.sh --setup` in a scratch copy with the fake python; (completed process, recorded calls)."""
    shutil.copy(ROOT / "demo.sh", tmp_path / "demo.sh")
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    executable(tmp_path / ".venv" / "bin" / "python", FAKE_PYTHON)
    executable(tmp_path / "bin" / "nvidia-smi", "#!/bin/sh\nexit 1\n")  # no GPU, whatever the machine has
    executable(tmp_path / "bin" / "df", fake_df(free_mb))
    (tmp_path / "state").write_text(installed + "\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
           "FAKE_STATE": str(tmp_path / "state"), "FAKE_CPU_INDEX": cpu_index, "FAKE_DEFAULT_INDEX": default_index,
           "MISSING_STATE": MISSING, "DEFAULT_INDEX_FILES": DEFAULT_INDEX_FILES, **env_extra}
    env.pop("TORCH_INDEX_URL", None)
    (tmp_path / "log").touch()
    proc = subprocess.run(["bash", str(tmp_path / "demo.sh"), "--setup"], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, (tmp_path / "log").read_text().splitlines()


def torch_installs(calls):
    return [call for call in calls if " install " in f" {call} " and "torch torchvision" in call]


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_an_unreachable_cpu_index_is_repaired_from_the_default_index(tmp_path):
    proc, calls = run_setup(tmp_path, MISSING, cpu_index="", default_index=WORKS)
    assert proc.returncode == 0, proc.stderr
    installs = torch_installs(calls)
    assert len(installs) == 2
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[0]
    # the repair replaces what .venv holds (--force-reinstall: its old records go first; see the real pip's test)
    assert "--index-url" not in installs[1] and "--force-reinstall" in installs[1]
    out = proc.stdout
    assert "https://download.pytorch.org/whl/cpu could not be used" in out
    assert "about 3 GB" in out and "TORCH_INDEX_URL" in out  # why, how large, and how to avoid it
    assert "PyTorch installed and checked: torch 2.14.1, torchvision 0.29.1" in out
    assert f"pip installed torch 2.14.1 from {DEFAULT_INDEX_FILES}/torch-2.14.1.whl" in out  # where it came from
    assert calls[-2:] == ["check", "-m pip --disable-pip-version-check check"]  # the pair again, then pip check
    assert "ready:" in out


@needs_bash
def test_a_mismatched_pair_is_named_with_its_sources_and_repaired_once(tmp_path):
    proc, calls = run_setup(tmp_path, MISMATCHED, cpu_index=MISMATCHED, default_index=WORKS)
    assert proc.returncode == 0, proc.stderr
    assert len(torch_installs(calls)) == 2
    assert ("PyTorch found but not working (torch 2.13.0+cpu, torchvision 0.29.1: RuntimeError: operator "
            "torchvision::nms does not exist)") in proc.stdout
    # the sources pip took the pair from, not the index it was asked for (pip's configuration may add others)
    assert ("the pair pip installed does not work (torch 2.13.0+cpu from https://download.pytorch.org/whl/cpu/"
            "torch-2.13.0+cpu.whl, torchvision 0.29.1 from https://download.pytorch.org/whl/cpu/"
            "torchvision-0.29.1.whl: RuntimeError: operator torchvision::nms does not exist)") in proc.stdout
    assert "PyTorch installed and checked: torch 2.14.1, torchvision 0.29.1" in proc.stdout


@needs_bash
def test_the_pair_in_the_environment_is_removed_before_each_install(tmp_path):
    proc, calls = run_setup(tmp_path, MISMATCHED, cpu_index=MISMATCHED, default_index=WORKS)
    installs = [i for i, call in enumerate(calls) if call in torch_installs(calls)]
    removals = [i for i, call in enumerate(calls) if " uninstall " in f" {call} "]
    assert len(removals) == 2 and removals[0] < installs[0] < removals[1] < installs[1]
    assert proc.stdout.count("removing the pair that .venv holds before installing another: torch 2.13.0+cpu, "
                             "torchvision 0.29.1") == 2


@needs_bash
def test_a_failed_repair_stops_naming_both_versions_and_the_fix(tmp_path):
    proc, calls = run_setup(tmp_path, MISSING, cpu_index="", default_index=MISMATCHED)
    assert proc.returncode == 1
    assert len(torch_installs(calls)) == 2  # one repair, not a loop
    assert not any("requirements.txt" in call for call in calls)  # nothing runs on a broken PyTorch
    assert ("error: torch 2.13.0+cpu, torchvision 0.29.1 do not work together in .venv: RuntimeError: operator "
            "torchvision::nms does not exist") in proc.stderr
    assert f"pip installed torch 2.13.0+cpu from {DEFAULT_INDEX_FILES}/torch-2.13.0+cpu.whl" in proc.stderr
    assert (".venv/bin/python -m pip uninstall -y torch torchvision && .venv/bin/python -m pip install "
            "--force-reinstall torch torchvision") in proc.stderr
    assert "ready:" not in proc.stdout


@needs_bash
def test_a_working_pytorch_is_reused_without_installing(tmp_path):
    proc, calls = run_setup(tmp_path, WORKS, cpu_index="", default_index="")
    assert proc.returncode == 0, proc.stderr
    assert torch_installs(calls) == []
    assert "PyTorch found and working: torch 2.14.1, torchvision 0.29.1" in proc.stdout


@needs_bash
def test_the_disk_needed_and_free_is_said_before_each_download(tmp_path):
    proc, calls = run_setup(tmp_path, MISSING, cpu_index="", default_index=WORKS, free_mb=40000)
    out = proc.stdout
    assert ("installing PyTorch's CPU-only build from https://download.pytorch.org/whl/cpu (about 200 MB to "
            f"download, about 1.5 GB of disk for .venv with the CPU build; 39.1 GB free in {tmp_path})") in out
    assert "about 6.3 GB of disk for .venv with the CUDA build; 39.1 GB free" in out  # before the repair's 3 GB
    assert out.index("about 6.3 GB") < out.index(f"pip installed torch 2.14.1 from {DEFAULT_INDEX_FILES}")


@needs_bash
def test_too_little_disk_stops_before_the_download(tmp_path):
    proc, calls = run_setup(tmp_path, MISSING, cpu_index="", default_index=WORKS, free_mb=900)
    assert proc.returncode == 1
    assert torch_installs(calls) == []
    assert (f"error: .venv with the CPU build needs about 1.5 GB of disk, and {tmp_path} has 900 MB free"
            in proc.stderr)


@needs_bash
def test_packages_recorded_twice_in_the_environment_stop_the_setup(tmp_path):
    """A .venv that an earlier install left with two records of a package (pip list shows one version, Python may
    import the other) is named, with the way out."""
    proc, calls = run_setup(tmp_path, WORKS, cpu_index="", default_index="",
                            FAKE_RECORDS="pillow 10.0.0\npillow 11.1.0")
    assert proc.returncode == 1
    assert "error: .venv records more than one version of: pillow (10.0.0, 11.1.0)" in proc.stderr
    assert "rm -rf .venv && bash demo.sh" in proc.stderr


@needs_bash
def test_the_environment_has_a_torchrun_of_its_own(tmp_path):
    """A PyTorch reused from the system leaves .venv without torchrun; the one demo.sh adds runs the environment's
    Python, so that `torchrun` in the docs runs in it once .venv is activated."""
    proc, _ = run_setup(tmp_path, WORKS, cpu_index="", default_index="")
    assert proc.returncode == 0, proc.stderr
    torchrun = subprocess.run([str(tmp_path / ".venv" / "bin" / "torchrun"), "--nproc_per_node=2", "x.py"],
                              env={**os.environ, "FAKE_LOG": str(tmp_path / "log")}, capture_output=True, text=True)
    assert torchrun.stdout.strip() == "torch.distributed.run ran"
    assert (tmp_path / "log").read_text().splitlines()[-1] == "-m torch.distributed.run --nproc_per_node=2 x.py"


# --- the real pip ------------------------------------------------------------------------------------------------

def write_wheel(index: Path, name: str, version: str, files: dict, requires=()) -> None:
    """A pure-Python wheel of `files` ({path: text}) in `index`/<name>/, and that folder's PEP 503 page."""
    dist = f"{name}-{version}.dist-info"
    entries = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" +
               "".join(f"Requires-Dist: {r}\n" for r in requires),
               f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()}"
              f",{len(text.encode())}" for path, text in entries.items()]
    entries[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    folder = index / name
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in entries.items():
            wheel.writestr(path, text)
    links = sorted(p.name for p in folder.glob("*.whl"))
    (folder / "index.html").write_text("".join(f'<a href="{n}">{n}</a>\n' for n in links))


def write_pair(index: Path, torch_version: str, vision_version: str, built_for: str) -> None:
    """Stand-ins of torch and of a torchvision whose nms runs only with the torch it was built for."""
    write_wheel(index, "torch", torch_version, {
        "torch/__init__.py": f"__version__ = {torch_version!r}\n\ndef tensor(x):\n    return x\n\n\n"
                             "class cuda:\n    is_available = staticmethod(lambda: False)\n"})
    write_wheel(index, "torchvision", vision_version, {
        "torchvision/__init__.py": f"__version__ = {vision_version!r}\nfrom . import ops\n",
        "torchvision/ops.py": f"import torch\n\n\ndef nms(*args):\n    if torch.__version__ != {built_for!r}:\n"
                              "        raise RuntimeError('operator torchvision::nms does not exist')\n"},
                requires=["torch"])


@needs_bash
def test_the_real_pip_replaces_a_pair_from_another_source_without_leaving_two_records(tmp_path):
    """The CPU index unreachable, pip's configuration (here PIP_EXTRA_INDEX_URL) still gives a pair, which does not
    work: demo.sh names where each package came from, removes the pair and installs a working one; afterwards .venv
    records each package once, `pip list` names the versions that import, and `pip check` passes. (With
    --ignore-installed, the repair wrote the new pair over the old one's records: pip list then showed torch 1.0
    while 2.0 imported.)"""
    indexes = tmp_path / "indexes"
    write_pair(indexes / "extra", "1.0", "0.1", built_for="2.0")
    write_pair(indexes / "default", "2.0", "0.2", built_for="2.0")
    sandbox = tmp_path / "checkout"
    sandbox.mkdir()
    shutil.copy(ROOT / "demo.sh", sandbox / "demo.sh")
    (sandbox / "requirements.txt").write_text("torch\ntorchvision\n")
    subprocess.run([sys.executable, "-m", "venv", str(sandbox / ".venv")], check=True)  # the system's torch unseen
    executable(tmp_path / "bin" / "nvidia-smi", "#!/bin/sh\nexit 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # this machine's pip settings left out
    env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", PIP_CONFIG_FILE=os.devnull,
               PIP_CACHE_DIR=str(tmp_path / "cache"), PIP_INDEX_URL=(indexes / "default").as_uri(),
               PIP_EXTRA_INDEX_URL=(indexes / "extra").as_uri(),
               TORCH_INDEX_URL=(indexes / "unreachable").as_uri())
    proc = subprocess.run(["bash", str(sandbox / "demo.sh"), "--setup"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    extra = (indexes / "extra").as_uri()
    assert (f"the pair pip installed does not work (torch 1.0 from {extra}/torch/torch-1.0-py3-none-any.whl, "
            f"torchvision 0.1 from {extra}/torchvision/torchvision-0.1-py3-none-any.whl") in out
    removed = out.index("removing the pair that .venv holds before installing another: torch 1.0, torchvision 0.1")
    assert removed < out.index(f"pip installed torch 2.0 from {(indexes / 'default').as_uri()}/torch/")
    python = str(sandbox / ".venv" / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert sorted(p.name for p in site.glob("torch*.dist-info")) == ["torch-2.0.dist-info",
                                                                    "torchvision-0.2.dist-info"]
    listed = {p["name"]: p["version"] for p in json.loads(subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], env=env, capture_output=True, text=True,
        check=True).stdout)}
    imported = subprocess.run([python, "-c", "import torch, torchvision; print(torch.__version__, "
                               "torchvision.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    assert [listed["torch"], listed["torchvision"]] == imported == ["2.0", "0.2"]
    assert subprocess.run([python, "-m", "pip", "check"], env=env, capture_output=True).returncode == 0
