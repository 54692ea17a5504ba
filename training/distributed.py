"""The process group and its collectives: torchrun's environment, the rank-aware print, the teardown, the sums and
minima over the processes, and the name of the collective a process waits in. Everything works on CPU (gloo) as well
as CUDA (NCCL)."""
import builtins
import ctypes
import datetime
import gc
import os
import signal
import sys
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from training.errors import RunError
from util.misc import print_library_notes, resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_world_size() -> int:
    """The number of processes the launcher started (torchrun's WORLD_SIZE; 1 for a plain `python` run)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device_name: str = "auto", timeout_minutes: float = 30) -> DistInfo:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU. A collective that
    waits longer than `timeout_minutes` for another process fails."""
    device = resolve_device(device_name)
    world_size = launch_world_size()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if device.type == "cuda" else {}))
    info = DistInfo(rank, world_size, local_rank, device)
    _print_on_main_only(info.is_main)
    print_library_notes()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_when_the_launcher_dies()
    return info


def stop_when_the_launcher_dies(sig: signal.Signals = signal.SIGTERM) -> None:
    """Asks Linux to send this process `sig` when its parent (torchrun's agent) ends, however it ends: a launcher
    killed by a signal it does not handle (torchrun dies of SIGUSR1) would otherwise leave its training processes
    running on. With a stop signal the run then saves its step and exits with status 75. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # refused (e.g. by a seccomp profile): nothing changes
    if os.getppid() != parent:  # the parent ended before the request: nothing will be sent
        os.kill(os.getpid(), sig)


def _print_on_main_only(is_main: bool) -> None:
    """Silences print() on other ranks; print(..., force=True) still prints, prefixed with the rank."""
    builtin_print = builtins.print

    def rank_print(*args, force=False, **kwargs):
        if is_main or force:
            if not is_main:
                args = (f"[rank {int(os.environ.get('RANK', 0))}]",) + args
            builtin_print(*args, **kwargs)

    builtins.print = rank_print


def cleanup_distributed() -> None:
    """Ends the process group. Callers drop their DDP wrapper first: a DDP reducer freed after the group, as the
    group's last owner, destroys it without releasing the GIL, which can deadlock with a gloo worker thread that
    still needs the GIL to free the tensors of its last all-reduce (seen with torch 2.11)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP holds reference cycles: free the dropped reducers now, while the group still lives
        dist.destroy_process_group()


_LAST_COLLECTIVE = ["none yet"]


def note_collective(what: str) -> None:
    """Remembers which collective this process is about to wait in, to name it if it times out."""
    _LAST_COLLECTIVE[0] = what


def last_collective() -> str:
    return _LAST_COLLECTIVE[0]


