"""The encoders as an installable package: what `pip install .` (or `pip install git+<repository URL>`, which builds
the same tree) puts into site-packages, and that it works from another folder without the checkout."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return {re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower(): line.replace(" ", "")
            for line in lines if line.strip() and not line.startswith("#")}


def test_the_package_declares_its_dependencies_with_the_bounds_of_requirements_txt():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = requirement_lines()
    declared = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower(): d.replace(" ", "") for d in project["dependencies"]}
    assert {"torch", "timm", "safetensors"} <= set(declared)
    for name, spec in declared.items():
        assert requirements.get(name) == spec, f"pyproject.toml says {spec}, requirements.txt {requirements.get(name)}"


def test_the_package_metadata_is_what_an_index_takes():
    """What an index shows and checks: the license as an SPDX expression with its file (PEP 639, not the deprecated
    table, nor a license classifier beside it), authors, classifiers, https URLs, the version read from
    dmjd_encoders.__version__ (one place), and a long description whose links work on the index's page (absolute, or
    anchors of the page itself; a link relative to the repository's folders would not)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert project["authors"] and all(author.get("name") for author in project["authors"])
    classifiers = project["classifiers"]
    assert "Programming Language :: Python :: 3" in classifiers and not [c for c in classifiers if "License ::" in c]
    assert all(re.fullmatch(r"[A-Z][\w /.-]* :: .+", c) for c in classifiers), classifiers
    assert project["urls"] and all(url.startswith("https://") for url in project["urls"].values())
    assert "https://arxiv.org/abs/2301.00230" in project["urls"].values()
    assert "version" not in project and project["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dmjd_encoders.__version__"}
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"', (ROOT / "dmjd_encoders" / "__init__.py").read_text(), re.M)
    requires = pyproject["build-system"]["requires"]
    assert requires == ["setuptools>=77"]  # the first setuptools that writes an SPDX license expression
    readme = (ROOT / project["readme"]).read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets and [t for t in targets if not t.startswith(("https://", "http://", "#"))] == []


def test_the_package_says_its_version():
    import dmjd_encoders
    assert re.fullmatch(r"\d+\.\d+\.\d+", dmjd_encoders.__version__) and "__version__" in dmjd_encoders.__all__


def source_tree(dst: Path) -> Path:
    """The files a clone of the repository holds (tracked or new, not ignored), as pip builds `git+<URL>` from."""
    if shutil.which("git") and (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\0")
        for name in filter(None, listed):
            if (ROOT / name).is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dst / name)
    else:
        shutil.copytree(ROOT, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "build", "*.egg-info", ".venv", "out", "data", ".pytest_cache"))
    return dst


# Run by the installed package's Python from a folder outside the checkout.
USE_THE_INSTALL = textwrap.dedent('''
    import importlib.metadata, importlib.util, json, os, subprocess, sys
    import timm, torch
    import dmjd_encoders  # the one import that registers the encoders
    from dmjd_encoders.checkpoint import save_checkpoint

    assert dmjd_encoders.__file__.startswith(sys.prefix), dmjd_encoders.__file__
    # nothing of the checkout's generic top-level names, nor its flat modules, came with the package
    for name in ("util", "training", "benchmarks", "tests", "models_convvit", "models_dmjd", "export_encoder"):
        assert importlib.util.find_spec(name) is None, name
    installed = {p.parts[0] for p in importlib.metadata.files("dmjd-encoders") if not p.parts[0].startswith("..")}
    assert installed == {"dmjd_encoders", "dmjd_encoders-0.1.0.dist-info"}, installed
    print("requires", json.dumps(sorted(importlib.metadata.requires("dmjd-encoders"))))
    # the metadata an index reads, as pip installed it
    assert importlib.metadata.version("dmjd-encoders") == dmjd_encoders.__version__ == "0.1.0"
    meta = importlib.metadata.metadata("dmjd-encoders")
    assert meta["License-Expression"] == "MIT" and "License" not in meta, dict(meta)
    assert meta.get_all("License-File") == ["LICENSE"] and meta["Author"], dict(meta)
    assert "Paper, https://arxiv.org/abs/2301.00230" in meta.get_all("Project-URL")
    assert "Topic :: Scientific/Engineering :: Image Recognition" in meta.get_all("Classifier")
    assert meta["Description-Content-Type"] == "text/markdown"

    torch.manual_seed(0)
    model = timm.create_model("convvit_tiny_patch16", img_size=64).eval()
    save_checkpoint({"model": model.state_dict(), "args": {"model": "convvit_tiny_patch16", "input_size": 64,
                                                           "epochs": 3}}, "ft.pth")
    script = os.path.join(os.path.dirname(sys.executable), "dmjd-export-encoder")
    subprocess.run([script, "ft.pth", "export", "--result", "demo top-1=12.5"], check=True)
    usage = subprocess.run([script, "--help"], check=True, capture_output=True, text=True).stdout
    assert usage.startswith("usage: dmjd-export-encoder "), usage[:200]  # the command's name, not its description
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for loaded in (timm.create_model("local-dir:export", pretrained=True),
                       dmjd_encoders.create_encoder("convvit_tiny_patch16", weights="export")):
            torch.testing.assert_close(loaded.eval()(x), expected)
    assert "demo top-1 | 12.5" in open("export/README.md").read()
    print("ok")
''')


