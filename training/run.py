"""The run: what happens around the training loop (training.loop.fit), for every script.

    with Run(cfg) as run:
        model = run.wrap(model)                      # DDP when distributed
        state = CheckpointState(model_without_ddp, optimizer, step, task)
        start = run.resume(state)                    # the newest good checkpoint (see below)
        for r in run.rounds(start, total, loader):   # sets the loader's round (and start, mid-round)
            progress = run.progress(r, iters, names)
            stats = training.loop.train_round(..., progress, ...)
            run.stop_if_requested(state, r, progress)   # SIGTERM / SIGUSR1: save this step, raise Preempted
            run.end_epoch(state, r, record, best=...)

Entering starts the process group (torchrun's environment; NCCL on CUDA, gloo on CPU; collectives time out after
--dist_timeout minutes), prints the run's header and config, seeds, and on the main process takes the output
folder's lock and checks its checkpoints (training.output.OutputFolder: a second live run on it is refused; a dead
run's lock does not count), removes temporary files of interrupted saves, completes the files of the last finished
round if a crash cut its writing short, and opens TensorBoard. Leaving closes them, drops the DDP wrappers and ends
the process group, in that order.

What never goes wrong in silence (docs/RELIABILITY.md):
- Resume takes the newest checkpoint that loads and matches its checksum, among --resume and the output folder's
  own (checkpoint-last.pth and the periodic ones), and says which it took and every file it skipped and why: a
  re-run of the same command never goes back to an older file.
- The flags that define the run's schedule or model must match the checkpoint's (or be named in
  --allow_flag_changes): a changed one stops the run naming its saved and given values. Before them, a checkpoint of
  another script (e.g. a segmentation run's resumed by fine-tuning) stops it naming that script, under
  --allow_flag_changes all and --eval too (training.output.check_checkpoint_script).
- SIGTERM and SIGUSR1 (and --stop_signals) end the run after the current optimizer step on every rank, with a checkpoint
  of that step (its position in the round's sample order included), or, when the signal came between rounds (during an
  evaluation or a save), before the next round, whose predecessor is saved; then Preempted, which a script turns into
  exit status 75 (EX_TEMPFAIL): "requeue me". The loader workers ignore them (training.data), so a signal to the whole
  job stops it the same way.
- No save writes non-finite weights or optimizer state; a stop after an unread non-finite loss saves nothing.
- A folder whose checkpoints are all damaged stops the run, unchanged (--start_over sets them aside); completing an
  epoch's files verifies what it copies; a torn line of log.txt is dropped, named and kept in a copy.
"""
import datetime
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from dmjd_encoders.pretrained import saved_args
from training import signals
from training.config import TrainConfig
from training.distributed import (cleanup_distributed, init_distributed, last_collective, note_collective,
                                  ranks_not_arrived)
from training.errors import REQUEUE_EXIT_CODE, NonFiniteLossError, Preempted, RunError  # noqa: F401 (re-exported)
from training.meters import Progress
from training.output import (OutputFolder, NamedWriter, append_line, check_checkpoint_script, checkpoint_position,
                             first_loadable, last_checkpoint_path, newest_checkpoint, resume_candidates,
                             _drop_log_lines, _print_skip)
from training.step import TrainStep
from dmjd_encoders.checkpoint import load_state_dict_strict
from util.misc import seed_everything


