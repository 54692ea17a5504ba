"""Losses summed on the device, and progress lines: what a training or evaluation loop prints every `print_freq`
iterations. Nothing here reads the device in between, so the steady-state step never waits for the host."""
import datetime
import time
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch

from training.distributed import all_reduce_sum
from training.step import TrainStep


class LossMeter:
    """Named sums on the device, for the epoch and for the window since the last read.

    `add` takes a device tensor of one value per name (summed over `count` samples); `read_window` reads the
    window's means back (one host read) and starts a new window; `totals` sums the epoch over all ranks.
    """

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = tuple(names)
        self.total = torch.zeros(len(self.names), device=device)
        self.window = torch.zeros(len(self.names), device=device)
        self.count = self.window_count = 0

    def add(self, values: torch.Tensor, count: int) -> None:
        self.total += values
        self.window += values
        self.count += count
        self.window_count += count

    def read_window(self) -> Optional[Dict[str, float]]:
        """The window's means, or None when it holds nothing yet (it then carries on into the next window)."""
        if not self.window_count:
            return None
        means = dict(zip(self.names, (self.window / self.window_count).tolist()))
        self.window.zero_()
        self.window_count = 0
        return means

    def totals(self, **counts: int) -> Dict[str, float]:
        """The epoch's means over every rank, and the given host counts summed over every rank."""
        extra = torch.tensor([self.count, *counts.values()], dtype=torch.float64)
        summed = all_reduce_sum(torch.cat([self.total.double().cpu(), extra]).to(self.total.device),
                                what="the epoch's totals").tolist()
        sums, (count, *others) = summed[:len(self.names)], summed[len(self.names):]
        result = {n: s / count if count else float("nan") for n, s in zip(self.names, sums)}
        result.update({k: int(v) for k, v in zip(counts, others)})
        return result

    def state_dict(self) -> dict:
        return {"names": list(self.names), "total": self.total.cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["names"]) != self.names:
            raise ValueError(f"saved losses {state['names']} are not {list(self.names)}")
        self.total.copy_(state["total"])
        self.count = state["count"]


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """An epoch's (or an evaluation's) running record: iterates at most `total` batches, times them, sums the losses
    (`losses`, a LossMeter over `names`) and other counts (`counts`), and prints what people expect of a log line.

    Each line gives the iteration, the ETA of the loop and (with `later_iters`, the iterations of the epochs still
    to come) of the run, the given values, s/it and images/s since the last line, the time spent waiting for data,
    and on CUDA the peak memory allocated so far. Call `line` right after reading values back from the device:
    the host then waits for the window's work, so its time is the device's, not the host's queueing.

    A loop resumed in its middle starts at iteration `first` with the record it had (`load_state_dict`). With
    `stop`, a callable asked before each `stop_every`-th iteration (optimizer-step boundaries), the loop ends early
    when it answers True, and `stopped` says so.
    """

    def __init__(self, header: str, total: int, print_freq: int, device: torch.device, later_iters: int = 0,
                 names: Sequence[str] = (), first: int = 0, stop: Optional[Callable[[], bool]] = None,
                 stop_every: int = 1):
        self.header, self.total, self.print_freq = header, total, print_freq
        self.device, self.later_iters = device, later_iters
        self.first, self.stop, self.stop_every, self.stopped = first, stop, stop_every, False
        self.losses = LossMeter(names, device)
        self.counts: Dict[str, int] = {}
        self.images = self.window_images = 0
        self.data_seconds = self.window_data_seconds = 0.0
        self.start = self.window_start = time.perf_counter()
        self.window_iters = self.iterations = 0

    def track(self, iterable: Iterable) -> Iterator[Tuple[int, object]]:
        """(index, batch) for the batches from `first` to `total`, timing how long each one was waited for."""
        batches = iter(iterable)
        self.start = self.window_start = time.perf_counter()
        for index in range(self.first, self.total):
            if self.stop is not None and index > self.first and index % self.stop_every == 0 and self.stop():
                self.stopped = True
                return
            wait_start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            waited = time.perf_counter() - wait_start
            self.data_seconds += waited
            self.window_data_seconds += waited
            self.window_iters += 1
            self.iterations += 1
            yield index, batch

    def count(self, images: int, **counts: int) -> None:
        """Images trained on in this iteration, and other counts to add up (e.g. unreadable files)."""
        self.images += images
        self.window_images += images
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value

    def due(self, index: int) -> bool:
        return (index + 1) % self.print_freq == 0 or index + 1 == self.total

    def line(self, index: int, values: Optional[Dict[str, float]] = None, **scalars) -> str:
        now = time.perf_counter()
        done = index + 1
        per_iter = (now - self.start) / max(1, self.iterations)
        window = max(now - self.window_start, 1e-9)
        eta = per_iter * (self.total - done)
        parts = [f"{self.header} [{done}/{self.total}]", f"eta {format_seconds(eta)}" +
                 (f" (run {format_seconds(eta + per_iter * self.later_iters)})" if self.later_iters else "")]
        parts += [f"{k} {v:.3e}" if k == "lr" else f"{k} {v:.4f}" for k, v in scalars.items()]
        parts += [f"{k} {v:.4f}" for k, v in (values or {}).items()]
        parts += [f"{window / max(1, self.window_iters):.3f} s/it",
                  f"{self.window_images / window:.1f} images/s per process",
                  f"data {self.window_data_seconds / max(1, self.window_iters):.3f} s/it"]
        if self.device.type == "cuda":
            parts.append(f"mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.2f} GiB")
        text = "  ".join(parts)
        print(text, flush=True)
        self.window_start, self.window_iters, self.window_images, self.window_data_seconds = now, 0, 0, 0.0
        return text

    def totals(self) -> Dict[str, float]:
        """The losses' means and the counts (images and the others), over every rank."""
        return self.losses.totals(images=self.images, **self.counts)

    def summary(self) -> str:
        """Total time, s/it, images/s and data wait of the loop in this process."""
        seconds = time.perf_counter() - self.start
        iters = max(1, self.iterations)
        return (f"{format_seconds(seconds)} ({seconds / iters:.3f} s/it, {self.images / max(seconds, 1e-9):.1f} "
                f"images/s per process, data {self.data_seconds / iters:.3f} s/it)")

    def state_dict(self) -> dict:
        """The record so far, to go on from the next iteration after a restart."""
        return {"iteration": self.first + self.iterations, "images": self.images, "counts": dict(self.counts),
                "losses": self.losses.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.images, self.counts = state["images"], dict(state["counts"])
        self.losses.load_state_dict(state["losses"])


def log_window(step: TrainStep, progress: Progress, index: int, x: int, writer=None, **scalars) -> None:
    """A progress line of the losses since the last one (the only host read of the loop), after the non-finite
    check that every rank takes at the same iterations, with the step's scheduled values (lr, ...) and `scalars`;
    the same values to TensorBoard at `x` (the loop's axis: epoch x 1000, or the optimizer step)."""
    step.raise_if_nonfinite()
    means = progress.losses.read_window()
    if means is None:  # mid-accumulation, or no readable image yet: the next line covers this window too
        return
    progress.line(index, means, **step.scheduled, **scalars)
    if writer is not None:
        for name, value in {**means, **step.scheduled, **scalars}.items():
            writer.add_scalar(f"train/{name}", value, x)
