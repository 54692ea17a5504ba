"""The run skeleton that every training script shares: what happens around its epochs.

    with Run(cfg) as run:
        model = run.wrap(model)                      # DDP when distributed
        state = TrainState(model_without_ddp, optimizer, step, teacher)
        start = run.resume(state)                    # the newest good checkpoint (see below)
        for epoch in run.epochs(start, loader):      # sets the loader's epoch (and start, mid-epoch)
            progress = run.progress(epoch, iters, names)
            stats = engine.train_one_epoch(..., progress, ...)
            run.stop_if_requested(state, epoch, progress)   # SIGTERM / SIGUSR1: save this step, exit 75
            run.end_epoch(state, epoch, record, best=...)

Entering starts the process group (torchrun's environment; NCCL on CUDA, gloo on CPU; collectives time out after
--dist_timeout minutes), prints the run's header and config, seeds, and on the main process takes the output
folder's lock (a second live run on it is refused; a dead run's lock does not count), removes temporary files of
interrupted saves, completes the files of the last finished epoch if a crash cut its writing short, and opens
TensorBoard. Leaving closes them, drops the DDP wrappers and ends the process group, in that order.

What never goes wrong in silence (docs/RELIABILITY.md):
- Resume takes the newest checkpoint that loads and matches its checksum, among --resume and the output folder's
  own (checkpoint-last.pth and the periodic ones), and says which it took and every file it skipped and why: a
  re-run of the same command never goes back to an older file.
- The flags that define the run's schedule or model must match the checkpoint's (or be named in
  --allow_flag_changes): a changed one stops the run naming its saved and given values.
- SIGTERM and SIGUSR1 (and --stop_signals) end the run after the current optimizer step on every rank, with a
  checkpoint of that step (its position in the epoch's sample order included) and exit status 75 (EX_TEMPFAIL):
  "requeue me". The loader workers ignore them (training.data), so a signal to the whole job stops it the same way.
- No save writes non-finite weights or optimizer state; a stop after an unread non-finite loss saves nothing.
- A folder whose checkpoints are all damaged stops the run, unchanged (--start_over sets them aside); completing an
  epoch's files verifies what it copies; a torn line of log.txt is dropped, named and kept in a copy.
"""
import datetime
import errno
import fcntl
import json
import os
import re
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from training.config import TrainConfig
from training.distributed import (cleanup_distributed, init_distributed, last_collective, note_collective,
                                  ranks_not_arrived)
from training.meters import Progress
from training.step import NonFiniteLossError, TrainStep
from util.checkpoint import (CheckpointError, last_checkpoint_path, link_checkpoint, load_checkpoint,
                             load_state_dict_strict, no_space_error, periodic_checkpoint_path,
                             prune_periodic_checkpoints, remove_temp_files, save_checkpoint, write_file_atomically)
from util.misc import seed_everything

BEST_CHECKPOINT = "checkpoint-best.pth"
LOCK_FILE = ".lock"
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, to be continued


class Preempted(SystemExit):
    """The run stopped on a signal after saving its last step: the exit status asks for a requeue."""

    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


