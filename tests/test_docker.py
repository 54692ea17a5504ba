"""The Dockerfile, checked without a Docker engine: known instructions, a pinned base, sources that exist and are
not ignored, and dependencies installed from requirements.txt without replacing the base image's torch."""
import fnmatch
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions():
    """(keyword, arguments) per instruction, with continuation lines joined and comments dropped."""
    found, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        found.append((keyword, rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends with a continuation line"
    return found


def ignored(path: str) -> bool:
    """Docker's matching for the patterns used here: `**/x` matches x at any depth, other patterns match from the
    root, component by component (`*` never crosses a `/`), and also exclude everything below what they match."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
            continue
        wanted = pattern.split("/")
        if len(wanted) <= len(parts) and all(fnmatch.fnmatchcase(a, w) for a, w in zip(parts, wanted)):
            return True
    return False


def test_dockerfile_instructions_and_base_image():
    steps = instructions()
    assert all(k == k.upper() and k in INSTRUCTIONS for k, _ in steps), [k for k, _ in steps]
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    first = next(i for i, (k, _) in enumerate(steps) if k != "ARG")
    assert steps[first][0] == "FROM" and [k for k, _ in steps].count("FROM") == 1
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], steps[first][1])
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    assert any(k == "WORKDIR" for k, _ in steps) and any(k in ("CMD", "ENTRYPOINT") for k, _ in steps)


def test_dockerfile_copies_existing_files_and_installs_the_requirements():
    steps = instructions()
    copies = [a.split() for k, a in steps if k == "COPY"]
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source == "." or not ignored(source), f"{source} is excluded by .dockerignore"
    run_lines = [a for k, a in steps if k == "RUN"]
    install = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "-r requirements.txt" in a)
    assert "--no-cache-dir" in steps[install][1]
    assert any(k == "COPY" and a.split()[0] == "requirements.txt" for k, a in steps[:install])
    assert not any(re.search(r"pip install[^&]*\btorch\b", a) for a in run_lines)  # the base image's CUDA build stays
    # requirements.txt must accept the image's torch: lower bounds only
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if re.match(r"torch(vision)?\b", line):
            assert "==" not in line and "<" not in line, line


def test_dockerignore_keeps_the_code_and_drops_the_rest():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    code = [p for p in tracked if p.endswith(".py") or p == "requirements.txt"] or ["main_pretrain.py"]
    assert not [p for p in code if ignored(p)]
    for path in (".git/config", "output_dir/checkpoint-last.pth", "util/__pycache__/misc.cpython-311.pyc",
                 "out/run/log.txt", "data/train/a/0.JPEG", "checkpoint-399.pth"):
        assert ignored(path), path
