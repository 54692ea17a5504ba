"""The output folder's protocol: one live run at a time (a lock), whole rounds (a crash between a round's files is
completed at the next start), the choice of the checkpoint to resume from, checkpoints that never hold non-finite
values, log.txt (one JSON record per round, fsync'd; torn lines repaired) and TensorBoard's writer.

A round's files are checkpoint-last.pth first, then the periodic and best checkpoints as hard links to it, then its
log.txt line: checkpoint-last.pth names the others, so that the next start can complete what a crash cut short.
"""
import datetime
import errno
import fcntl
import glob
import json
import os
import re
import socket
from typing import List, Optional, Tuple

import torch
from torch.utils.tensorboard import SummaryWriter

from dmjd_encoders.checkpoint import (TEMP_FILE_PATTERN, CheckpointError, link_checkpoint, load_checkpoint,
                                      no_space_error, save_checkpoint, write_file_atomically)
from dmjd_encoders.pretrained import checkpoint_origin
from training.errors import RunError

BEST_CHECKPOINT = "checkpoint-best.pth"
LOCK_FILE = ".lock"


# -- the folder's files -----------------------------------------------------------------------------------------------
def periodic_checkpoint_path(output_dir: str, round_index: int) -> str:
    """The periodic checkpoint of a round (--save_freq)."""
    return os.path.join(output_dir, f"checkpoint-{round_index}.pth")


def last_checkpoint_path(output_dir: str) -> str:
    """The checkpoint a run resumes from by default: its last round's, or the step it stopped at."""
    return os.path.join(output_dir, "checkpoint-last.pth")


def prune_periodic_checkpoints(output_dir: str, keep_last: int) -> None:
    """Keeps the `keep_last` newest `checkpoint-<epoch>.pth` files (0 keeps them all)."""
    if keep_last <= 0:
        return
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    for _, path in sorted(found)[:-keep_last]:
        os.remove(path)


def remove_temp_files(folder: str) -> list:
    """Removes the temporary files that interrupted saves left in `folder` (call it while no other process writes
    there); returns their names."""
    found = sorted(n for n in os.listdir(folder) if TEMP_FILE_PATTERN.fullmatch(n)) if os.path.isdir(folder) else []
    for name in found:
        os.remove(os.path.join(folder, name))
    return found


def checkpoint_position(checkpoint: dict) -> Tuple[int, int]:
    """(round, iteration) a checkpoint continues at: its `resume_at`, or the round after its finished one."""
    at = checkpoint.get("resume_at")
    return (int(at["epoch"]), int(at["iteration"])) if at else (int(checkpoint["epoch"]) + 1, 0)


def newest_checkpoint(resume: str, output_dir: Optional[str]) -> Optional[str]:
    """The checkpoint a run resumes from, without loading it: the newest readable one of `resume` and (when given)
    the output folder's. Scripts that must know it before the run starts (a probe's features) ask here, as the run
    does."""
    found = resume_candidates(resume, output_dir, report=lambda path, why: None)
    return found[0][1] if found else None


def check_checkpoint_script(path: str, saved: Optional[dict], flags: dict, evaluating: bool) -> None:
    """A run resumes (or, `evaluating`, evaluates) checkpoints of its own script only: `path`, whose saved flags
    `saved` are another script's than the run's `flags`, stops it naming that script, before any flag is compared or
    weight loaded (whose errors would blame a flag or the model), with or without --allow_flag_changes."""
    theirs, ours = checkpoint_origin(saved), checkpoint_origin(flags)
    if theirs is None or ours is None or theirs == ours:
        return
    from_encoder = f"start from its encoder with --finetune {path}"  # what the other scripts do with pre-training's
    if evaluating:
        todo = (from_encoder if theirs.task == "pre-training" else  # pre-training has no evaluation of its own
                f"evaluate it with {theirs.script} --eval --resume {path}")
    else:
        todo = f"resume it with {theirs.script}" + (f", or {from_encoder}" if theirs.task == "pre-training" else "")
        if not (flags["resume"] and os.path.abspath(path) == os.path.abspath(flags["resume"])):
            todo += f" (--output_dir {os.path.dirname(path)} holds that run: give this one another --output_dir)"
    raise RunError(f"{path} is {theirs}, not a {ours.task} one: {todo}")