@dataclass
class TrainState:
    """What a checkpoint holds besides the config: the model (without DDP), the optimizer, the step's grad scaler
    and count of skipped non-finite steps, and the EMA teacher if there is one."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    teacher: Optional[torch.nn.Module] = None


def checkpoint_position(checkpoint: dict) -> Tuple[int, int]:
    """(epoch, iteration) a checkpoint continues at: its `resume_at`, or the epoch after its finished one."""
    at = checkpoint.get("resume_at")
    return (int(at["epoch"]), int(at["iteration"])) if at else (int(checkpoint["epoch"]) + 1, 0)


class Run:
    def __init__(self, cfg: TrainConfig, save_freq: Optional[int] = None, keep_last: int = 0):
        """`save_freq`: also keep `checkpoint-<epoch>.pth` every that many epochs (and at the last), of which
        `keep_last` (0 = all) are kept."""
        self.cfg, self.save_freq, self.keep_last = cfg, save_freq, keep_last
        self.writer: Optional[SummaryWriter] = None
        self.saved: dict = {}  # the resumed checkpoint's entries other than the state (e.g. best_acc1)
        self._wrapped = []
        self._lock = None
        self._stop_signal = None
        self._previous_handlers = {}
        self._control = None  # a CPU (gloo) group for the stop agreement, whatever the backend
        self._resume_at: Tuple[int, int] = (0, 0)
        self._resumed_progress: Optional[dict] = None
        self._verified: Optional[Tuple[str, dict]] = None  # the folder's newest good checkpoint, read at the start

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Run":
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
        refused = None
        if self.is_main:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            try:
                self._take_lock()
                self._check_folder_checkpoints()  # before anything in the folder changes
            except SystemExit as err:
                refused = str(err)
        if self._control is not None:  # every process stops if the main one may not use the folder
            shared = [refused]
            dist.broadcast_object_list(shared, src=0, group=self._control)
            refused = shared[0]
        if refused:
            raise SystemExit(refused)
        if self.is_main:
            removed = remove_temp_files(self.cfg.output_dir)
            if removed:
                print(f"removed {len(removed)} temporary files of interrupted saves: {', '.join(removed)}")
            repair_log(os.path.join(self.cfg.output_dir, "log.txt"))
            self._complete_last_epoch()
            self.writer = _NamedWriter(self.cfg.log_dir or self.cfg.output_dir)
        for name in self.cfg.stop_signals.split(","):
            sig = getattr(signal, "SIG" + name.strip())
            self._previous_handlers[sig] = signal.signal(sig, self._on_stop_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        if self.writer is not None:
            self.writer.close()
        if self._lock is not None:
            self._lock.close()  # releases the lock
        # DDP wrappers go before the process group (see training.distributed.cleanup_distributed): ours, and those that the
        # frames of a propagating exception still hold.
        if tb is not None:
            traceback.clear_frames(tb)
        self._wrapped.clear()
        cleanup_distributed()
        if exc is not None and self.dist.distributed and _is_timeout(exc):
            what = last_collective()
            # The processes that time out in the same collective say so; the others did not arrive.
            wait = min(30.0, max(2.0, 6 * self.cfg.dist_timeout))  # seconds: 10% of the timeout, within bounds
            missing = ranks_not_arrived(what, self.rank, self.world_size, wait)
            who = (f"rank {', '.join(map(str, missing))} did not arrive: it stopped, hangs or died" if missing else
                   "another process stopped, hangs or died")
            detail = str(exc).strip().splitlines()[0]
            raise SystemExit(f"error: rank {self.rank} of {self.world_size}: {what} timed out after --dist_timeout "
                             f"{self.cfg.dist_timeout:g} minutes: {who}. ({detail})") from None

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

    # -- the output folder: one live run at a time, whole epochs ------------------------------------------------------
    def _take_lock(self) -> None:
        # A POSIX record lock: held by this process alone (not by the data loader's forked workers, which outlive a
        # killed run for a while), released by the system when the process ends however it ends, and kept over NFS.
        path = os.path.join(self.cfg.output_dir, LOCK_FILE)
        lock = open(path, "a+")
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise SystemExit(f"error: --output_dir {self.cfg.output_dir} is in use by a live run ({holder}; "
                             f"{path} is locked): stop that run or give another --output_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
        lock.flush()
        self._lock = lock

    def _complete_last_epoch(self) -> None:
        """Writes what a crash left unwritten of the last finished epoch: checkpoint-last.pth is saved first and
        says which periodic and best checkpoint and which log.txt line the epoch has (see end_epoch). What it copies
        is verified first: a damaged checkpoint-last.pth completes nothing (resume skips it, saying why)."""
        last = last_checkpoint_path(self.cfg.output_dir)
        try:
            meta = load_checkpoint(last, mmap=True) if os.path.isfile(last) else {}
        except CheckpointError:
            return  # resume skips it, saying why
        files = meta.get("epoch_files")
        if not files:
            return
        epoch = meta["epoch"]
        wanted = [path for path, due in ((periodic_checkpoint_path(self.cfg.output_dir, epoch), files["periodic"]),
                                         (os.path.join(self.cfg.output_dir, BEST_CHECKPOINT), files["best"]))
                  if due and _epoch_of(path) != epoch]
        log = os.path.join(self.cfg.output_dir, "log.txt")
        log_due = epoch not in _logged_epochs(log)
        if not (wanted or log_due):
            return
        try:  # the whole file, its checksum verified (already, when the folder's check took it as the newest)
            verified = self._verified[1] if self._verified and self._verified[0] == last else load_checkpoint(last)
            files = verified["epoch_files"]
        except CheckpointError as err:
            print(f"not completing the files of epoch {epoch}: {err}")
            return
        for path in wanted:
            link_checkpoint(last, path)
            print(f"completed the files of epoch {epoch}: wrote {path} from {last}")
        if periodic_checkpoint_path(self.cfg.output_dir, epoch) in wanted:
            prune_periodic_checkpoints(self.cfg.output_dir, self.keep_last)
        if log_due:
            _append_line(log, {**files["record"], "epoch": epoch})
            print(f"completed the files of epoch {epoch}: its line in {log}")

    def _check_folder_checkpoints(self) -> None:
        """A training run that resumes from its folder (no --resume) stops, changing nothing, when the folder holds
        checkpoints and none of them can be loaded: a silent start from epoch 0 would overwrite them and mix a new
        run into log.txt. --start_over sets them and log.txt aside (into a subfolder) and starts at epoch 0."""
        if self.cfg.resume or not self.cfg.trains:
            return
        skipped: List[Tuple[str, str]] = []
        candidates = resume_candidates("", self.cfg.output_dir, report=lambda path, why: skipped.append((path, why)))
        self._verified, unloadable = _first_loadable([path for _, path in candidates])  # resume takes it from here
        skipped += unloadable
        for path, why in skipped:
            _print_skip(path, why)
        if self._verified is not None:
            if self.cfg.start_over:
                raise SystemExit(f"error: --start_over, but {self._verified[0]} loads: drop --start_over to resume "
                                 f"from it, or start a new run in another --output_dir")
            return
        if not skipped:
            return  # a new folder
        damaged = [path for path, _ in skipped]
        if not self.cfg.start_over:
            listed = "; ".join(reason for _, reason in skipped)
            raise SystemExit(f"error: every checkpoint in --output_dir {self.cfg.output_dir} is damaged, so there is "
                             f"nothing to resume from: {listed}. Nothing was changed. Restore a good copy, give "
                             f"--resume <file>, or give --start_over to set these files aside and start at epoch 0")
        aside = os.path.join(self.cfg.output_dir, f"set-aside-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        os.makedirs(aside)
        log = os.path.join(self.cfg.output_dir, "log.txt")
        for path in damaged + ([log] if os.path.isfile(log) else []):
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        print(f"--start_over: moved {', '.join(os.path.basename(p) for p in damaged)}"
              f"{' and log.txt' if os.path.isfile(os.path.join(aside, 'log.txt')) else ''} into {aside}; starting at "
              f"epoch 0")

    # -- epochs -------------------------------------------------------------------------------------------------------
    def epochs(self, start_epoch: int, loader=None):
        """The epochs from `start_epoch` to the last; each sets the training loader's sampler to its epoch, and the
        first of a resumed run to where the checkpoint stopped in it."""
        print(f"training epochs {start_epoch} to {self.cfg.epochs - 1}")
        start = time.time()
        for epoch in range(start_epoch, self.cfg.epochs):
            if loader is not None:
                loader.sampler.set_epoch(epoch, start=self._first_iteration(epoch) * self.cfg.batch_size)
            yield epoch
        print(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")

    def _first_iteration(self, epoch: int) -> int:
        return self._resume_at[1] if epoch == self._resume_at[0] else 0

    def later_iters(self, epoch: int, iters_per_epoch: int) -> int:
        """Iterations of the epochs after `epoch` (for the run's ETA)."""
        return (self.cfg.epochs - epoch - 1) * iters_per_epoch

    def progress(self, epoch: int, iters: int, names=("loss",), header: Optional[str] = None) -> Progress:
        """The Progress of a training epoch: --print_freq lines, the run's ETA, stops agreed at optimizer-step
        boundaries, and for the epoch a checkpoint stopped in, the iteration and record it stopped at."""
        progress = Progress(header or f"Epoch [{epoch}]", iters, self.cfg.print_freq, self.device,
                            self.later_iters(epoch, iters), names, first=self._first_iteration(epoch),
                            stop=self.stop_requested, stop_every=self.cfg.accum_iter)
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

    def stop_if_requested(self, state: TrainState, epoch: int, progress: Progress, **extra) -> None:
        """If `progress` stopped on a signal: saves checkpoint-last.pth at that step (with where the epoch stopped
        and its record so far), waits for every process, and exits with status 75 (Preempted). A loss that became
        non-finite since it was last read ends the run as the non-finite policy does: named, the last good
        checkpoint kept."""
        if not progress.stopped:
            return
        try:
            state.step.raise_if_nonfinite()  # every process takes this check: it is a collective
        except NonFiniteLossError as err:
            raise SystemExit(f"error: {err} (found when stopping on a signal: nothing was saved)") from None
        record = progress.state_dict()
        records = [record]  # each process's record of the epoch so far: its own losses and counts
        if self._control is not None:
            records = [None] * self.world_size
            note_collective("the gathering of the epoch's records for the stop checkpoint")
            dist.all_gather_object(records, record, group=self._control)
        if self.is_main:
            ckpt = self.checkpoint(state, epoch - 1, **extra)
            ckpt.update(resume_at={"epoch": epoch, "iteration": record["iteration"]}, progress=record,
                        progress_by_rank=records)
            self._save(ckpt, last_checkpoint_path(self.cfg.output_dir))
            print(f"saved {last_checkpoint_path(self.cfg.output_dir)} at epoch {epoch}, iteration "
                  f"{record['iteration']} of {progress.total}; exiting with status {REQUEUE_EXIT_CODE} (requeue)",
                  flush=True)
        if self._control is not None:
            note_collective("the wait for the stop checkpoint")
            dist.barrier(group=self._control)  # no process exits (and gets its peers killed) before the save
        raise Preempted()

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def checkpoint(self, state: TrainState, epoch: int, **extra) -> dict:
        """The checkpoint's content: plain dicts of tensors and primitives that load with weights_only=True."""
        step = state.step
        return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "scaler": step.scaler.state_dict() if step.scaler is not None else None,
                "teacher": state.teacher.state_dict() if state.teacher is not None else None,
                "epoch": epoch, "nonfinite_skipped": step.skipped, "args": self.cfg.flags(), **extra}

    def resume_path(self, auto: bool = True) -> Optional[str]:
        """The checkpoint `resume` would load (without loading it): the newest readable one of --resume and (with
        `auto`) the output folder's."""
        found = resume_candidates(self.cfg.resume, self.cfg.output_dir if auto else None, report=lambda path, why: None)
        return found[0][1] if found else None

    def _load_newest(self, auto: bool) -> Optional[Tuple[str, dict]]:
        if auto and not self.cfg.resume and self.is_main and self.cfg.trains:
            found, self._verified = self._verified, None  # read and reported at the start
            return found
        candidates = resume_candidates(self.cfg.resume, self.cfg.output_dir if auto else None)
        found, skipped = _first_loadable([path for _, path in candidates], self.cfg.resume)
        for path, why in skipped:
            _print_skip(path, why)
        return found

    def resume(self, state: Optional[TrainState], model: Optional[torch.nn.Module] = None,
               auto: bool = True) -> int:
        """Loads the newest good checkpoint into `state` and returns the epoch to continue at (0 without one).

        The candidates are --resume and, with `auto`, the output folder's checkpoint-last.pth and periodic
        checkpoints: the newest (by epoch and iteration) that loads and matches its checksum wins, so that re-running
        the same command (a requeue) never goes back; every file skipped is named with the reason. The run's
        schedule and model flags must match the checkpoint's (--allow_flag_changes names exceptions). With `state`
        None, only the weights go into `model` (evaluation). The checkpoint's other entries are kept in
        `self.saved`; log.txt lines of epochs it redoes are dropped."""
        chosen = self._load_newest(auto)
        if chosen is None:
            return 0
        path, ckpt = chosen
        if self.cfg.resume and os.path.abspath(path) != os.path.abspath(self.cfg.resume):
            print(f"--resume {self.cfg.resume} is older than {path}: resuming from the newer one, so that running "
                  f"the same command again never goes back (to go back, give another --output_dir)")
        if state is not None:  # evaluating a checkpoint may change anything
            self._check_flags(path, ckpt.get("args") or {})
        try:
            load_state_dict_strict(state.model if state is not None else model, ckpt["model"])
        except RuntimeError as err:  # e.g. --allow_flag_changes model: the weights are another architecture's
            saved = (ckpt.get("args") or {}).get("model", "another model")
            raise SystemExit(f"error: {path} holds the weights of --model {saved}, which do not load into this run's "
                             f"--model {self.cfg.model} ({str(err).split(': ', 1)[-1][:300]}). Resume with --model "
                             f"{saved}, or train {self.cfg.model} in another --output_dir") from None
        self.saved = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scaler", "teacher")}
        if state is None:
            print(f"resumed from {path}")
            return 0
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.step.scaler is not None and ckpt.get("scaler"):
            state.step.scaler.load_state_dict(ckpt["scaler"])
        if state.teacher is not None:
            if ckpt.get("teacher") is None:
                raise SystemExit(f"error: {path} has no EMA teacher; it was not trained with --vis_target ema")
            load_state_dict_strict(state.teacher, ckpt["teacher"], "teacher")
        state.step.skipped = ckpt.get("nonfinite_skipped", 0)  # --skip_nonfinite counts over the whole run
        self._resume_at = checkpoint_position(ckpt)
        by_rank = ckpt.get("progress_by_rank")  # before it existed: rank 0's record, for every process
        self._resumed_progress = by_rank[self.rank] if by_rank else ckpt.get("progress")
        epoch, iteration = self._resume_at
        print(f"resumed from {path}: continuing at epoch {epoch}" +
              (f", iteration {iteration} (the rest of the epoch, in the same sample order)" if iteration else ""))
        if self.is_main:
            _drop_log_lines(os.path.join(self.cfg.output_dir, "log.txt"), epoch)
        return epoch

    def _check_flags(self, path: str, saved: dict) -> None:
        allowed = {n.strip() for n in self.cfg.allow_flag_changes.split(",") if n.strip()}
        given = self.cfg.flags()
        changed = [(name, saved[name], given[name]) for name in type(self.cfg).RESUME_MUST_MATCH
                   if name in saved and saved[name] != given[name] and name not in allowed and "all" not in allowed]
        if changed:
            shown = "; ".join(f"--{name}: saved {a!r}, given {b!r}" for name, a, b in changed)
            raise SystemExit(f"error: {path} was trained with other flags that define the run: {shown}. Resume with "
                             f"the saved values, or give --allow_flag_changes {','.join(n for n, _, _ in changed)} to "
                             f"change them deliberately")

    def end_epoch(self, state: TrainState, epoch: int, record: dict, best: bool = False, **extra) -> None:
        """On the main process: `checkpoint-last.pth`, the periodic and the best checkpoint as due, then the epoch's
        line in log.txt. checkpoint-last.pth goes first and names the others, so that a crash between the files
        leaves what the next start needs to complete them."""
        if not self.is_main:
            return
        periodic = bool(self.save_freq) and ((epoch + 1) % self.save_freq == 0 or epoch + 1 == self.cfg.epochs)
        ckpt = self.checkpoint(state, epoch, **extra)
        ckpt["epoch_files"] = {"periodic": periodic, "best": best, "record": record}
        last = last_checkpoint_path(self.cfg.output_dir)
        self._save(ckpt, last)
        # the same bytes under the other names: hard links to checkpoint-last.pth, not second copies (a later save
        # of checkpoint-last.pth replaces that name only)
        if periodic:
            link_checkpoint(last, periodic_checkpoint_path(self.cfg.output_dir, epoch))
            prune_periodic_checkpoints(self.cfg.output_dir, self.keep_last)
        if best:
            link_checkpoint(last, os.path.join(self.cfg.output_dir, BEST_CHECKPOINT))
        _append_line(os.path.join(self.cfg.output_dir, "log.txt"), {**record, "epoch": epoch})
        self.writer.flush()

    def _save(self, ckpt: dict, path: str) -> None:
        """`save_checkpoint`, refused when any weight or optimizer value is non-finite: such a file would replace a
        good one and fail every run resumed from it."""
        bad = nonfinite_entries(ckpt)
        if bad:
            shown = ", ".join(bad[:5]) + (f" ... (+{len(bad) - 5})" if len(bad) > 5 else "")
            raise SystemExit(f"error: not saving {path}: {len(bad)} tensors of the model or optimizer state are "
                             f"non-finite ({shown}); the last good checkpoint is kept")
        save_checkpoint(ckpt, path)


