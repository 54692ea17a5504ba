"""The errors a script reports as `error: <message>`: the run's (training.errors) and the encoder package's
(dmjd_encoders.errors, one base, no torch), told from a bug without looking at what is loaded."""
import ast
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from training.errors import FlagError, Preempted, exits_like_a_script, is_script_error

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ERRORS = {  # each error, where it has always been imported from, and the built-in base it keeps
    "CheckpointError": ("dmjd_encoders.checkpoint", RuntimeError),
    "ArchitectureMismatch": ("dmjd_encoders.pretrained", RuntimeError),
    "PretrainedWeightsError": ("dmjd_encoders.pretrained", ValueError),
    "UnknownModelError": ("dmjd_encoders.models_convvit", ValueError),
}


def test_the_package_errors_module_imports_nothing():
    tree = ast.parse((ROOT / "dmjd_encoders" / "errors.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("name", sorted(PACKAGE_ERRORS))
def test_every_package_error_is_an_encoder_error_under_its_old_name_and_base(name):
    import importlib

    from dmjd_encoders import errors
    home, base = PACKAGE_ERRORS[name]
    cls = getattr(errors, name)
    assert getattr(importlib.import_module(home), name) is cls
    assert issubclass(cls, errors.EncoderError) and issubclass(cls, base)
    assert is_script_error(cls("why"))


def test_importing_the_run_errors_loads_neither_torch_nor_the_package():
    code = ("import sys, training.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'dmjd_encoders')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_a_script_reports_the_package_errors_and_the_runs_and_lets_a_bug_through():
    from dmjd_encoders.errors import CheckpointError

    def raising(err):
        return exits_like_a_script(lambda: (_ for _ in ()).throw(err))

    for err in (CheckpointError("ckpt.pth is damaged"), FlagError("--epochs must be >= 1")):
        with pytest.raises(SystemExit) as exited:
            raising(err)()
        assert str(exited.value) == f"error: {err}"
    with pytest.raises(SystemExit) as exited:
        raising(OSError(errno.ENOSPC, "No space left on device"))()
    assert str(exited.value) == "error: No space left on device"
    with pytest.raises(SystemExit) as exited:
        raising(Preempted())()
    assert exited.value.code == 75
    for bug in (KeyError("model"), OSError(errno.EACCES, "Permission denied")):
        with pytest.raises(type(bug)):
            raising(bug)()


def test_without_the_package_only_the_runs_errors_are_a_scripts(monkeypatch):
    """Where dmjd_encoders cannot be imported (a script's checks before torch), asking costs no import error."""
    from dmjd_encoders.errors import UnknownModelError
    monkeypatch.setitem(sys.modules, "dmjd_encoders.errors", None)  # its import now raises ImportError
    assert is_script_error(FlagError("--epochs must be >= 1"))
    assert not is_script_error(UnknownModelError("--model 'x' is not an encoder"))
