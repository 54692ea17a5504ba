"""One epoch of DMJD pre-training."""
import contextlib
import time
from typing import Dict, Optional

import torch

from util.misc import all_reduce_mean, all_reduce_min
from util.schedules import cosine_lr, cosine_momentum, set_lr


class NonFiniteLossError(RuntimeError):
    pass


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(model: torch.nn.Module, data_loader, optimizer: torch.optim.Optimizer, device: torch.device,
                    epoch: int, args, amp_dtype: Optional[torch.dtype] = None, scaler=None, teacher=None,
                    student_encoder: Optional[torch.nn.Module] = None, log_writer=None) -> Dict[str, float]:
    """Trains one epoch; returns the epoch's mean losses (over all ranks), lr and teacher momentum.

    Losses stay on the device and are read every `args.print_freq` steps, so the steady-state step never waits for
    the host. A non-finite loss raises NonFiniteLossError naming the first bad step (the caller keeps the last good
    checkpoint).
    """
    model.train()
    accum = args.accum_iter
    iters = (len(data_loader) // accum) * accum  # a partial accumulation at the end would leak into the next epoch
    if iters == 0:
        raise ValueError(f"an epoch has {len(data_loader)} batches per process, fewer than --accum_iter {accum}")
    steps_per_epoch = iters // accum
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    names = ("loss", "loss_mask", "loss_vis")
    sums = torch.zeros(len(names), device=device)
    window = torch.zeros(len(names), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_losses = torch.zeros(len(names), device=device)
    window_start, window_count = time.time(), 0
    lr = momentum = float("nan")

    optimizer.zero_grad(set_to_none=True)
    for it, (images, _) in enumerate(data_loader):
        if it >= iters:
            break
        progress = epoch + it / iters
        if it % accum == 0:
            lr = cosine_lr(progress, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
            set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True)

        sync_now = (it + 1) % accum == 0
        no_sync = model.no_sync() if (is_ddp and not sync_now) else contextlib.nullcontext()
        with no_sync:
            with autocast_context(device, amp_dtype):
                loss, parts = model(images, teacher=teacher)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()

        if sync_now:
            if scaler is not None:
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                if args.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if teacher is not None:
                momentum = cosine_momentum(progress, args.ema_momentum, args.epochs)
                teacher.update(student_encoder, momentum)

        values = torch.stack([loss.detach().float(), parts["loss_mask"].float(),
                              parts.get("loss_vis", torch.zeros((), device=device)).float()])
        finite = torch.isfinite(values).all()
        newly_bad = (~finite) & (first_bad_step < 0)
        global_step = epoch * iters + it
        first_bad_step = torch.where(newly_bad, torch.full_like(first_bad_step, global_step), first_bad_step)
        bad_losses = torch.where(newly_bad, values, bad_losses)
        sums += values
        window += values
        window_count += 1

        last = it + 1 == iters
        if (it + 1) % args.print_freq == 0 or last:
            _raise_if_nonfinite(first_bad_step, bad_losses, names, epoch, iters)
            means = (window / window_count).tolist()
            elapsed = (time.time() - window_start) / window_count
            line = "  ".join(f"{n} {v:.4f}" for n, v in zip(names, means))
            print(f"Epoch [{epoch}] [{it + 1}/{iters}]  lr {lr:.3e}  {line}  {elapsed:.3f} s/it", flush=True)
            if log_writer is not None:
                x = int((progress + 1 / iters) * 1000)  # epoch_1000x: comparable across batch sizes
                for n, v in zip(names, means):
                    log_writer.add_scalar(f"train/{n}", v, x)
                log_writer.add_scalar("train/lr", lr, x)
                if teacher is not None:
                    log_writer.add_scalar("train/momentum", momentum, x)
            window.zero_()
            window_start, window_count = time.time(), 0

    means = all_reduce_mean(sums / iters).tolist()
    stats = dict(zip(names, means))
    stats.update(lr=lr, steps=steps_per_epoch)
    if teacher is not None:
        stats["momentum"] = momentum
    return stats


def _raise_if_nonfinite(first_bad_step, bad_losses, names, epoch, iters):
    # Every rank stops at the same check, even when only one of them saw the bad step.
    never = torch.iinfo(torch.long).max
    step = int(all_reduce_min(torch.where(first_bad_step >= 0, first_bad_step, torch.full_like(first_bad_step, never))))
    if step != never:
        shown = ", ".join(f"{n} {v}" for n, v in zip(names, bad_losses.tolist()))
        raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}, iteration {step - epoch * iters}): "
                                 f"{shown}. Stopping; the last good checkpoint is kept.")
