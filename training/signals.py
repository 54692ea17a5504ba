"""Stop signals over a training process's whole life, so that every stop is a clean requeue: a scheduler (SLURM's
preemption, its time limit, `scancel`, submitit) signals the job, and the job's exit status says what to do next, 75
(EX_TEMPFAIL) "requeue me" or 0 "done".

A script calls `handle_from_start()` on its first line, before it imports torch; training.launch does the same. From
then on the process is in one of three phases, and a stop signal (--stop_signals: SIGTERM and SIGUSR1 by default)
means, in each:

- starting (imports, flags, data scanning, model building, until a run takes over): nothing is trained and nothing is
  saved yet, so the process exits at once with status 75 and writes nothing;
- running (training.run.Run, from entering to leaving): the run's own handler takes it: every process finishes its
  step, the main one saves it, and all exit with 75 (Run.stop_if_requested);
- ended (after the run left): what the run ended as stands (0 when it completed, its last save made; 75 when it
  stopped with its checkpoint; 1 when it failed), so the process ignores stop signals and ends with that status. A
  signal after the last save no longer turns a finished run into a killed one; and it must be ignored, not handled:
  Python resets its handlers while the interpreter shuts down, and a signal then would kill the process.

This module imports neither torch nor anything that does: it must run before they load.
"""
import os
import signal
import sys
from typing import Callable, Iterable, Optional

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (training.errors.REQUEUE_EXIT_CODE, which re-exports this)
DEFAULT_STOP_SIGNALS = "TERM,USR1"

_run_handler: Optional[Callable] = None  # the running phase's: the run's own
_installed = set()


def signal_names(argv: Iterable[str]) -> str:
    """--stop_signals as given on a command line (`--stop_signals X` or `--stop_signals=X`), else the default: read
    before the flags are parsed, since a stop may come while they are."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--stop_signals" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--stop_signals="):
            return arg.split("=", 1)[1]
    return DEFAULT_STOP_SIGNALS


def parse_signals(names: str) -> list:
    """The signals of a comma-separated list of names (TERM, USR1, ...); unknown names are left out (the flag's check
    names them)."""
    found = []
    for name in (n.strip() for n in names.split(",")):
        sig = getattr(signal, "SIG" + name, None)
        if isinstance(sig, signal.Signals) and sig not in (signal.SIGKILL, signal.SIGSTOP):
            found.append(sig)
    return found


def _exit_now(status: int, why: str) -> None:
    print(f"{why}; exiting with status {status}{' (requeue)' if status == REQUEUE_EXIT_CODE else ''}", flush=True)
    sys.stderr.flush()
    os._exit(status)  # no cleanup to run: nothing started, or everything finished


def _on_signal(signum, frame) -> None:
    if _run_handler is not None:
        _run_handler(signum, frame)
    else:
        _exit_now(REQUEUE_EXIT_CODE, f"received {signal.Signals(signum).name} while starting: nothing was trained or "
                                     f"saved")


def handle(signals: Iterable[signal.Signals]) -> None:
    """Takes these signals in this process (the phases of the module's notes)."""
    for sig in signals:
        signal.signal(sig, _on_signal)
        _installed.add(sig)


def handle_from_start(argv: Optional[Iterable[str]] = None) -> None:
    """A script's first line: the stop signals its command line names (sys.argv's --stop_signals, else TERM and
    USR1) end the process with status 75 while it starts."""
    handle(parse_signals(signal_names(sys.argv[1:] if argv is None else argv)))


def run_started(run_handler: Callable, signals: Iterable[signal.Signals]) -> dict:
    """A run takes over: `run_handler(signum, frame)` gets the stop signals (--stop_signals) until `run_ended`.
    Returns the handlers they had, for `run_ended`."""
    global _run_handler
    _run_handler = run_handler
    previous = {sig: signal.getsignal(sig) for sig in signals}
    handle(signals)
    return previous


def run_ended(previous: dict) -> None:
    """The run left, whatever it ended as. In a script (`handle_from_start`), stop signals are ignored from now on:
    the process ends with the run's status; a process that took no signals before the run (a test, a notebook) gets
    its own handlers back."""
    global _run_handler
    _run_handler = None
    for sig, handler in previous.items():
        signal.signal(sig, signal.SIG_IGN if handler is _on_signal else handler)
        if handler is not _on_signal:
            _installed.discard(sig)


def handled() -> set:
    """The signals this module takes in this process."""
    return set(_installed)