def fresh_environment(venv: Path) -> Path:
    """A new virtual environment that also sees the packages of this one (torch, timm, pip, setuptools: nothing to
    download), after its own: a .pth file names this environment's site-packages, which --system-site-packages would
    miss when the tests run in a virtual environment themselves. Returns its Python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    (Path(own) / "outer_environment.pth").write_text("".join(p + "\n" for p in ours))
    return python


def test_pip_install_gives_the_encoders_alone_usable_from_another_folder(tmp_path):
    """pip builds the package offline into a fresh environment (--no-build-isolation: setuptools from the
    environment, which must meet pyproject.toml's build requirement, --no-deps: torch and timm are there), and a
    program in another folder uses it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    pytest.importorskip("setuptools", minversion=re.fullmatch(r"setuptools>=([\d.]+)", build_requires[0]).group(1))
    src = source_tree(tmp_path / "src")
    python = fresh_environment(tmp_path / "venv")
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-index", str(src)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", USE_THE_INSTALL], cwd=elsewhere, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
    requires = json.loads(re.search(r"requires (.*)", proc.stdout).group(1))  # the installed metadata
    assert sorted(re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires) == ["safetensors", "timm", "torch"]


@pytest.mark.parametrize("name, fresh", [("convvit_tiny_patch16", "downsample32"),  # the stride-32 level
                                         ("vit_test_patch16_gap_sincos", "pyramid")])  # ViTDet's simple pyramid
def test_smp_takes_the_encoders_by_their_tu_names_with_exported_weights(tmp_path, name, fresh):
    """segmentation_models_pytorch (not a requirement: skipped without it) after `import dmjd_encoders`: a UNet on
    the encoder's four levels (ConViT's, a ViT's simple pyramid: smp builds `tu-` encoders with features_only=True and
    nothing else), with an export's weights loaded through timm, as the model card's snippet does."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    import torch

    import dmjd_encoders
    from helpers import encoder_checkpoint
    trained = encoder_checkpoint(tmp_path / "ft.pth", name)
    dmjd_encoders.export_encoder(str(tmp_path / "ft.pth"), str(tmp_path / "export"))
    model = smp.Unet(f"tu-{name}", encoder_weights="export", classes=3, img_size=64,
                     pretrained_cfg_overlay=dict(file=str(tmp_path / "export" / "model.safetensors"))).eval()
    encoder = model.encoder.model.model  # smp's encoder -> timm's FeatureGetterNet -> the encoder
    assert model.encoder.model.feature_info.reduction() == [4, 8, 16, 32]
    for key, value in encoder.state_dict().items():
        if not key.startswith(fresh):  # the added levels start fresh (no pre-trained weights)
            torch.testing.assert_close(value, trained.state_dict()[key])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
