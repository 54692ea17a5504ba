"""The run: what happens around the training loop (training.loop.fit), for every script.

    with Run(cfg) as run:
        model = run.wrap(model)                      # DDP when distributed
        state = CheckpointState(model_without_ddp, optimizer, step, task)
        start = run.resume(state)                    # the newest good checkpoint
        for r in run.rounds(start, total, loader):   # sets the loader's round (and start, mid-round)
            progress = run.progress(r, iters, names)
            stats = training.loop.train_round(..., progress, ...)
            run.stop_if_requested(state, r, progress)   # SIGTERM / SIGUSR1: save this step, raise Preempted
            run.end_round(state, r, record, best=...)

A Run is three parts, one duty each, and what joins them:
- `processes` (training.distributed.DistributedContext): the process group (torchrun's environment; NCCL on CUDA,
  gloo on CPU; collectives time out after --dist_timeout minutes), DDP, and the host-side agreements;
- `checkpoints` (training.checkpointing.Checkpoints): the output folder, what a checkpoint holds, resume and the flags
  it must match, the saves;
- `stops` (training.stopping.StopRequests): the stop signals, the agreement on a stop, and the stop itself.

Entering starts the process group, prints the run's header and config, seeds, and on the main process takes the
output folder's lock and checks its checkpoints (training.output.OutputFolder: a second live run on it is refused;
a dead run's lock does not count), removes temporary files of interrupted saves, completes the files of the last
finished round if a crash cut its writing short, and opens TensorBoard. Leaving gives the stop signals back (from
then on they are ignored: training.signals), closes TensorBoard and the lock, drops the DDP wrappers and ends the
process group, in that order; every step runs, whatever the others do, and a failed one is named.

What never goes wrong in silence is listed in docs/RELIABILITY.md.
"""
import datetime
import json
import sys
from typing import Optional

import torch

from training.checkpointing import CheckpointState, Checkpoints
from training.config import TrainConfig
from training.distributed import DistributedContext
from training.errors import RunError
from training.meters import Progress
from training.output import NamedWriter
from training.stopping import StopRequests
from util.misc import seed_everything


class Run:
    def __init__(self, cfg: TrainConfig, save_freq: Optional[int] = None, keep_last: int = 0):
        """`save_freq`: also keep `checkpoint-<round>.pth` every that many rounds (and at the last), of which
        `keep_last` (0 = all) are kept."""
        self.cfg = cfg
        self.processes = DistributedContext(cfg.device, cfg.world_size, cfg.dist_timeout)
        self.checkpoints = Checkpoints(cfg, self.processes, save_freq, keep_last)
        self.stops = StopRequests(cfg.stop_signals, self.processes)
        self.writer: Optional[NamedWriter] = None
        self.rounds_total = getattr(cfg, "epochs", 0)  # set by `rounds`

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Run":
        self.stops.take_signals()
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())  # what was started is ended, and the handlers given back
            raise
        return self

    def _start(self) -> None:
        self.processes.start()
        print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}  device {self.device}, world size {self.world_size}, "
              f"amp {self.cfg.amp}")
        print(json.dumps(self.cfg.flags(), indent=1, default=str))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        seed_everything(self.cfg.seed + self.rank)
        self.checkpoints.take_folder()
        if self.is_main:
            self.writer = NamedWriter(self.cfg.log_dir or self.cfg.output_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stops.give_back_signals()
        # Every step of the teardown runs, whatever the others do (a full disk can fail TensorBoard's close after the
        # save that the run failed on): a step skipped would leave a lock, or a process group, behind.
        failed = []
        for what, close in (("TensorBoard's writer", self.writer.close if self.writer is not None else None),
                            ("the output folder's lock", self.checkpoints.folder.close)):
            try:
                if close is not None:
                    close()
            except Exception as err:  # noqa: BLE001 (each is named below)
                failed.append(f"closing {what}: {err}")
        failed += self.processes.end(exc, tb)
        if failed and exc is None:
            raise RunError("the run ended, but " + "; ".join(failed))
        if failed:  # the run's own error goes on: it is the one to report
            print("while ending after an error, " + "; ".join(failed), flush=True)

    @property
    def device(self) -> torch.device:
        return self.processes.device

    @property
    def rank(self) -> int:
        return self.processes.rank

    @property
    def world_size(self) -> int:
        return self.processes.world_size

    @property
    def is_main(self) -> bool:
        return self.processes.is_main

    @property
    def dist(self):
        """The process's training.distributed.DistInfo (rank, world size, device), as the loaders take it."""
        return self.processes.info

    @property
    def saved(self) -> dict:
        """The resumed checkpoint's entries other than the state (e.g. best_acc1)."""
        return self.checkpoints.saved

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.processes.wrap(model)

    def resume(self, state: Optional[CheckpointState], model: Optional[torch.nn.Module] = None,
               auto: bool = True) -> int:
        return self.checkpoints.resume(state, model, auto)

    def resume_path(self, auto: bool = True) -> Optional[str]:
        return self.checkpoints.resume_path(auto)

    # -- rounds (epochs, or evaluation intervals) ---------------------------------------------------------------------
    def rounds(self, start: int, total: int, loader=None, unit: str = "epoch"):
        """The rounds (`unit`s) from `start` to `total - 1`; each sets the training loader's sampler to its round,
        and the first of a resumed run to where the checkpoint stopped in it. A stop requested between rounds ends
        the run before the next (StopRequests.before_round)."""
        self.rounds_total = total
        print(f"training {unit}s {start} to {total - 1}")
        began = datetime.datetime.now()
        for index in range(start, total):
            self.stops.before_round(index, unit, self.checkpoints.held_before(index, unit))
            if loader is not None:
                loader.sampler.set_epoch(index, start=self.checkpoints.first_iteration(index) * self.cfg.batch_size)
            yield index
        print(f"training time {datetime.timedelta(seconds=int((datetime.datetime.now() - began).total_seconds()))}")

    def progress(self, index: int, iters: int, names=("loss",), header: Optional[str] = None,
                 later_iters: Optional[int] = None) -> Progress:
        """The Progress of a training round: --print_freq lines, the run's ETA (`later_iters`: the micro-batches of
        the rounds after it; by default, rounds of `iters`), stops agreed at optimizer-step boundaries, and for the
        round a checkpoint stopped in, the iteration and record it stopped at."""
        later = (self.rounds_total - index - 1) * iters if later_iters is None else later_iters
        progress = Progress(header or f"Epoch [{index}]", iters, self.cfg.print_freq, self.device, later, names,
                            first=self.checkpoints.first_iteration(index), stop=self.stops.requested,
                            stop_every=self.cfg.accum_iter)
        if progress.first and self.checkpoints.resumed_progress is not None:
            progress.load_state_dict(self.checkpoints.resumed_progress)
        return progress

    def stop_requested(self) -> bool:
        return self.stops.requested()

    def stop_if_requested(self, state: CheckpointState, index: int, progress: Progress, **extra) -> None:
        """If `progress` stopped on a signal: a checkpoint of that step, then Preempted (StopRequests.at_step)."""
        self.stops.at_step(state, index, progress, self.checkpoints, **extra)

    def end_round(self, state: CheckpointState, index: int, record: dict, best: bool = False, **extra) -> None:
        """On the main process: the round's checkpoints and log.txt line (OutputFolder.save_round)."""
        self.checkpoints.save_round(state, index, self.rounds_total, record, best, **extra)
        if self.writer is not None:
            self.writer.flush()

    def append_log(self, record: dict) -> None:
        """A record in log.txt (fsync'd), on the main process."""
        self.checkpoints.append_log(record)
