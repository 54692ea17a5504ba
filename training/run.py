"""The run skeleton that every training script shares: what happens around its epochs.

    with Run(cfg) as run:
        model = run.wrap(model)                      # DDP when distributed
        state = TrainState(model_without_ddp, optimizer, step, teacher)
        start = run.resume(state)                   # --resume, or the output folder's last checkpoint
        for epoch in run.epochs(start, loader):      # sets the loader's epoch
            stats = engine.train_one_epoch(...)
            run.end_epoch(state, epoch, record, periodic=..., best=...)

Entering starts the process group (torchrun's environment; NCCL on CUDA, gloo on CPU), prints the run's header and
config, seeds, and on the main process creates the output folder and the TensorBoard writer; leaving closes them,
drops the DDP wrappers and ends the process group, in that order.
"""
import datetime
import json
import os
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from training.config import TrainConfig
from training.step import TrainStep
from util.checkpoint import (find_resume, last_checkpoint_path, load_checkpoint, load_state_dict_strict,
                             periodic_checkpoint_path, prune_periodic_checkpoints, save_checkpoint)
from util.misc import cleanup_distributed, init_distributed, seed_everything

BEST_CHECKPOINT = "checkpoint-best.pth"


@dataclass
class TrainState:
    """What a checkpoint holds besides the config: the model (without DDP), the optimizer, the step's grad scaler
    and count of skipped non-finite steps, and the EMA teacher if there is one."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    teacher: Optional[torch.nn.Module] = None


class Run:
    def __init__(self, cfg: TrainConfig, save_freq: Optional[int] = None, keep_last: int = 0):
        """`save_freq`: also keep `checkpoint-<epoch>.pth` every that many epochs (and at the last), of which
        `keep_last` (0 = all) are kept."""
        self.cfg, self.save_freq, self.keep_last = cfg, save_freq, keep_last
        self.writer: Optional[SummaryWriter] = None
        self.saved: dict = {}  # the resumed checkpoint's entries other than the state (e.g. best_acc1)
        self._wrapped = []

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Run":
        self.dist = init_distributed(self.cfg.device)
        if self.dist.world_size != self.cfg.world_size:
            raise RuntimeError(f"the config was resolved for {self.cfg.world_size} processes, the run has "
                               f"{self.dist.world_size}")
        print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}  device {self.device}, world size {self.world_size}, "
              f"amp {self.cfg.amp}")
        print(json.dumps(self.cfg.flags(), indent=1, default=str))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        seed_everything(self.cfg.seed + self.rank)
        if self.is_main:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=self.cfg.log_dir or self.cfg.output_dir)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.close()
        # DDP wrappers go before the process group (see util.misc.cleanup_distributed): ours, and those that the
        # frames of a propagating exception still hold.
        if tb is not None:
            traceback.clear_frames(tb)
        self._wrapped.clear()
        cleanup_distributed()

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

    # -- epochs -------------------------------------------------------------------------------------------------------
    def epochs(self, start_epoch: int, loader=None):
        """The epochs from `start_epoch` to the last; each sets the training loader's sampler to its epoch."""
        print(f"training epochs {start_epoch} to {self.cfg.epochs - 1}")
        start = time.time()
        for epoch in range(start_epoch, self.cfg.epochs):
            if loader is not None:
                loader.sampler.set_epoch(epoch)
            yield epoch
        print(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")

    def later_iters(self, epoch: int, iters_per_epoch: int) -> int:
        """Iterations of the epochs after `epoch` (for the run's ETA)."""
        return (self.cfg.epochs - epoch - 1) * iters_per_epoch

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def checkpoint(self, state: TrainState, epoch: int, **extra) -> dict:
        """The checkpoint's content: plain dicts of tensors and primitives that load with weights_only=True."""
        step = state.step
        return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "scaler": step.scaler.state_dict() if step.scaler is not None else None,
                "teacher": state.teacher.state_dict() if state.teacher is not None else None,
                "epoch": epoch, "nonfinite_skipped": step.skipped, "args": self.cfg.flags(), **extra}

    def resume_path(self, auto: bool = True) -> Optional[str]:
        """The checkpoint `resume` loads: --resume, or (with `auto`) the output folder's `checkpoint-last.pth`."""
        return find_resume(self.cfg.resume, self.cfg.output_dir if auto else None)

    def resume(self, state: Optional[TrainState], model: Optional[torch.nn.Module] = None,
               auto: bool = True) -> int:
        """Loads --resume, or (with `auto`) the output folder's `checkpoint-last.pth`, into `state` and returns the
        epoch to continue at (0 without a checkpoint). With `state` None, only the weights go into `model`
        (evaluation). The checkpoint's other entries are kept in `self.saved`."""
        path = self.resume_path(auto)
        if not path:
            return 0
        ckpt = load_checkpoint(path)
        load_state_dict_strict(state.model if state is not None else model, ckpt["model"])
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
        start_epoch = ckpt["epoch"] + 1
        print(f"resumed from {path}: continuing at epoch {start_epoch}")
        return start_epoch

    def end_epoch(self, state: TrainState, epoch: int, record: dict, best: bool = False, **extra) -> None:
        """On the main process: `checkpoint-last.pth`, the periodic and the best checkpoint as due, then the epoch's
        line in log.txt."""
        if not self.is_main:
            return
        ckpt = self.checkpoint(state, epoch, **extra)
        save_checkpoint(ckpt, last_checkpoint_path(self.cfg.output_dir))
        if self.save_freq and ((epoch + 1) % self.save_freq == 0 or epoch + 1 == self.cfg.epochs):
            save_checkpoint(ckpt, periodic_checkpoint_path(self.cfg.output_dir, epoch))
            prune_periodic_checkpoints(self.cfg.output_dir, self.keep_last)
        if best:
            save_checkpoint(ckpt, os.path.join(self.cfg.output_dir, BEST_CHECKPOINT))
        with open(os.path.join(self.cfg.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps({**record, "epoch": epoch}) + "\n")
        self.writer.flush()
