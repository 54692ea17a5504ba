"""torchrun, with the exit status a scheduler needs to requeue a stopped run.

    python -m training.launch --nproc_per_node=8 main_pretrain.py --data_path /path/to/imagenet ...

It takes torchrun's flags and starts the training processes as torchrun does (its own agent, in this process). Two
things differ, both for jobs that a scheduler stops and requeues (PRETRAIN.md, "Preemption and requeueing"):
- A signal that reaches the launcher (SIGTERM, SIGUSR1, ...) does not end it: it is passed on to the training
  processes, which finish their step, save it, and exit with status 75, and the launcher waits for them. torchrun
  instead shuts down on SIGTERM (forwarding it, and killing its processes after a while) and dies of SIGUSR1,
  leaving its processes to train on.
- The launcher exits with 75 when the training processes did (one is enough: see `exit_status`): "stopped with a
  checkpoint, requeue me". torchrun exits 1 for any process that ends with another status than 0.
- A stop signal before the training processes exist (while torch loads, before the agent starts them) ends the
  launcher at once with 75: nothing was started (training.signals, installed before torch is imported).
Otherwise its exit status is torchrun's: 0 when every process succeeded, 1 when one failed.
"""
import signal
import sys

from training import signals

if __name__ == "__main__":  # before torch loads: a stop while starting is a requeue (training.signals)
    signals.handle_from_start()

import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from typing import List, Optional  # noqa: E402

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import get_args_parser, run as torchrun  # noqa: E402

from training.signals import REQUEUE_EXIT_CODE  # noqa: E402

# Passed on to the training processes: the scheduler's stop signals (SIGTERM, SLURM's --signal, submitit's SIGUSR2)
# and the terminal's (each process decides what the signal means: its --stop_signals save and requeue).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def child_pids(pid: int) -> List[int]:
    """The processes whose parent is `pid`, read from /proc (Linux, where clusters run; elsewhere none are found and
    a signal reaches the training processes only when it is sent to them too, as to a process group)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


class _SignalsHandledHere(logging.Filter):
    """Drops the agent's warning that it cannot install its signal handlers from a thread: the launcher's main thread
    handles them (and passes them on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to register signal handlers" not in record.getMessage()


def exit_status(failures: Optional[dict]) -> int:
    """The launcher's exit status from torchrun's failures ({rank: ProcessFailure}; None: every process exited 0).

    One process's status 75 means the stop checkpoint is complete: a process exits with 75 only after every process
    has waited for the main one's save (training.run.Run.stop_if_requested). The others may then end otherwise,
    e.g. killed by the SIGTERM that torch's agent sends to the processes still tearing down after the first exit."""
    if not failures:
        return 0
    if any(failure.exitcode == REQUEUE_EXIT_CODE for failure in failures.values()):
        return REQUEUE_EXIT_CODE
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    # The agent runs in a thread, so that signals reach this main thread (torch's agent would turn SIGTERM into its
    # own shutdown, and has no handler for SIGUSR1).
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_SignalsHandledHere())
    outcome = {}

    def agent() -> None:
        try:
            torchrun(args)
            outcome["failures"] = None
        except ChildFailedError as err:
            outcome["failures"], outcome["message"] = err.failures, err.format_msg()
        except BaseException as err:  # noqa: B036  (re-raised in the main thread)
            outcome["error"] = err

    stop_signals = signals.parse_signals(signals.signal_names(argv if argv is not None else sys.argv[1:]))

    def forward(signum, frame) -> None:
        name = signal.Signals(signum).name
        pids = child_pids(os.getpid())
        if not pids and signum in stop_signals:  # the agent has not started them yet: nothing to stop or save
            print(f"training.launch: received {name} before the training processes started; exiting with status "
                  f"{REQUEUE_EXIT_CODE} (requeue)", file=sys.stderr, flush=True)
            os._exit(REQUEUE_EXIT_CODE)
        print(f"training.launch: received {name}; passing it on to the training processes "
              f"{', '.join(map(str, pids)) or '(none running)'}", file=sys.stderr, flush=True)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    thread = threading.Thread(target=agent, name="torchrun agent")
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # short waits: signal handlers run in this thread between them
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    status = exit_status(outcome["failures"])
    if status == REQUEUE_EXIT_CODE:
        ranks = ", ".join(str(rank) for rank, failure in sorted(outcome["failures"].items())
                          if failure.exitcode == REQUEUE_EXIT_CODE)
        print(f"training.launch: the training processes stopped on a signal (status {REQUEUE_EXIT_CODE} from rank "
              f"{ranks}: their last step saved, or nothing trained yet); exiting with status {REQUEUE_EXIT_CODE} "
              f"(requeue)", file=sys.stderr, flush=True)
    elif status:
        print(outcome["message"], file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
