"""What the documentation promises about the repository: the outputs of its commands stay out of git."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
OUTPUT_FLAGS = r"--(?:output_dir|output|out|root)"


def documented_outputs():
    """Relative paths that documented commands write (absolute ones are the user's own folders)."""
    found = set()
    for doc in DOCS:
        for path in re.findall(OUTPUT_FLAGS + r"[ =]([\w./-]+)", doc.read_text()):
            if not path.startswith(("/", "docs/", "$")):
                found.add(path.rstrip("."))
    return sorted(found)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_outputs_of_documented_commands_are_ignored_by_git():
    outputs = documented_outputs()
    assert "vis.png" in outputs and "out/dmjd_convit_b" in outputs  # the scan finds the README's commands
    for path in outputs:
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert result.returncode == 0, f"{path} (written by a documented command) is not git-ignored"
