"""The optimizer step of every training loop, from `accum_iter` micro-batches, and its one non-finite policy."""
import contextlib
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from training.data import seed_step
from training.distributed import all_reduce_min, note_collective
from training.errors import NonFiniteLossError
from util.misc import apply_gradients
from util.schedules import set_lr

Losses = Union[Dict[str, torch.Tensor], torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
Schedules = Mapping[str, Callable[[float], float]]  # name -> a function of the optimizer step (util.schedules)


def loss_and_parts(losses: Losses) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(the loss to minimise, its named parts) of what a task's loss returns: a dict of named losses ("loss" the
    one to minimise), the loss alone, or (loss, parts)."""
    if isinstance(losses, dict):
        return losses["loss"], {k: v for k, v in losses.items() if k != "loss"}
    return losses if isinstance(losses, tuple) else (losses, {})


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


class TrainStep:
    """Takes the optimizer step of a training loop, one micro-batch at a time.

    Each call runs `forward()` under autocast (bf16, fp16 or none), scales its loss by the micro-batch's weight
    and 1 / `accum_iter`, and runs backward; on the micro-batches before the last of a window, DDP's gradient
    all-reduce is skipped (`no_sync`). `schedules` are functions of the position the loop gives (optimizer steps):
    "lr", and others a task reads after each step (e.g. the EMA teacher's "momentum"); a function alone is the lr's.
    The first micro-batch of each window sets the lr; the last one unscales (fp16, with a grad scaler), clips,
    steps, zeroes the gradients and calls `after_step(values)` with the other schedules' values at its position
    (e.g. a task's EMA teacher update). `scheduled` holds the values last set: the lr, then the others.

    `forward()` returns a dict of named losses ("loss" the one minimised, and parts named in `loss_names[1:]`;
    missing parts count as 0), the loss alone, or (loss, parts). A call returns, once per applied optimizer step,
    the window's summed losses (a device tensor, one value per name, each micro-batch's weighted by its weight) and
    the number of micro-batches with weight > 0; else None.

    With `seed`, the main process's generators are seeded from (seed, rank, index) before each `forward()`, so
    that its randomness (masks, drop path, mixup inside `forward`) does not depend on where a run was resumed.

    Non-finite losses, one policy for every loop:
    - `skip_nonfinite` 0: nothing is read back in the step. The first micro-batch with a non-finite loss is
      remembered on the device; `raise_if_nonfinite()`, called when the losses are read anyway (every
      `--print_freq` steps), raises NonFiniteLossError naming it, on every rank.
    - `skip_nonfinite` N > 0: before each optimizer step the window's losses (and, without a grad scaler, the
      gradients) are checked on the host and agreed on by all ranks; a bad step is skipped (no optimizer step, no
      `after_step`) until N have been skipped in the run (`skipped` counts them, resumed runs included); the next
      raises.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedules: Union[Schedules, Callable[[float], float]], *, accum_iter: int = 1,
                 amp_dtype: Optional[torch.dtype] = None, clip_grad: Optional[float] = None,
                 skip_nonfinite: int = 0, skipped: int = 0, loss_names: Sequence[str] = ("loss",),
                 after_step: Optional[Callable[[Dict[str, float]], None]] = None,
                 iters_per_epoch: Optional[int] = None,
                 seed: Optional[int] = None, rank: int = 0):
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be >= 1, got {accum_iter}")
        self.model, self.optimizer = model, optimizer
        self.schedules = dict(schedules) if isinstance(schedules, Mapping) else {"lr": schedules}
        if "lr" not in self.schedules:
            raise ValueError(f"the schedules must include the lr's, got {sorted(self.schedules)}")
        self.after_step = after_step
        self.accum_iter, self.amp_dtype, self.clip_grad = accum_iter, amp_dtype, clip_grad
        self.skip_nonfinite, self.skipped = skip_nonfinite, skipped
        self.loss_names = tuple(loss_names)
        self.iters_per_epoch = iters_per_epoch  # only to name a bad step's epoch and iteration
        self.seed, self.rank = seed, rank
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type) if amp_dtype is torch.float16 else None
        self.is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.scheduled: Dict[str, float] = dict.fromkeys(self.schedules, float("nan"))

        n = len(self.loss_names)
        self._micro = 0  # micro-batches taken in the current window
        self._window = torch.zeros(n, device=self.device)
        self._window_count = 0
        self._window_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_losses = torch.zeros(n, device=self.device)
        optimizer.zero_grad(set_to_none=True)

    @classmethod
    def for_run(cls, model, optimizer, cfg, rank: int, schedules: Schedules, iters_per_epoch: int,
                **kwargs) -> "TrainStep":
        """The step a training script takes: `schedules` (the config's, `cfg.schedules`) and the config's
        accumulation, precision, clipping and non-finite policy (`cfg`: a training.config.TrainConfig), seeded from
        --seed."""
        return cls(model, optimizer, schedules, accum_iter=cfg.accum_iter, amp_dtype=cfg.amp_dtype,
                   clip_grad=cfg.clip_grad, skip_nonfinite=cfg.skip_nonfinite, iters_per_epoch=iters_per_epoch,
                   seed=cfg.seed, rank=rank, **kwargs)

    def __call__(self, forward: Callable[[], Losses], progress: float, index: int,
                 weight: float = 1.0) -> Optional[Tuple[torch.Tensor, int]]:
        """One micro-batch at `progress` (the schedules' position: optimizer steps in the loop) and run-wide
        micro-batch `index` (named in errors)."""
        if self._micro == 0:
            self.scheduled["lr"] = self.schedules["lr"](progress)
            set_lr(self.optimizer, self.lr)
        last = self._micro + 1 == self.accum_iter
        no_sync = self.model.no_sync() if (self.is_ddp and not last) else contextlib.nullcontext()
        if self.is_ddp and last:
            note_collective(f"DDP's gradient all-reduce of step {index}")
        if self.seed is not None:  # masks, drop path, mixup: a function of (seed, rank, index), as resume needs
            seed_step(self.seed, self.rank, index)
        with no_sync:
            with autocast_context(self.device, self.amp_dtype):
                out = forward()
            loss, parts = loss_and_parts(out)
            scaled = loss * (weight / self.accum_iter)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

        # A zero-weight micro-batch (a placeholder) is still checked for finiteness, never averaged in.
        values = weight * torch.stack([loss.detach().float()] + [
            parts[n].float() if n in parts else torch.zeros((), device=self.device) for n in self.loss_names[1:]])
        finite = torch.isfinite(values).all()
        if self.skip_nonfinite:
            self._window_finite &= finite
        else:
            newly_bad = (~finite) & (self._first_bad < 0)
            self._first_bad = torch.where(newly_bad, torch.full_like(self._first_bad, index), self._first_bad)
            self._bad_losses = torch.where(newly_bad, values, self._bad_losses)
        self._window += values
        self._window_count += int(weight > 0)
        self._micro += 1
        if not last:
            return None
        return self._finish_window(progress, index)

    def _finish_window(self, progress: float, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        window, count = self._window, self._window_count
        applied = True
        if self.skip_nonfinite:
            if self.scaler is None:  # with fp16 the grad scaler already skips steps with non-finite gradients
                self._window_finite &= _grads_finite(self.params, self.device)
            applied = bool(all_reduce_min(self._window_finite.to(torch.int32),  # host read; every rank agrees
                                          what=f"the agreement on skipping non-finite step {index}"))
        if applied:
            apply_gradients(self.optimizer, self.scaler, self.params, self.clip_grad)
            values = {name: schedule(progress) for name, schedule in self.schedules.items() if name != "lr"}
            self.scheduled.update(values)
            if self.after_step is not None:
                self.after_step(values)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._skip(window / max(1, count), index)
        self._micro, self._window_count = 0, 0
        self._window = torch.zeros_like(window)
        self._window_finite.fill_(True)
        return (window, count) if applied else None

    @property
    def lr(self) -> float:
        """The lr of the current window (nan before the first)."""
        return self.scheduled["lr"]

    def _skip(self, means: torch.Tensor, index: int) -> None:
        self.skipped += 1
        shown = ", ".join(f"{n} {v}" for n, v in zip(self.loss_names, means.tolist()))
        if self.skipped > self.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss or gradients at step {index}{self.where(index)}: {shown}; {self.skipped - 1} "
                f"earlier non-finite steps were skipped (--skip_nonfinite {self.skip_nonfinite}). Stopping; the "
                f"last good checkpoint is kept.")
        print(f"non-finite loss or gradients at step {index}{self.where(index)}: {shown}; update skipped "
              f"({self.skipped} of --skip_nonfinite {self.skip_nonfinite})", flush=True)

    def where(self, index: int) -> str:
        """' (epoch e, iteration i)' for a run-wide micro-batch index, when the epoch's length is known."""
        iters = self.iters_per_epoch
        return f" (epoch {index // iters}, iteration {index % iters})" if iters else ""

    def raise_if_nonfinite(self) -> None:
        """Raises NonFiniteLossError on every rank if any rank met a non-finite loss (with `skip_nonfinite` 0)."""
        never = torch.iinfo(torch.long).max
        first = torch.where(self._first_bad >= 0, self._first_bad, torch.full_like(self._first_bad, never))
        index = int(all_reduce_min(first, what="the non-finite check"))
        if index != never:
            shown = ", ".join(f"{n} {v}" for n, v in zip(self.loss_names, self._bad_losses.tolist()))
            raise NonFiniteLossError(f"non-finite loss at step {index}{self.where(index)}: {shown}. Stopping; the "
                                     f"last good checkpoint is kept.")


def _grads_finite(params, device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()
