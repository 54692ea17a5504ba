"""A run's stops on a signal (part of training.run.Run).

SIGTERM and SIGUSR1 (and --stop_signals) end the run after the current optimizer step on every rank, with a
checkpoint of that step (its position in the round's sample order included), or, when the signal came between rounds
(during an evaluation or a save), before the next round, whose predecessor is saved; then Preempted, which a script
turns into exit status 75 (EX_TEMPFAIL): "requeue me". The loader workers ignore them (training.data), so a signal to
the whole job stops it the same way. A stop after an unread non-finite loss saves nothing (the non-finite policy).
Before the run takes the signals and after it leaves, training.signals handles them.
"""
import signal

from training import signals
from training.errors import REQUEUE_EXIT_CODE, NonFiniteLossError, Preempted
from training.meters import Progress


class StopRequests:
    """The stop duty of a run: takes the stop signals while the run lives (`take_signals` / `give_back_signals`),
    agrees on a stop with every process (`requested`) and ends the run at a round's step or between rounds.
    `processes`: the run's training.distributed.DistributedContext."""

    def __init__(self, stop_signals: str, processes):
        self.stop_signals, self.processes = stop_signals, processes
        self.received = None  # the name of the first stop signal received
        self._previous = {}

    def take_signals(self) -> None:
        # from here the run takes the stop signals: a stop before the first step exits 75 before it (training.signals)
        self._previous = signals.run_started(self._on_signal, signals.parse_signals(self.stop_signals))

    def give_back_signals(self) -> None:
        # what the run ended as stands: a stop signal from now on is ignored (training.signals)
        signals.run_ended(self._previous)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping after the current step with a checkpoint of it", force=True,
                  flush=True)

    def requested(self) -> bool:
        """Whether any process received a stop signal, agreed on by all of them (a host-side collective on the CPU:
        no device sync)."""
        return self.processes.any_of(self.received is not None, "the agreement on stopping (once per optimizer step)")

    def before_round(self, round_index: int, unit: str, held: str) -> None:
        """A stop signal that arrived outside a round (during the evaluation or the saves of the round before, or
        before the first): the rounds before `round_index` are already saved (`held` says where), so every rank
        raises Preempted before training any of this one (a round's own steps check at each optimizer step)."""
        if self.requested():
            print(f"stopping before {unit} {round_index}: {held}; exiting with status {REQUEUE_EXIT_CODE} (requeue)",
                  flush=True)
            raise Preempted()

    def at_step(self, state, round_index: int, progress: Progress, checkpoints, **extra) -> None:
        """If `progress` stopped on a signal: the main process saves checkpoint-last.pth at that step (with where the
        round stopped and every process's record so far, `checkpoints.save_stop`), every process waits for the save
        and raises Preempted (exit status 75). A loss that became non-finite since it was last read ends the run as
        the non-finite policy does: named, the last good checkpoint kept."""
        if not progress.stopped:
            return
        try:
            state.step.raise_if_nonfinite()  # every process takes this check: it is a collective
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err} (found when stopping on a signal: nothing was saved)") from None
        records = self.processes.gather(progress.state_dict(), "the gathering of the round's records for the stop "
                                                               "checkpoint")
        checkpoints.save_stop(state, round_index, records, progress.total, **extra)
        self.processes.barrier("the wait for the stop checkpoint")  # no process exits (and gets its peers killed)
        raise Preempted()                                           # before the save