def ranks_not_arrived(what: str, rank: int, world_size: int, wait: float = 10.0) -> List[int]:
    """After `what` timed out on `rank`: the ranks that did not arrive in it. Every process that times out in the
    same collective leaves its rank in the launcher's key-value store (torchrun's MASTER_ADDR:MASTER_PORT) and waits
    up to `wait` seconds for the others; the ranks still missing then are returned (empty when the store cannot be
    reached, e.g. it lived in a process that died)."""
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=max(wait, 10.0)))
    except (KeyError, ValueError, RuntimeError, OSError):
        return []
    key = f"timed out/{zlib.crc32(what.encode()):08x}"
    try:
        store.set(f"{key}/{rank}", "arrived")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(world_size) if not store.check([f"{key}/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, OSError):
        return []


def all_reduce_sum(values: torch.Tensor, what: str = "a sum over the processes") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        note_collective(what)
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_reduce_min(values: torch.Tensor, what: str = "a minimum over the processes") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        note_collective(what)
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def on_main_process() -> bool:
    """Whether this is the main process (rank 0), or the only one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def broadcast_from_main(value, what: str = "a value sent from the main process"):
    """The main process's `value` (any picklable object) on every process; `value` itself without a process group."""
    if dist.is_available() and dist.is_initialized():
        note_collective(what)
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def gather_shards(values: List, ids: Sequence[int], what: str = "the gathering of an evaluation's shards"):
    """(values, ids) of every process, in rank order: a sharded evaluation's parts (`values`, e.g. COCO result
    records, and the `ids` of the samples it evaluated); this process's alone without a process group. Raises if a
    sample was evaluated by two processes or twice: its results would count double."""
    ids = [int(i) for i in ids]
    if dist.is_available() and dist.is_initialized():
        note_collective(what)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (values, ids))
        values = [value for part_values, _ in parts for value in part_values]
        ids = [i for _, part_ids in parts for i in part_ids]
    repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"samples evaluated more than once (a padded or overlapping sampler?): {repeated[:10]}")
    return values, ids


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DistributedContext:
    """The distributed duty of a run (part of training.run.Run): the process group it starts and ends, the device
    and rank of this process, DDP wrappers, and the host-side collectives that the run's other parts agree through:
    a CPU (gloo) group whatever the backend, so that agreeing costs no device sync. Collectives that wait longer
    than `timeout_minutes` fail; `end` then names the collective and the ranks that did not arrive."""

    def __init__(self, device_name: str, world_size: int, timeout_minutes: float):
        self.device_name, self.expected_world_size, self.timeout_minutes = device_name, world_size, timeout_minutes
        self.info: Optional[DistInfo] = None  # None until `start` (and when the process group did not start)
        self._control = None
        self._wrapped: List[torch.nn.Module] = []

    def start(self) -> None:
        self.info = init_distributed(self.device_name, self.timeout_minutes)
        if self.info.world_size != self.expected_world_size:
            raise RuntimeError(f"the config was resolved for {self.expected_world_size} processes, the run has "
                               f"{self.info.world_size}")
        if self.info.distributed:
            self._control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in DDP when the run is distributed (gradients live in the all-reduce buckets: no copy)."""
        if not self.info.distributed:
            return model
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
        self._wrapped.append(wrapped)
        return wrapped

    # -- the host-side collectives (no-ops in a single process) --------------------------------------------------------
    def from_main(self, value):
        """The main process's `value` (picklable) on every process."""
        if self._control is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def any_of(self, flag: bool, what: str) -> bool:
        """Whether `flag` holds on any process."""
        value = torch.tensor([flag], dtype=torch.int32)
        if self._control is not None:
            note_collective(what)
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._control)
        return bool(value.item())

    def gather(self, value, what: str) -> list:
        """Every process's `value`, by rank."""
        if self._control is None:
            return [value]
        values = [None] * self.world_size
        note_collective(what)
        dist.all_gather_object(values, value, group=self._control)
        return values

    def barrier(self, what: str) -> None:
        if self._control is not None:
            note_collective(what)
            dist.barrier(group=self._control)

    def end(self, exc: Optional[BaseException], tb) -> List[str]:
        """Drops the DDP wrappers (ours, and those that the frames of a propagating exception `exc` still hold) and
        ends the process group (see `cleanup_distributed` for the order). A collective that timed out becomes a
        RunError naming it and the ranks that did not arrive. Returns what failed in ending, described."""
        if tb is not None:
            traceback.clear_frames(tb)
        self._wrapped.clear()
        failed = []
        try:
            cleanup_distributed()
        except Exception as err:  # noqa: BLE001 (named to the caller)
            failed.append(f"ending the process group: {err}")
        if exc is not None and self.info is not None and self.info.distributed and _is_timeout(exc):
            what = last_collective()
            # The processes that time out in the same collective say so; the others did not arrive.
            wait = min(30.0, max(2.0, 6 * self.timeout_minutes))  # seconds: 10% of the timeout, within bounds
            missing = ranks_not_arrived(what, self.rank, self.world_size, wait)
            who = (f"rank {', '.join(map(str, missing))} did not arrive: it stopped, hangs or died" if missing else
                   "another process stopped, hangs or died")
            detail = str(exc).strip().splitlines()[0]
            raise RunError(f"rank {self.rank} of {self.world_size}: {what} timed out after --dist_timeout "
                           f"{self.timeout_minutes:g} minutes: {who}. ({detail})") from None
        return failed


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)
