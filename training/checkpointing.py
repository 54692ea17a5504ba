"""A run's checkpoints (part of training.run.Run): what one holds, which one a run resumes from and what it must
match, and the saves at a round's end and at a stop, into the output folder that training.output.OutputFolder keeps
on the main process.

- Resume takes the newest checkpoint that loads and matches its checksum, among --resume and the output folder's own
  (checkpoint-last.pth and the periodic ones), and says which it took and every file it skipped and why: a re-run of
  the same command never goes back to an older file.
- The flags that define the run's schedule or model must match the checkpoint's (or be named in
  --allow_flag_changes): a changed one stops the run naming its saved and given values. Before them, a checkpoint of
  another script (e.g. a segmentation run's resumed by fine-tuning) stops it naming that script, under
  --allow_flag_changes all and --eval too (training.output.check_checkpoint_script).
- No save writes non-finite weights or optimizer state (OutputFolder.save).
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from dmjd_encoders.checkpoint import load_state_dict_strict
from dmjd_encoders.pretrained import saved_args
from training.config import TrainConfig
from training.errors import REQUEUE_EXIT_CODE, RunError
from training.output import (OutputFolder, append_line, check_checkpoint_script, checkpoint_position, drop_log_lines,
                             first_loadable, last_checkpoint_path, newest_checkpoint, print_skip, resume_candidates)
from training.step import TrainStep


@dataclass
class CheckpointState:
    """What a checkpoint holds besides the config: the model (without DDP), the optimizer, the step's grad scaler
    and count of skipped non-finite steps, and a task's own state (`task.extra_state()` /
    `task.load_extra_state(checkpoint, path)`, e.g. pre-training's EMA teacher)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    task: Optional[object] = None


class Checkpoints:
    """The checkpoint duty of a run. `processes` is its training.distributed.DistributedContext (started before
    `take_folder`). After `resume`, `saved` holds the checkpoint's entries other than the state (e.g. best_acc1),
    `resume_at` the (round, iteration) it continues at and `resumed_progress` this process's record of that round
    so far."""

    def __init__(self, cfg: TrainConfig, processes, save_freq: Optional[int] = None, keep_last: int = 0):
        self.cfg, self.processes = cfg, processes
        self.folder = OutputFolder(cfg.output_dir, save_freq, keep_last)
        self.saved: dict = {}
        self.resume_at: Tuple[int, int] = (0, 0)
        self.resumed_progress: Optional[dict] = None

    def take_folder(self) -> None:
        """The main process locks the output folder and checks its checkpoints before anything in it changes (a second
        live run on it is refused; a dead run's lock does not count); every process stops if the main one may not
        use the folder. Then the main process removes temporary files of interrupted saves and completes the files
        of the last finished round (OutputFolder.open)."""
        refused = None
        if self.processes.is_main:
            try:
                os.makedirs(self.cfg.output_dir, exist_ok=True)
                self.folder.check_files()
                self.folder.take_lock()
                if self.cfg.trains and not self.cfg.resume:
                    self.folder.check_checkpoints(self.cfg.start_over)
            except RunError as err:
                refused = str(err)
        refused = self.processes.from_main(refused)
        if refused:
            raise RunError(refused)
        if self.processes.is_main:
            self.folder.open()

    def content(self, state: CheckpointState, round_index: int, **extra) -> Tuple[dict, tuple]:
        """(the checkpoint's content: plain dicts of tensors and primitives that load with weights_only=True, the
        entries whose values must be finite for it to be saved: the model, the optimizer and the task's own)."""
        step = state.step
        own = state.task.extra_state() if state.task is not None else {}
        content = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                   "scaler": step.scaler.state_dict() if step.scaler is not None else None, **own,
                   "epoch": round_index, "nonfinite_skipped": step.skipped, "args": self.cfg.flags(), **extra}
        return content, ("model", "optimizer") + tuple(own)

    def save_round(self, state: CheckpointState, round_index: int, rounds: int, record: dict, best: bool,
                   **extra) -> None:
        """On the main process: the round's checkpoints and log.txt line (OutputFolder.save_round)."""
        if self.processes.is_main:
            self.folder.save_round(*self.content(state, round_index, **extra), round_index, rounds, record, best)

    def save_stop(self, state: CheckpointState, round_index: int, records: List[dict], total: int, **extra) -> None:
        """On the main process: checkpoint-last.pth at the step a stop came in round `round_index`: the rounds before
        it, where it stopped in this one and every process's record of it so far (`records`, by rank)."""
        if not self.processes.is_main:
            return
        record = records[self.processes.rank]
        ckpt, checked = self.content(state, round_index - 1, **extra)
        ckpt.update(resume_at={"epoch": round_index, "iteration": record["iteration"]}, progress=record,
                    progress_by_rank=records)
        path = last_checkpoint_path(self.cfg.output_dir)
        self.folder.save(ckpt, path, checked)
        print(f"saved {path} at epoch {round_index}, iteration {record['iteration']} of {total}; exiting with status "
              f"{REQUEUE_EXIT_CODE} (requeue)", flush=True)

    def append_log(self, record: dict) -> None:
        """A record in log.txt (fsync'd), on the main process."""
        if self.processes.is_main:
            append_line(self.folder.log, record)

    def first_iteration(self, round_index: int) -> int:
        """Where round `round_index` starts: the iteration a resumed checkpoint stopped at in it, else 0."""
        return self.resume_at[1] if round_index == self.resume_at[0] else 0

    def held_before(self, round_index: int, unit: str) -> str:
        """What the checkpoints hold when a run stops before training round `round_index`."""
        if round_index == self.resume_at[0] and self.resume_at[1]:
            return f"the checkpoint resumed holds {unit} {round_index} up to iteration {self.resume_at[1]}"
        if round_index:
            return f"{last_checkpoint_path(self.cfg.output_dir)} holds {unit}s 0 to {round_index - 1}"
        return "nothing was trained yet"

    def resume_path(self, auto: bool = True) -> Optional[str]:
        """The checkpoint `resume` would load (without loading its weights): the newest readable one of --resume and
        (with `auto`) the output folder's. Another script's checkpoint stops the run here, before a model is built
        for it."""
        path = newest_checkpoint(self.cfg.resume, self.cfg.output_dir if auto else None)
        if path:
            check_checkpoint_script(path, saved_args(path), self.cfg.flags(), evaluating=not self.cfg.trains)
        return path

    def resume(self, state: Optional[CheckpointState], model: Optional[torch.nn.Module] = None,
               auto: bool = True) -> int:
        """Loads the newest good checkpoint into `state` and returns the round to continue at (0 without one).

        The candidates are --resume and, with `auto`, the output folder's checkpoint-last.pth and periodic
        checkpoints: the newest (by round and iteration) that loads and matches its checksum wins; every file skipped
        is named with the reason. The run's schedule and model flags must match the checkpoint's
        (`check_saved_flags`). With `state` None, only the weights go into `model` (evaluation). log.txt lines of
        rounds it redoes are dropped."""
        chosen = self._load_newest(auto)
        if chosen is None:
            return 0
        path, ckpt = chosen
        if self.cfg.resume and os.path.abspath(path) != os.path.abspath(self.cfg.resume):
            print(f"--resume {self.cfg.resume} is older than {path}: resuming from the newer one, so that running "
                  f"the same command again never goes back (to go back, give another --output_dir)")
        # the script first: the flags' and the weights' errors would mislead
        check_checkpoint_script(path, ckpt.get("args"), self.cfg.flags(), evaluating=not self.cfg.trains)
        if state is not None:  # evaluating a checkpoint may change anything
            check_saved_flags(path, ckpt.get("args") or {}, self.cfg)
        load_weights(path, ckpt, state.model if state is not None else model, self.cfg)
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
        self.resume_at = checkpoint_position(ckpt)
        by_rank = ckpt.get("progress_by_rank")  # before it existed: rank 0's record, for every process
        self.resumed_progress = by_rank[self.processes.rank] if by_rank else ckpt.get("progress")
        index, iteration = self.resume_at
        print(f"resumed from {path}: continuing at epoch {index}" +
              (f", iteration {iteration} (the rest of the epoch, in the same sample order)" if iteration else ""))
        if self.processes.is_main:
            drop_log_lines(self.folder.log, index)
        return index

    def _load_newest(self, auto: bool) -> Optional[Tuple[str, dict]]:
        if auto and not self.cfg.resume and self.processes.is_main and self.cfg.trains:
            found, self.folder.verified = self.folder.verified, None  # read and reported by take_folder
            return found
        candidates = resume_candidates(self.cfg.resume, self.cfg.output_dir if auto else None)
        found, skipped = first_loadable([path for _, path in candidates], self.cfg.resume)
        for path, why in skipped:
            print_skip(path, why)
        return found