class OutputFolder:
    """--output_dir as a run uses it, on the main process. `save_freq`: also keep `checkpoint-<round>.pth` every
    that many rounds (and at the last), of which `keep_last` (0 = all) are kept."""

    def __init__(self, path: str, save_freq: Optional[int] = None, keep_last: int = 0):
        self.path, self.save_freq, self.keep_last = path, save_freq, keep_last
        self.log = os.path.join(path, "log.txt")
        self.verified: Optional[Tuple[str, dict]] = None  # the newest good checkpoint, read by check_checkpoints
        self._lock = None

    def open(self) -> None:
        """After the lock and the check: removes temporary files of interrupted saves, repairs log.txt and completes
        the files of the last finished round."""
        removed = remove_temp_files(self.path)
        if removed:
            print(f"removed {len(removed)} temporary files of interrupted saves: {', '.join(removed)}")
        repair_log(self.log)
        self.complete_last_round()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    def check_files(self) -> None:
        """The run writes its lock, log.txt and checkpoints under these names: something else there (a folder, a
        device) stops the run at start, naming it, rather than after a round of training, when the save fails."""
        names = [LOCK_FILE, "log.txt", os.path.basename(last_checkpoint_path(self.path)), BEST_CHECKPOINT]
        names += [n for n in os.listdir(self.path) if re.fullmatch(r"checkpoint-\d+\.pth", n)]
        for name in names:
            path = os.path.join(self.path, name)
            if os.path.lexists(path) and not os.path.isfile(path):
                kind = "a folder" if os.path.isdir(path) else "not a regular file"
                raise RunError(f"{path} is {kind}: the run writes a file of that name in --output_dir {self.path}; "
                               f"move it away, or give another --output_dir")

    def take_lock(self) -> None:
        # A POSIX record lock: held by this process alone (not by the data loader's forked workers, which outlive a
        # killed run for a while), released by the system when the process ends however it ends, and kept over NFS.
        path = os.path.join(self.path, LOCK_FILE)
        lock = open(path, "a+")
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise RunError(f"--output_dir {self.path} is in use by a live run ({holder}; "
                             f"{path} is locked): stop that run or give another --output_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
        lock.flush()
        self._lock = lock

    def complete_last_round(self) -> None:
        """Writes what a crash left unwritten of the last finished round: checkpoint-last.pth is saved first and says
        which periodic and best checkpoint and which log.txt line the round has (see save_round; the file's "epoch"
        entry is the round). What it copies is verified first: a damaged checkpoint-last.pth completes nothing
        (resume skips it, saying why)."""
        last = last_checkpoint_path(self.path)
        try:
            meta = load_checkpoint(last, mmap=True) if os.path.isfile(last) else {}
        except CheckpointError:
            return  # resume skips it, saying why
        files = meta.get("epoch_files")
        if not files:
            return
        round_index = meta["epoch"]
        wanted = [path for path, due in ((periodic_checkpoint_path(self.path, round_index), files["periodic"]),
                                         (os.path.join(self.path, BEST_CHECKPOINT), files["best"]))
                  if due and _round_of(path) != round_index]
        log = os.path.join(self.path, "log.txt")
        log_due = round_index not in _logged_rounds(log)
        if not (wanted or log_due):
            return
        try:  # the whole file, its checksum verified (already, when the folder's check took it as the newest)
            verified = self.verified[1] if self.verified and self.verified[0] == last else load_checkpoint(last)
            files = verified["epoch_files"]
        except CheckpointError as err:
            print(f"not completing the files of epoch {round_index}: {err}")
            return
        for path in wanted:
            link_checkpoint(last, path)
            print(f"completed the files of epoch {round_index}: wrote {path} from {last}")
        if periodic_checkpoint_path(self.path, round_index) in wanted:
            prune_periodic_checkpoints(self.path, self.keep_last)
        if log_due:
            append_line(log, {**files["record"], "epoch": round_index})
            print(f"completed the files of epoch {round_index}: its line in {log}")

    def check_checkpoints(self, start_over: bool) -> None:
        """A training run that resumes from its folder (no --resume) stops, changing nothing, when the folder holds
        checkpoints and none of them can be loaded: a silent start from epoch 0 would overwrite them and mix a new
        run into log.txt. --start_over sets them and log.txt aside (into a subfolder) and starts at epoch 0."""
        skipped: List[Tuple[str, str]] = []
        candidates = resume_candidates("", self.path, report=lambda path, why: skipped.append((path, why)))
        self.verified, unloadable = first_loadable([path for _, path in candidates])  # resume takes it from here
        skipped += unloadable
        for path, why in skipped:
            print_skip(path, why)
        if self.verified is not None:
            if start_over:
                raise RunError(f"--start_over, but {self.verified[0]} loads: drop --start_over to resume "
                                 f"from it, or start a new run in another --output_dir")
            return
        if not skipped:
            return  # a new folder
        damaged = [path for path, _ in skipped]
        if not start_over:
            listed = "; ".join(reason for _, reason in skipped)
            raise RunError(f"every checkpoint in --output_dir {self.path} is damaged, so there is "
                             f"nothing to resume from: {listed}. Nothing was changed. Restore a good copy, give "
                             f"--resume <file>, or give --start_over to set these files aside and start at epoch 0")
        aside = os.path.join(self.path, f"set-aside-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        os.makedirs(aside)
        log = os.path.join(self.path, "log.txt")
        for path in damaged + ([log] if os.path.isfile(log) else []):
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        print(f"--start_over: moved {', '.join(os.path.basename(p) for p in damaged)}"
              f"{' and log.txt' if os.path.isfile(os.path.join(aside, 'log.txt')) else ''} into {aside}; starting at "
              f"epoch 0")

    def save_round(self, ckpt: dict, checked: tuple, round_index: int, rounds: int, record: dict, best: bool) -> None:
        """checkpoint-last.pth, the periodic and the best checkpoint as due, then the round's line in log.txt.
        checkpoint-last.pth goes first and names the others, so that a crash between the files leaves what the next
        start needs to complete them. `checked`: the entries that must be finite (`save`)."""
        periodic = bool(self.save_freq) and ((round_index + 1) % self.save_freq == 0 or round_index + 1 == rounds)
        ckpt["epoch_files"] = {"periodic": periodic, "best": best, "record": record}
        last = last_checkpoint_path(self.path)
        self.save(ckpt, last, checked)
        # the same bytes under the other names: hard links to checkpoint-last.pth, not second copies (a later save
        # of checkpoint-last.pth replaces that name only)
        if periodic:
            link_checkpoint(last, periodic_checkpoint_path(self.path, round_index))
            prune_periodic_checkpoints(self.path, self.keep_last)
        if best:
            link_checkpoint(last, os.path.join(self.path, BEST_CHECKPOINT))
        append_line(self.log, {**record, "epoch": round_index})

    def save(self, ckpt: dict, path: str, checked=("model", "optimizer")) -> None:
        """`save_checkpoint`, refused when any value of the `checked` entries is non-finite: such a file would replace
        a good one and fail every run resumed from it."""
        bad = nonfinite_entries(ckpt, checked)
        if bad:
            shown = ", ".join(bad[:5]) + (f" ... (+{len(bad) - 5})" if len(bad) > 5 else "")
            raise RunError(f"not saving {path}: {len(bad)} tensors of the model or optimizer state are non-finite "
                           f"({shown}); the last good checkpoint is kept")
        save_checkpoint(ckpt, path)


def print_skip(path: str, why: str) -> None:
    print(f"skipping {path}: {why}")


def first_loadable(paths: List[str], resume: str = "") -> Tuple[Optional[Tuple[str, dict]], List[Tuple[str, str]]]:
    """(path, checkpoint) of the first of `paths` that loads whole with its checksum verified (None if none does),
    and (path, reason) of each skipped before it. An unreadable `resume` stops the run instead."""
    skipped = []
    for path in paths:
        try:
            return (path, load_checkpoint(path)), skipped
        except CheckpointError as err:
            if path == resume:
                raise RunError(f"--resume {err}") from None
            skipped.append((path, str(err)))
    return None, skipped


def resume_candidates(resume: str, output_dir: Optional[str], report=print_skip) -> List[Tuple[Tuple[int, int], str]]:
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
                raise RunError(f"--resume {err}") from None
            report(path, str(err) if isinstance(err, CheckpointError) else
                   f"{path} is not a training checkpoint (no epoch or position in it)")
    return sorted(found, key=lambda c: (c[0], c[1] == resume), reverse=True)


def nonfinite_entries(ckpt: dict, parts=("model", "optimizer")) -> List[str]:
    """The names of the non-finite floating-point tensors in a checkpoint's `parts` (the model, the optimizer state
    and a task's own state, e.g. an EMA teacher), with one host read for all of them."""
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

    for part in parts:
        collect(ckpt.get(part), part)
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _round_of(path: str) -> Optional[int]:
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


def _logged_rounds(log: str) -> set:
    return {record["epoch"] for record in _log_records(log) if "epoch" in record}


def _is_record(value) -> bool:
    """A line of log.txt as the run writes them: a JSON object whose round (`epoch`) and step (`iteration`), when
    there, are integers (a hand-edited `{"epoch": "three"}` would fail every later comparison of rounds)."""
    return isinstance(value, dict) and all(isinstance(value.get(key, 0), int) and not isinstance(value.get(key), bool)
                                           for key in ("epoch", "iteration"))


def repair_log(log: str) -> List[int]:
    """Drops the lines of log.txt that are not the run's records (a line torn by a crash or a full disk while
    appending, or one edited into another shape: `_is_record`), keeping a copy of the original beside it, and says
    so; returns their line numbers. Resume and the completion of an epoch's files then rewrite what the checkpoints
    hold."""
    if not os.path.isfile(log):
        return []
    with open(log, "rb") as f:
        original = f.read()
    kept, torn, misshapen = [], [], []
    for number, line in enumerate(original.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn.append(number)
            continue
        if _is_record(record):
            kept.append(line + "\n")
        else:
            misshapen.append(number)
    if not (torn or misshapen):
        return []
    copy = f"{log}.{datetime.datetime.now():%Y%m%d-%H%M%S}.orig"
    write_file_atomically(copy, lambda f: f.write(original))
    write_file_atomically(log, lambda f: f.write("".join(kept).encode()))
    for numbers, what in ((torn, "is not a JSON record (torn by a crash or a full disk?)"),
                          (misshapen, "is not a record of the run (an object whose epoch and iteration are integers: "
                                      "edited?)")):
        if numbers:
            print(f"{log}: line {', '.join(map(str, numbers))} {what}; dropped it, the original is kept as {copy}; "
                  f"the run continues from its checkpoint")
    return sorted(torn + misshapen)


def append_line(log: str, record: dict) -> None:
    try:
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise no_space_error(log, "the line is not written; the next start repairs the log") from None
        raise


def drop_log_lines(log: str, from_round: int) -> None:
    """Drops log.txt's lines of rounds from `from_round` on (a resume from an older checkpoint redoes them)."""
    if not os.path.isfile(log):
        return
    with open(log) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", -1) < from_round]
    if len(kept) < len(lines):
        write_file_atomically(log, lambda f: f.write("".join(kept).encode()))
        print(f"{log}: dropped the lines of epochs {from_round} and later ({len(lines) - len(kept)}), which this run "
              f"redoes")


class NamedWriter:
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
