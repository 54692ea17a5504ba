"""Loaders that make a run reproducible, and exact sharded evaluation.

Training samples are asked for as (epoch, index) pairs, and each is transformed with Python's, NumPy's and torch's
generators seeded from (seed, epoch, index). A crop then depends on nothing else: not on the worker that makes it,
on how long the workers have lived (persistent workers are seeded once, when they start), or on the number of
workers. So a run resumed at an epoch (or step) boundary sees exactly the crops an uninterrupted run would, and
`seed_step` does the same for the randomness of the main process (masks, drop path, mixup).
"""
import atexit
import multiprocessing
import signal
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.distributed import DistInfo
from util.misc import seed_everything

_MIX = (0x9E3779B1, 0x85EBCA77)  # odd multipliers above any dataset size: distinct keys give distinct seeds


def mixed_seed(seed: int, major: int, minor: int) -> int:
    """One 63-bit seed for a (seed, major, minor) key, e.g. (seed, epoch, sample index)."""
    return ((seed * _MIX[0] + major) * _MIX[1] + minor) % 2 ** 63


def seed_step(seed: int, rank: int, index: int) -> None:
    """Seeds the main process's generators for run-wide iteration `index` on `rank`."""
    seed_everything(mixed_seed(seed, rank, index))


def shield_worker_from_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's `worker_init_fn`: the worker ignores the signals that its training process stops on.

    A scheduler stops a job by signalling every one of its processes (SLURM's preemption, `scancel`, the time limit,
    a process-group kill). PyTorch's workers die on a SIGTERM that their parent did not send, and the main process
    then fails its next batch, or the stop checkpoint's save, with "DataLoader worker ... is killed by signal". So
    the worker ignores SIGTERM and every signal for which its parent had a Python handler when it forked (the run's
    --stop_signals, submitit's SIGUSR2), leaving SIGINT (Ctrl-C, which PyTorch's workers handle) and SIGCHLD alone.
    The worker still ends with its parent: the loader shuts it down, and it exits by itself once its parent is gone."""
    inherited = {sig for sig in signal.valid_signals() if callable(signal.getsignal(sig))}
    for sig in (inherited | {signal.SIGTERM}) - {signal.SIGINT, signal.SIGCHLD}:
        signal.signal(sig, signal.SIG_IGN)


def _kill_shielded_workers() -> None:
    """At exit, kills the loader workers still alive. A failure that leaves a loader's iterator to the interpreter's
    shutdown skips the loader's own shutdown, and multiprocessing's exit handler then asks its workers to stop with
    SIGTERM, which they ignore (`shield_worker_from_stop_signals`), and waits for them forever. Registered after
    multiprocessing's handler (imported with torch), so it runs before it; a worker's work is worth nothing then."""
    for worker in multiprocessing.active_children():
        if worker.daemon:  # the loaders' workers; a process the run started itself would not be daemonic
            worker.kill()
            worker.join(timeout=5)


atexit.register(_kill_shielded_workers)


class SeededSamples(Dataset):
    """`dataset` whose items are asked for as (epoch, index), each made with generators seeded from
    (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        seed_everything(mixed_seed(self.seed, epoch, index))
        return self.dataset[index]


class EpochSampler(Sampler):
    """(epoch, index) pairs for one process: a permutation of the dataset drawn from (seed, epoch), cut to a multiple
    of the world size (every process takes as many batches, as DDP requires) and dealt round-robin over the ranks.

    `set_epoch(epoch, start)` chooses the epoch and skips the first `start` samples of this rank's share, so that a
    run resumed in the middle of an epoch neither repeats nor skips a sample.
    """

    def __init__(self, length: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if length < world_size:
            raise ValueError(f"{length} samples cannot be shared by {world_size} processes")
        self.length, self.seed, self.rank, self.world_size, self.shuffle = length, seed, rank, world_size, shuffle
        self.per_rank = length // world_size
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} is outside this rank's {self.per_rank} samples")
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        share = order[:self.per_rank * self.world_size][self.rank::self.world_size]
        return iter([(self.epoch, int(i)) for i in share[self.start:]])

    def __len__(self) -> int:
        return self.per_rank - self.start


class StreamSampler(Sampler):
    """An endless stream of (epoch, index) pairs for one process, cut into windows of `window` samples: the rank's
    shares of EpochSampler's epochs 0, 1, 2, ... one after another (a window may span two epochs of the data).

    For iteration-based training: a run's "epoch" is a window (e.g. an evaluation interval of iterations), so that
    `set_epoch(window, start)` puts the stream exactly where an uninterrupted run would be, and a resumed run sees the
    same samples in the same order however many passes over the data came before.
    """

    def __init__(self, length: int, seed: int, window: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if window < 1:
            raise ValueError(f"a window holds at least one sample, got {window}")
        self.epochs = EpochSampler(length, seed, rank, world_size, shuffle)
        self.window = window
        self.index = self.start = 0

    def set_epoch(self, window: int, start: int = 0) -> None:
        if not 0 <= start <= self.window:
            raise ValueError(f"start {start} is outside a window of {self.window} samples")
        self.index, self.start = window, start

    def __iter__(self):
        position = self.index * self.window + self.start  # samples of this rank's stream before this one
        remaining = self.window - self.start
        epoch, offset = divmod(position, self.epochs.per_rank)
        while remaining > 0:
            self.epochs.set_epoch(epoch, offset)
            keys = list(self.epochs)[:remaining]
            yield from keys
            remaining -= len(keys)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return self.window - self.start


class ShardSampler(Sampler):
    """Every `world_size`-th index from `rank`: each sample is evaluated once, with no padding duplicates."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_loader(dataset: Dataset, batch_size: int, seed: int, dist: DistInfo, num_workers: int, pin_memory: bool,
                 collate_fn: Optional[Callable] = None) -> DataLoader:
    """Shuffled, sharded, seeded batches of `batch_size` (the last partial batch dropped); set the epoch with
    `loader.sampler.set_epoch`."""
    return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size,
                      sampler=EpochSampler(len(dataset), seed, dist.rank, dist.world_size),
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn,
                      persistent_workers=num_workers > 0, worker_init_fn=shield_worker_from_stop_signals)


def stream_loader(dataset: Dataset, batch_size: int, seed: int, dist: DistInfo, num_workers: int, pin_memory: bool,
                  batches_per_epoch: int, collate_fn: Optional[Callable] = None) -> DataLoader:
    """Seeded, sharded batches of `batch_size` from an endless shuffled stream (StreamSampler): each epoch of the run
    is the next `batches_per_epoch` batches, whatever the dataset's size; set it with `loader.sampler.set_epoch`."""
    return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size,
                      sampler=StreamSampler(len(dataset), seed, batches_per_epoch * batch_size, dist.rank,
                                            dist.world_size),
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn,
                      persistent_workers=num_workers > 0, worker_init_fn=shield_worker_from_stop_signals)


def eval_loader(dataset: Dataset, batch_size: int, dist: DistInfo, sharded: bool, num_workers: int,
                pin_memory: bool, collate_fn: Optional[Callable] = None) -> DataLoader:
    """Every sample once, in order: sharded over the processes (no padding), or all of them on every process."""
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size) if sharded and dist.distributed else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, collate_fn=collate_fn,
                      worker_init_fn=shield_worker_from_stop_signals)