def load_weights(path: str, ckpt: dict, model: torch.nn.Module, cfg: TrainConfig) -> None:
    """The checkpoint's weights into `model`, all of them; weights of another architecture stop the run naming the
    checkpoint's --model (or the flags it predates, whose former values its weights need)."""
    try:
        load_state_dict_strict(model, ckpt["model"])
    except RuntimeError as err:  # e.g. --allow_flag_changes model: the weights are another architecture's
        args, given = ckpt.get("args") or {}, cfg.flags()
        predated = [(name, value) for name, value in cfg.absent_values().items()
                    if name not in args and value != given[name]]
        if predated:  # e.g. --eval of a checkpoint saved before a model option existed (it was off)
            shown = ", ".join(f"--{name} {value!r}" for name, value in predated)
            raise RunError(f"{path} was saved before these flags existed and its weights need their former "
                           f"values: {shown} (this run has {', '.join(repr(given[n]) for n, _ in predated)})")
        saved = args.get("model", "another model")
        raise RunError(f"{path} holds the weights of --model {saved}, which do not load into this run's --model "
                       f"{cfg.model} ({str(err).split(': ', 1)[-1][:300]}). Resume with --model {saved}, "
                       f"or train {cfg.model} in another --output_dir") from None


def check_saved_flags(path: str, saved: dict, cfg: TrainConfig) -> None:
    """The flags that define the run (`cfg.must_match()`) as the checkpoint saved them, unless --allow_flag_changes
    names them; a flag the checkpoint predates counts as its declared `absent` value (an option then off)."""
    allowed = {n.strip() for n in cfg.allow_flag_changes.split(",") if n.strip()}
    given = cfg.flags()
    absent = {name: value for name, value in cfg.absent_values().items() if name not in saved}
    saved = dict(absent, **saved)
    changed = [(name, saved[name], given[name]) for name in cfg.must_match()
               if name in saved and saved[name] != given[name] and name not in allowed and "all" not in allowed]
    if changed:
        shown = "; ".join(f"--{name}: saved {a!r}{' (saved before the flag existed)' if name in absent else ''}"
                          f", given {b!r}" for name, a, b in changed)
        raise RunError(f"{path} was trained with other flags that define the run: {shown}. Resume with the saved "
                       f"values, or give --allow_flag_changes {','.join(n for n, _, _ in changed)} to change "
                       f"them deliberately")