@dataclass
class CheckpointState:
    """What a checkpoint holds besides the config: the model (without DDP), the optimizer, the step's grad scaler
    and count of skipped non-finite steps, and a task's own state (`task.extra_state()` /
    `task.load_extra_state(checkpoint, path)`, e.g. pre-training's EMA teacher)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    task: Optional[object] = None


class Run:
    def __init__(self, cfg: TrainConfig, save_freq: Optional[int] = None, keep_last: int = 0):
        """`save_freq`: also keep `checkpoint-<round>.pth` every that many rounds (and at the last), of which
        `keep_last` (0 = all) are kept."""
        self.cfg = cfg
        self.folder = OutputFolder(cfg.output_dir, save_freq, keep_last)
        self.writer: Optional[NamedWriter] = None
        self.saved: dict = {}  # the resumed checkpoint's entries other than the state (e.g. best_acc1)
        self.rounds_total = getattr(cfg, "epochs", 0)  # set by `rounds`
        self._wrapped = []
        self._stop_signal = None
        self._previous_handlers = {}
        self._control = None  # a CPU (gloo) group for the stop agreement, whatever the backend
        self._resume_at: Tuple[int, int] = (0, 0)
        self._resumed_progress: Optional[dict] = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Run":
        # from here the run takes the stop signals: a stop before the first step exits 75 before it (training.signals)
        self._previous_handlers = signals.run_started(self._on_stop_signal,
                                                      signals.parse_signals(self.cfg.stop_signals))
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())  # what was started is ended, and the handlers given back
            raise
        return self

    def _start(self) -> None:
        self.dist = init_distributed(self.cfg.device, self.cfg.dist_timeout)
        if self.dist.world_size != self.cfg.world_size:
            raise RuntimeError(f"the config was resolved for {self.cfg.world_size} processes, the run has "
                               f"{self.dist.world_size}")
        if self.dist.distributed:
            self._control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}  device {self.device}, world size {self.world_size}, "
              f"amp {self.cfg.amp}")
        print(json.dumps(self.cfg.flags(), indent=1, default=str))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        seed_everything(self.cfg.seed + self.rank)
        self._take_folder()
        if self.is_main:
            self.folder.open()
            self.writer = NamedWriter(self.cfg.log_dir or self.cfg.output_dir)

    def _take_folder(self) -> None:
        """The main process locks the output folder and checks its checkpoints before anything in it changes; every
        process stops if the main one may not use the folder."""
        refused = None
        if self.is_main:
            try:
                os.makedirs(self.cfg.output_dir, exist_ok=True)
                self.folder.check_files()
                self.folder.take_lock()
                if self.cfg.trains and not self.cfg.resume:
                    self.folder.check_checkpoints(self.cfg.start_over)
            except RunError as err:
                refused = str(err)
        if self._control is not None:
            shared = [refused]
            dist.broadcast_object_list(shared, src=0, group=self._control)
            refused = shared[0]
        if refused:
            raise RunError(refused)

    def __exit__(self, exc_type, exc, tb) -> None:
        # what the run ended as stands: a stop signal from now on is ignored (training.signals)
        signals.run_ended(self._previous_handlers)
        # Every step of the teardown runs, whatever the others do (a full disk can fail TensorBoard's close after the
        # save that the run failed on): a step skipped would leave a lock, or a process group, behind.
        failed = []
        for what, close in (("TensorBoard's writer", self.writer.close if self.writer is not None else None),
                            ("the output folder's lock", self.folder.close)):
            try:
                if close is not None:
                    close()
            except Exception as err:  # noqa: BLE001 (each is named below)
                failed.append(f"closing {what}: {err}")
        # DDP wrappers go before the process group (see training.distributed.cleanup_distributed): ours, and those
        # that the frames of a propagating exception still hold.
        if tb is not None:
            traceback.clear_frames(tb)
        self._wrapped.clear()
        try:
            cleanup_distributed()
        except Exception as err:  # noqa: BLE001
            failed.append(f"ending the process group: {err}")
        processes = getattr(self, "dist", None)  # None when the process group did not start
        if exc is not None and processes is not None and processes.distributed and _is_timeout(exc):
            what = last_collective()
            # The processes that time out in the same collective say so; the others did not arrive.
            wait = min(30.0, max(2.0, 6 * self.cfg.dist_timeout))  # seconds: 10% of the timeout, within bounds
            missing = ranks_not_arrived(what, self.rank, self.world_size, wait)
            who = (f"rank {', '.join(map(str, missing))} did not arrive: it stopped, hangs or died" if missing else
                   "another process stopped, hangs or died")
            detail = str(exc).strip().splitlines()[0]
            raise RunError(f"rank {self.rank} of {self.world_size}: {what} timed out after --dist_timeout "
                           f"{self.cfg.dist_timeout:g} minutes: {who}. ({detail})") from None
        if failed and exc is None:
            raise RunError("the run ended, but " + "; ".join(failed))
        if failed:  # the run's own error goes on: it is the one to report
            print("while ending after an error, " + "; ".join(failed), flush=True)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in DDP when the run is distributed (gradients live in the all-reduce buckets: no copy)."""
        if not self.dist.distributed:
            return model
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
        self._wrapped.append(wrapped)
        return wrapped

    # -- rounds (epochs, or evaluation intervals) ---------------------------------------------------------------------
    def rounds(self, start: int, total: int, loader=None, unit: str = "epoch"):
        """The rounds (`unit`s) from `start` to `total - 1`; each sets the training loader's sampler to its round,
        and the first of a resumed run to where the checkpoint stopped in it."""
        self.rounds_total = total
        print(f"training {unit}s {start} to {total - 1}")
        began = datetime.datetime.now()
        for index in range(start, total):
            self._stop_between_rounds(index, unit)
            if loader is not None:
                loader.sampler.set_epoch(index, start=self._first_iteration(index) * self.cfg.batch_size)
            yield index
        print(f"training time {datetime.timedelta(seconds=int((datetime.datetime.now() - began).total_seconds()))}")

    def _stop_between_rounds(self, index: int, unit: str) -> None:
        """A stop signal that arrived outside a round (during the evaluation or the saves of the round before, or
        before the first): the rounds before `index` are already in checkpoint-last.pth, so every rank raises
        Preempted before training any of this one (a round's own steps check at each optimizer step)."""
        if not self.stop_requested():
            return
        if index == self._resume_at[0] and self._resume_at[1]:
            held = f"the checkpoint resumed holds {unit} {index} up to iteration {self._resume_at[1]}"
        elif index:
            held = f"{last_checkpoint_path(self.cfg.output_dir)} holds {unit}s 0 to {index - 1}"
        else:
            held = "nothing was trained yet"
        print(f"stopping before {unit} {index}: {held}; exiting with status {REQUEUE_EXIT_CODE} (requeue)",
              flush=True)
        raise Preempted()

    def _first_iteration(self, index: int) -> int:
        return self._resume_at[1] if index == self._resume_at[0] else 0

    def progress(self, index: int, iters: int, names=("loss",), header: Optional[str] = None,
                 later_iters: Optional[int] = None) -> Progress:
        """The Progress of a training round: --print_freq lines, the run's ETA (`later_iters`: the micro-batches of
        the rounds after it; by default, rounds of `iters`), stops agreed at optimizer-step boundaries, and for the
        round a checkpoint stopped in, the iteration and record it stopped at."""
        later = (self.rounds_total - index - 1) * iters if later_iters is None else later_iters
        progress = Progress(header or f"Epoch [{index}]", iters, self.cfg.print_freq, self.device, later, names,
                            first=self._first_iteration(index), stop=self.stop_requested,
                            stop_every=self.cfg.accum_iter)
        if progress.first and self._resumed_progress is not None:
            progress.load_state_dict(self._resumed_progress)
        return progress

    # -- stopping on a signal -----------------------------------------------------------------------------------------
    def _on_stop_signal(self, signum, frame) -> None:
        if self._stop_signal is None:
            self._stop_signal = signal.Signals(signum).name
            print(f"received {self._stop_signal}: stopping after the current step with a checkpoint of it",
                  force=True, flush=True)

    def stop_requested(self) -> bool:
        """Whether any process received a stop signal, agreed on by all of them (a host-side collective on the CPU:
        no device sync)."""
        flag = torch.tensor([self._stop_signal is not None], dtype=torch.int32)
        if self._control is not None:
            note_collective("the agreement on stopping (once per optimizer step)")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control)
        return bool(flag.item())

    def stop_if_requested(self, state: CheckpointState, index: int, progress: Progress, **extra) -> None:
        """If `progress` stopped on a signal: saves checkpoint-last.pth at that step (with where the round stopped
        and its record so far), waits for every process, and raises Preempted (exit status 75). A loss that became
        non-finite since it was last read ends the run as the non-finite policy does: named, the last good
        checkpoint kept."""
        if not progress.stopped:
            return
        try:
            state.step.raise_if_nonfinite()  # every process takes this check: it is a collective
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err} (found when stopping on a signal: nothing was saved)") from None
        record = progress.state_dict()
        records = [record]  # each process's record of the round so far: its own losses and counts
        if self._control is not None:
            records = [None] * self.world_size
            note_collective("the gathering of the round's records for the stop checkpoint")
            dist.all_gather_object(records, record, group=self._control)
        if self.is_main:
            ckpt, checked = self.checkpoint(state, index - 1, **extra)
            ckpt.update(resume_at={"epoch": index, "iteration": record["iteration"]}, progress=record,
                        progress_by_rank=records)
            self.folder.save(ckpt, last_checkpoint_path(self.cfg.output_dir), checked)
            print(f"saved {last_checkpoint_path(self.cfg.output_dir)} at epoch {index}, iteration "
                  f"{record['iteration']} of {progress.total}; exiting with status {REQUEUE_EXIT_CODE} (requeue)",
                  flush=True)
        if self._control is not None:
            note_collective("the wait for the stop checkpoint")
            dist.barrier(group=self._control)  # no process exits (and gets its peers killed) before the save
        raise Preempted()

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def checkpoint(self, state: CheckpointState, epoch: int, **extra) -> Tuple[dict, tuple]:
        """(the checkpoint's content: plain dicts of tensors and primitives that load with weights_only=True, the
        entries whose values must be finite for it to be saved: the model, the optimizer and the task's own)."""
        step = state.step
        own = state.task.extra_state() if state.task is not None else {}
        content = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                   "scaler": step.scaler.state_dict() if step.scaler is not None else None, **own,
                   "epoch": epoch, "nonfinite_skipped": step.skipped, "args": self.cfg.flags(), **extra}
        return content, ("model", "optimizer") + tuple(own)

    def resume_path(self, auto: bool = True) -> Optional[str]:
        """The checkpoint `resume` would load (without loading its weights): the newest readable one of --resume and
        (with `auto`) the output folder's. Another script's checkpoint stops the run here, before a model is built
        for it (`_check_script`)."""
        path = newest_checkpoint(self.cfg.resume, self.cfg.output_dir if auto else None)
        if path:
            self._check_script(path, saved_args(path))
        return path

    def _check_script(self, path: str, saved: Optional[dict]) -> None:
        check_checkpoint_script(path, saved, self.cfg.flags(), evaluating=not self.cfg.trains)

    def _load_newest(self, auto: bool) -> Optional[Tuple[str, dict]]:
        if auto and not self.cfg.resume and self.is_main and self.cfg.trains:
            found, self.folder.verified = self.folder.verified, None  # read and reported at the start
            return found
        candidates = resume_candidates(self.cfg.resume, self.cfg.output_dir if auto else None)
        found, skipped = first_loadable([path for _, path in candidates], self.cfg.resume)
        for path, why in skipped:
            _print_skip(path, why)
        return found

    def resume(self, state: Optional[CheckpointState], model: Optional[torch.nn.Module] = None,
               auto: bool = True) -> int:
        """Loads the newest good checkpoint into `state` and returns the round to continue at (0 without one).

        The candidates are --resume and, with `auto`, the output folder's checkpoint-last.pth and periodic
        checkpoints: the newest (by round and iteration) that loads and matches its checksum wins, so that re-running
        the same command (a requeue) never goes back; every file skipped is named with the reason. The run's
        schedule and model flags must match the checkpoint's (--allow_flag_changes names exceptions). With `state`
        None, only the weights go into `model` (evaluation). The checkpoint's other entries are kept in
        `self.saved`; log.txt lines of rounds it redoes are dropped."""
        chosen = self._load_newest(auto)
        if chosen is None:
            return 0
        path, ckpt = chosen
        if self.cfg.resume and os.path.abspath(path) != os.path.abspath(self.cfg.resume):
            print(f"--resume {self.cfg.resume} is older than {path}: resuming from the newer one, so that running "
                  f"the same command again never goes back (to go back, give another --output_dir)")
        self._check_script(path, ckpt.get("args"))  # before the flags and weights, whose errors would mislead
        if state is not None:  # evaluating a checkpoint may change anything
            self._check_flags(path, ckpt.get("args") or {})
        self._load_weights(path, ckpt, state.model if state is not None else model)
        own = tuple(state.task.extra_state()) if state is not None and state.task is not None else ()
        self.saved = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scaler") + own}
        if state is None:
            print(f"resumed from {path}")
            return 0
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.step.scaler is not None and ckpt.get("scaler"):
            state.step.scaler.load_state_dict(ckpt["scaler"])
        if state.task is not None:
            state.task.load_extra_state(ckpt, path)
        state.step.skipped = ckpt.get("nonfinite_skipped", 0)  # --skip_nonfinite counts over the whole run
        self._resume_at = checkpoint_position(ckpt)
        by_rank = ckpt.get("progress_by_rank")  # before it existed: rank 0's record, for every process
        self._resumed_progress = by_rank[self.rank] if by_rank else ckpt.get("progress")
        index, iteration = self._resume_at
        print(f"resumed from {path}: continuing at epoch {index}" +
              (f", iteration {iteration} (the rest of the epoch, in the same sample order)" if iteration else ""))
        if self.is_main:
            _drop_log_lines(self.folder.log, index)
        return index

    def _load_weights(self, path: str, ckpt: dict, model: torch.nn.Module) -> None:
        try:
            load_state_dict_strict(model, ckpt["model"])
        except RuntimeError as err:  # e.g. --allow_flag_changes model: the weights are another architecture's
            args, given = ckpt.get("args") or {}, self.cfg.flags()
            predated = [(name, value) for name, value in self.cfg.absent_values().items()
                        if name not in args and value != given[name]]
            if predated:  # e.g. --eval of a checkpoint saved before a model option existed (it was off)
                shown = ", ".join(f"--{name} {value!r}" for name, value in predated)
                raise RunError(f"{path} was saved before these flags existed and its weights need their former "
                               f"values: {shown} (this run has {', '.join(repr(given[n]) for n, _ in predated)})")
            saved = args.get("model", "another model")
            raise RunError(f"{path} holds the weights of --model {saved}, which do not load into this run's --model "
                           f"{self.cfg.model} ({str(err).split(': ', 1)[-1][:300]}). Resume with --model {saved}, "
                           f"or train {self.cfg.model} in another --output_dir") from None

    def _check_flags(self, path: str, saved: dict) -> None:
        allowed = {n.strip() for n in self.cfg.allow_flag_changes.split(",") if n.strip()}
        given = self.cfg.flags()
        # a flag the checkpoint predates: its run had the flag's declared `absent` value (an option then off)
        absent = {name: value for name, value in self.cfg.absent_values().items() if name not in saved}
        saved = dict(absent, **saved)
        changed = [(name, saved[name], given[name]) for name in self.cfg.must_match()
                   if name in saved and saved[name] != given[name] and name not in allowed and "all" not in allowed]
        if changed:
            shown = "; ".join(f"--{name}: saved {a!r}{' (saved before the flag existed)' if name in absent else ''}"
                              f", given {b!r}" for name, a, b in changed)
            raise RunError(f"{path} was trained with other flags that define the run: {shown}. Resume with the saved "
                           f"values, or give --allow_flag_changes {','.join(n for n, _, _ in changed)} to change "
                           f"them deliberately")

    def end_epoch(self, state: CheckpointState, index: int, record: dict, best: bool = False, **extra) -> None:
        """On the main process: the round's checkpoints and log.txt line (OutputFolder.save_round)."""
        if not self.is_main:
            return
        self.folder.save_round(*self.checkpoint(state, index, **extra), index, self.rounds_total, record, best)
        self.writer.flush()

    def append_log(self, record: dict) -> None:
        """A record in log.txt (fsync'd), on the main process."""
        if self.is_main:
            append_line(self.folder.log, record)


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


