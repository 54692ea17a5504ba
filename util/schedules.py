"""Training schedules as pure functions of the position in the run, so that a resumed run needs no replay.

The training loop reads every schedule at each optimizer step (training.step.TrainStep): a config's `schedules`
(training.config) gives them as functions of the optimizer step, these functions with the run's values bound
(`functools.partial`), the lengths in optimizer steps. MAE's epoch-based schedule is the same function with its
epochs counted in steps (epochs x steps per epoch).
"""
import math
from typing import Optional, Tuple


def scaled_lr(blr: float, images_per_step: int, given: Optional[float] = None, pred_ratio: Optional[float] = None,
              mask_ratio: Optional[float] = None) -> Tuple[float, str]:
    """Every script's lr: `given` (--lr) as it is, else the linear scaling rule lr = blr x unique images per optimizer
    step / 256 (MAE's --blr; an image counts once however many views it has), times DMJD's adaptive factor
    pred_ratio / mask_ratio (prediction rate over corruption rate) when they are given. Returns (lr, a line that
    shows every factor)."""
    adaptive = pred_ratio is not None
    if given is not None:
        return given, f"lr = {given:.4g} (given{'; the adaptive rule is not applied' if adaptive else ''})"
    lr = blr * images_per_step / 256
    line = f"lr = blr {blr:.3g} x {images_per_step} images / 256"
    if adaptive:
        lr *= pred_ratio / mask_ratio
        line += f" x (pred_ratio {pred_ratio:.3g} / mask_ratio {mask_ratio:.3g})"
    return lr, f"{line} = {lr:.4g}"


def cosine_lr(progress: float, base_lr: float, min_lr: float, warmup: float, total: float) -> float:
    """MAE's schedule: linear warmup from 0 to `base_lr` over `warmup`, then a half-cosine down to `min_lr` at
    `total` (`progress`, `warmup` and `total` in one unit: optimizer steps in the loop)."""
    if progress < warmup:
        return base_lr * progress / warmup
    span = max(total - warmup, 1e-12)
    t = min(max((progress - warmup) / span, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def poly_lr(iteration: float, base_lr: float, total_iters: float, power: float = 1.0, min_lr: float = 0.0,
            warmup_iters: float = 0, warmup_ratio: float = 0.0) -> float:
    """MMSegmentation's iteration-based schedule: the poly decay (base_lr - min_lr) x (1 - it / total)^power + min_lr,
    and over the first `warmup_iters` that lr times a factor rising linearly from `warmup_ratio` to 1 (mmcv's
    linear warmup multiplies the scheduled lr, it does not replace it)."""
    t = min(max(iteration / max(total_iters, 1e-12), 0.0), 1.0)
    lr = (base_lr - min_lr) * (1.0 - t) ** power + min_lr
    if iteration < warmup_iters:
        lr *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return lr


def detectron_lr(fraction: float, base_lr: float, schedule: str = "cosine", min_lr: float = 0.0,
                 steps=(), warmup_length: float = 0.0, warmup_factor: float = 0.001) -> float:
    """detectron2's iteration-based schedules, at `fraction` of the run's iterations (LazyConfig's lr_multiplier of
    WarmupParamScheduler over CosineParamScheduler or MultiStepParamScheduler): "cosine", a half-cosine from
    `base_lr` to `min_lr`; "step", `base_lr` divided by 10 at each of `steps` (fractions of the run, ViTDet's values
    1, 0.1, 0.01); over the first `warmup_length` of the run that lr times a factor rising linearly from
    `warmup_factor` to 1 (the warmup multiplies the schedule, it does not replace it)."""
    t = min(max(fraction, 0.0), 1.0)
    if schedule == "cosine":
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "step":
        lr = base_lr * 0.1 ** sum(t >= step for step in steps)
    else:
        raise ValueError(f"schedule must be 'cosine' or 'step', got {schedule!r}")
    if t < warmup_length:
        alpha = t / warmup_length
        lr *= warmup_factor * (1.0 - alpha) + alpha
    return lr


def cosine_momentum(progress: float, start: float, total: float, end: float = 1.0) -> float:
    """EMA momentum rising from `start` to `end` along a half-cosine over the run of `total` (BYOL / DINO)."""
    t = min(max(progress / max(total, 1e-12), 0.0), 1.0)
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    """Sets every group's lr, honouring a per-group `lr_scale` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
