"""training.signals: a stop signal at any moment of a training process's life is a clean requeue (75) while it starts,
the run's own stop (a checkpoint, then 75) while it runs, and ignored once it ended (its status stands). Each case
runs in a process of its own: the handlers exit the process."""
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT
from training.signals import DEFAULT_STOP_SIGNALS, parse_signals, signal_names


def python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter in the checkout, its tests' helpers importable."""
    prelude = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_the_stop_signals_are_read_from_the_command_line_before_it_is_parsed():
    assert signal_names(["--epochs", "2"]) == DEFAULT_STOP_SIGNALS == "TERM,USR1"
    assert signal_names(["--stop_signals", "USR2,TERM"]) == "USR2,TERM"
    assert signal_names(["--stop_signals=HUP"]) == "HUP"
    assert parse_signals("TERM, USR1,KILL,BOGUS") == [signal.SIGTERM, signal.SIGUSR1]  # the flag's check names those


@pytest.mark.parametrize("name", ["TERM", "USR1"])
def test_a_stop_signal_while_a_script_starts_exits_75_at_once(name):
    proc = python(f"""
        import os, signal, time
        from training.signals import handle_from_start
        handle_from_start()
        os.kill(os.getpid(), signal.SIG{name})  # e.g. while torch is imported
        time.sleep(30)
        print("not stopped")
    """)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert f"received SIG{name} while starting: nothing was trained or saved; exiting with status 75 (requeue)" in \
        proc.stdout and "not stopped" not in proc.stdout


def test_a_stop_signal_after_the_run_ended_leaves_the_finished_run_its_status(tmp_path):
    """The run left (its last save made): a signal then, even while the interpreter shuts down, which resets Python's
    handlers, does not turn the completed run into a killed one."""
    proc = python(f"""
        import os, signal, time
        from training.signals import handle_from_start
        handle_from_start()
        from helpers import pretrain_config
        from training.run import Run
        with Run(pretrain_config(output_dir={str(tmp_path)!r})):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.5)
        print("finished")
    """)
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stdout + proc.stderr


def test_a_run_in_a_process_that_took_no_signals_gives_their_handlers_back(tmp_path):
    """A test or a notebook runs a Run without a script's start: its own handlers are back after the run, even one
    that failed while it started."""
    from helpers import pretrain_config
    from training.run import Run
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with Run(pretrain_config(output_dir=str(tmp_path))):
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(RuntimeError, match="resolved for 2 processes"):
        with Run(pretrain_config(output_dir=str(tmp_path), world_size=2)):
            pass
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("script", ["main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_segment.py",
                                    "main_detect.py", "training/launch.py"])
def test_every_training_script_takes_the_stop_signals_on_its_first_line(script):
    """Before any import: a stop while torch loads must not kill the process (status -15, no requeue)."""
    import ast
    body = ast.parse((ROOT / script).read_text()).body
    first = body[1] if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body[0]
    while isinstance(first, (ast.Import, ast.ImportFrom)) and all(
            alias.name in ("signal", "sys", "training", "signals") for alias in first.names):
        first = body[body.index(first) + 1]  # the launcher imports the module itself first (no torch in it)
    assert isinstance(first, ast.If) and "__main__" in ast.unparse(first.test), script
    assert "handle_from_start()" in ast.unparse(first), script