def _print_skip(path: str, why: str) -> None:
    print(f"skipping {path}: {why}")


def _first_loadable(paths: List[str], resume: str = "") -> Tuple[Optional[Tuple[str, dict]], List[Tuple[str, str]]]:
    """(path, checkpoint) of the first of `paths` that loads whole with its checksum verified (None if none does),
    and (path, reason) of each skipped before it. An unreadable `resume` stops the run instead."""
    skipped = []
    for path in paths:
        try:
            return (path, load_checkpoint(path)), skipped
        except CheckpointError as err:
            if path == resume:
                raise SystemExit(f"error: --resume {err}") from None
            skipped.append((path, str(err)))
    return None, skipped


def resume_candidates(resume: str, output_dir: Optional[str], report=_print_skip) -> List[Tuple[Tuple[int, int], str]]:
    """(position, path) of every readable checkpoint to resume from, newest first (--resume first among equals):
    `resume` if given, and the output folder's checkpoint-last.pth and periodic checkpoints (without `output_dir`,
    none). Only their keys and small values are read (memory-mapped). An unreadable `resume` stops the run; an
    unreadable file of the output folder is left out, and `report(path, reason)` says which and why."""
    paths = [resume] if resume else []
    if output_dir and os.path.isdir(output_dir):
        periodic = sorted((n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+\.pth", n)),
                          key=lambda n: -int(n[len("checkpoint-"):-len(".pth")]))
        paths += [p for p in [last_checkpoint_path(output_dir)] + [os.path.join(output_dir, n) for n in periodic]
                  if os.path.isfile(p) and not (resume and os.path.abspath(p) == os.path.abspath(resume))]
    found = []
    for path in paths:
        try:
            found.append((checkpoint_position(load_checkpoint(path, mmap=True)), path))
        except (CheckpointError, KeyError, TypeError, AttributeError) as err:
            if path == resume:
                raise SystemExit(f"error: --resume {err}") from None
            report(path, str(err) if isinstance(err, CheckpointError) else
                   f"{path} is not a training checkpoint (no epoch or position in it)")
    return sorted(found, key=lambda c: (c[0], c[1] == resume), reverse=True)


def nonfinite_entries(ckpt: dict) -> List[str]:
    """The names of the non-finite floating-point tensors in a checkpoint's model, teacher and optimizer state (one
    host read for all of them)."""
    named: List[Tuple[str, torch.Tensor]] = []

    def collect(value, where: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                named.append((where, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(item, f"{where}.{key}" if where else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                collect(item, f"{where}.{i}")

    for part in ("model", "teacher", "optimizer"):
        collect(ckpt.get(part), part)
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def _epoch_of(path: str) -> Optional[int]:
    try:
        return load_checkpoint(path, mmap=True)["epoch"] if os.path.isfile(path) else None
    except (CheckpointError, KeyError):
        return None


def _log_records(log: str) -> List[dict]:
    """The JSON records of log.txt (after `repair_log`, every line is one)."""
    if not os.path.isfile(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def _logged_epochs(log: str) -> set:
    return {record["epoch"] for record in _log_records(log) if "epoch" in record}


def repair_log(log: str) -> List[int]:
    """Drops the lines of log.txt that are not JSON records (a line torn by a crash or a full disk while appending),
    keeping a copy of the original beside it, and says so; returns their line numbers. Resume and the completion of
    an epoch's files then rewrite what the checkpoints hold."""
    if not os.path.isfile(log):
        return []
    with open(log, "rb") as f:
        original = f.read()
    kept, bad = [], []
    for number, line in enumerate(original.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError("not a record")
            kept.append(line + "\n")
        except ValueError:
            bad.append(number)
    if not bad:
        return []
    copy = f"{log}.{datetime.datetime.now():%Y%m%d-%H%M%S}.orig"
    write_file_atomically(copy, lambda f: f.write(original))
    write_file_atomically(log, lambda f: f.write("".join(kept).encode()))
    print(f"{log}: line {', '.join(map(str, bad))} is not a JSON record (torn by a crash or a full disk?); dropped it, "
          f"the original is kept as {copy}; the run continues from its checkpoint")
    return bad


def _append_line(log: str, record: dict) -> None:
    try:
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise no_space_error(log, "the line is not written; the next start repairs the log") from None
        raise


def _drop_log_lines(log: str, from_epoch: int) -> None:
    """Drops log.txt's lines of epochs from `from_epoch` on (a resume from an older checkpoint redoes them)."""
    if not os.path.isfile(log):
        return
    with open(log) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", -1) < from_epoch]
    if len(kept) < len(lines):
        write_file_atomically(log, lambda f: f.write("".join(kept).encode()))
        print(f"{log}: dropped the lines of epochs {from_epoch} and later ({len(lines) - len(kept)}), which this run "
              f"redoes")


class _NamedWriter:
    """TensorBoard's SummaryWriter, whose errors name its folder: its writes happen in a thread of its own, and a
    full disk surfaces at a later call as a bare `[Errno 28] No space left on device`."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=log_dir)

    def __getattr__(self, name):
        attribute = getattr(self._writer, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise no_space_error(self.log_dir, "TensorBoard's event file is not written") from None
                raise
        return call
