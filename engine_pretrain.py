"""One epoch of DMJD pre-training, and the config it runs under."""
from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

import torch

from training.config import TrainConfig
from training.meters import Progress, log_window
from training.step import TrainStep
from util.schedules import cosine_momentum

LOSS_NAMES = ("loss", "loss_mask", "loss_vis")


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """main_pretrain.py's flags, resolved: pred_ratio, lr, amp and channels_last are filled in."""
    num_views: int
    mask_ratio: float
    pred_ratio: float
    mask_type: str
    block_size: int
    pred_type: str
    vis_target: str
    theta: float
    ema_momentum: float
    min_crop_scale: float
    compile: bool
    channels_last: bool
    save_freq: int
    keep_last: int
    vis_freq: int

    RESUME_MUST_MATCH: ClassVar[Tuple[str, ...]] = TrainConfig.RESUME_MUST_MATCH + (
        "num_views", "mask_ratio", "pred_ratio", "mask_type", "block_size", "pred_type", "vis_target", "theta",
        "ema_momentum", "min_crop_scale")
    RESUME_MAY_CHANGE: ClassVar[Dict[str, str]] = {
        **TrainConfig.RESUME_MAY_CHANGE,
        "compile": "the same model, compiled or not",
        "channels_last": "the conv weights' memory layout, not their values",
        "save_freq": "which periodic checkpoints are kept",
        "keep_last": "how many periodic checkpoints are kept",
        "vis_freq": "how often TensorBoard gets a picture",
    }

    def momentum_at(self, progress: float) -> float:
        """The EMA teacher's momentum: cosine from --ema_momentum to 1 over the run."""
        return cosine_momentum(progress, self.ema_momentum, self.epochs)


def readable_batch(batch, input_size: int):
    """(images, weight, unreadable count) of a `(images, labels[, num_bad])` batch. A batch whose files were all
    unreadable becomes one black placeholder crop of weight 0: under DDP every rank must join each gradient
    all-reduce and take the same optimizer steps, and the zero weight keeps it out of the gradient and the losses
    (alone, the step then moves nothing: zero gradients)."""
    images, num_bad = batch[0], (batch[2] if len(batch) > 2 else 0)
    if images is None or len(images) == 0:
        return torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8), 0.0, num_bad
    return images, 1.0, num_bad


def train_one_epoch(model: torch.nn.Module, step: TrainStep, loader, epoch: int, cfg: PretrainConfig,
                    progress: Progress, writer=None, teacher=None) -> Dict[str, float]:
    """Trains the epoch's iterations that `progress` tracks (all of them, or the rest of an interrupted epoch, until
    a stop is agreed); returns the epoch's mean losses, lr, teacher momentum and counts, summed over all ranks.
    `progress` sums the losses (its names: LOSS_NAMES). Batches are `(images, labels, num_bad)` from
    util.datasets.skip_bad_collate."""
    model.train()
    skipped_before = step.skipped
    for it, batch in progress.track(loader):
        # -- the batch: readable crops, or a zero-weight placeholder; uint8 to the device, normalised there
        images, weight, num_bad = readable_batch(batch, cfg.input_size)
        progress.count(len(images) if weight else 0, bad_images=num_bad, empty_batches=int(weight == 0))
        images = images.to(step.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        # -- the step: both branches, backward, and the optimizer and teacher at the end of each window
        losses = step(lambda: model(images, teacher=teacher), epoch + it / progress.total,
                      epoch * progress.total + it, weight)
        if losses is not None:
            progress.losses.add(*losses)

        # -- every --print_freq steps: read the losses back, check them, print and log
        if progress.due(it):
            log_window(step, progress, it, epoch, writer, **({"momentum": step.momentum} if teacher else {}))

    # -- the epoch over all ranks
    stats = {"bad_images": 0, "empty_batches": 0, **progress.totals()}
    stats.update(lr=step.lr, steps=progress.total // cfg.accum_iter, nonfinite_skipped=step.skipped - skipped_before)
    if teacher is not None:
        stats["momentum"] = step.momentum
    summary = "  ".join(f"{n} {stats[n]:.4f}" for n in LOSS_NAMES) + f"  {stats['images']} images"
    if stats["bad_images"]:
        summary += (f", {stats['bad_images']} unreadable images skipped ({stats['empty_batches']} batches had no "
                    f"readable image)")
    if stats["nonfinite_skipped"]:
        summary += f", {stats['nonfinite_skipped']} non-finite steps skipped"
    print(f"Epoch [{epoch}] {'stopped' if progress.stopped else 'done'}: {summary}; {progress.summary()}", flush=True)
    return stats
