"""One epoch of DMJD pre-training."""
import contextlib
import time
from typing import Dict, Optional

import torch

from util.misc import all_reduce_min, all_reduce_sum, apply_gradients
from util.schedules import adjust_learning_rate, cosine_momentum, epoch_iterations


class NonFiniteLossError(RuntimeError):
    pass


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(model: torch.nn.Module, data_loader, optimizer: torch.optim.Optimizer, device: torch.device,
                    epoch: int, args, amp_dtype: Optional[torch.dtype] = None, scaler=None, teacher=None,
                    student_encoder: Optional[torch.nn.Module] = None, log_writer=None,
                    nonfinite_skipped_before: int = 0) -> Dict[str, float]:
    """Trains one epoch; returns the epoch's mean losses, lr, teacher momentum and counts (summed over all ranks).

    Batches are `(images, labels, num_bad)` from util.datasets.skip_bad_collate (or plain `(images, labels)`).
    A rank whose batch has no readable image still runs its step, on a black placeholder crop whose loss is
    weighted by 0: under DDP every rank must join each gradient all-reduce and take the same optimizer steps, and
    the zero weight keeps the placeholder out of the gradient. The optimizer still steps (on the other ranks'
    gradients; alone, on zero gradients), so the schedule and resume stay aligned.

    Non-finite losses: with `args.skip_nonfinite` 0, losses stay on the device and are read every
    `args.print_freq` steps, so the steady-state step never waits for the host; a non-finite loss raises
    NonFiniteLossError naming the first bad step (the caller keeps the last good checkpoint). With N > 0 the
    losses (and, without a grad scaler, the gradients) are checked on the host before every optimizer step, agreed
    on by all ranks; a bad step is skipped (no optimizer or teacher update) until N of them have been skipped in
    the run (`nonfinite_skipped_before` counts the earlier epochs'), and the next one raises.
    """
    model.train()
    accum = args.accum_iter
    iters = epoch_iterations(len(data_loader), accum)
    steps_per_epoch = iters // accum
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    skip_budget = getattr(args, "skip_nonfinite", 0)
    check_every_step = skip_budget > 0
    channels_last = getattr(args, "channels_last", False)

    names = ("loss", "loss_mask", "loss_vis")
    sums = torch.zeros(len(names), device=device)
    window = torch.zeros(len(names), device=device)
    pending = torch.zeros(len(names), device=device)  # losses of the current accumulation window
    pending_finite = torch.ones((), dtype=torch.bool, device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_losses = torch.zeros(len(names), device=device)
    window_start, window_iters, window_count, pending_count, counted = time.time(), 0, 0, 0, 0
    num_images = bad_images = empty_batches = nonfinite_skipped = window_images_start = 0
    lr = momentum = float("nan")

    optimizer.zero_grad(set_to_none=True)
    for it, batch in enumerate(data_loader):
        if it >= iters:
            break
        progress = epoch + it / iters
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, progress, args)
        images = batch[0]
        bad_images += batch[2] if len(batch) > 2 else 0
        has_images = images is not None and len(images) > 0
        if has_images:
            num_images += len(images)
        else:
            empty_batches += 1
            images = torch.zeros(1, 3, args.input_size, args.input_size, dtype=torch.uint8)
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        sync_now = (it + 1) % accum == 0
        no_sync = model.no_sync() if (is_ddp and not sync_now) else contextlib.nullcontext()
        with no_sync:
            with autocast_context(device, amp_dtype):
                loss, parts = model(images, teacher=teacher)
            weight = 1.0 if has_images else 0.0
            scaled = loss * (weight / accum)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()

        # A placeholder's losses are multiplied by 0: still checked for finiteness, never averaged in.
        values = weight * torch.stack([loss.detach().float(), parts["loss_mask"].float(),
                                       parts.get("loss_vis", torch.zeros((), device=device)).float()])
        finite = torch.isfinite(values).all()
        global_step = epoch * iters + it
        if check_every_step:
            pending_finite &= finite
        else:
            newly_bad = (~finite) & (first_bad_step < 0)
            first_bad_step = torch.where(newly_bad, torch.full_like(first_bad_step, global_step), first_bad_step)
            bad_losses = torch.where(newly_bad, values, bad_losses)
        pending += values
        pending_count += int(has_images)

        if sync_now:
            step_ok = True
            if check_every_step:
                if scaler is None:  # with fp16 the grad scaler already skips steps with non-finite gradients
                    pending_finite &= _grads_finite(optimizer, device)
                step_ok = bool(all_reduce_min(pending_finite.to(torch.int32)))  # host sync; every rank agrees
            if step_ok:
                apply_gradients(optimizer, scaler, model.parameters(), args.clip_grad)
                if teacher is not None:
                    momentum = cosine_momentum(progress, args.ema_momentum, args.epochs)
                    teacher.update(student_encoder, momentum)
                sums += pending
                window += pending
                counted += pending_count
                window_count += pending_count
            else:
                nonfinite_skipped += 1
                total_skipped = nonfinite_skipped_before + nonfinite_skipped
                shown = ", ".join(f"{n} {v}" for n, v in zip(names, (pending / max(1, pending_count)).tolist()))
                where = f"step {global_step} (epoch {epoch}, iteration {it})"
                if total_skipped > skip_budget:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradients at {where}: {shown}; {total_skipped - 1} earlier non-finite "
                        f"steps were skipped (--skip_nonfinite {skip_budget}). Stopping; the last good checkpoint "
                        f"is kept.")
                print(f"non-finite loss or gradients at {where}: {shown}; update skipped "
                      f"({total_skipped} of --skip_nonfinite {skip_budget})", flush=True)
            optimizer.zero_grad(set_to_none=True)
            pending.zero_()
            pending_finite.fill_(True)
            pending_count = 0

        window_iters += 1
        last = it + 1 == iters
        if (it + 1) % args.print_freq == 0 or last:
            if not check_every_step:
                _raise_if_nonfinite(first_bad_step, bad_losses, names, epoch, iters)
            if window_count:
                means = (window / window_count).tolist()
                seconds = time.time() - window_start  # the losses were just read back: the window's work is done
                line = "  ".join(f"{n} {v:.4f}" for n, v in zip(names, means))
                print(f"Epoch [{epoch}] [{it + 1}/{iters}]  lr {lr:.3e}  {line}  {seconds / window_iters:.3f} s/it  "
                      f"{(num_images - window_images_start) / seconds:.1f} images/s per process", flush=True)
                if log_writer is not None:
                    x = int((progress + 1 / iters) * 1000)  # epoch_1000x: comparable across batch sizes
                    for n, v in zip(names, means):
                        log_writer.add_scalar(f"train/{n}", v, x)
                    log_writer.add_scalar("train/lr", lr, x)
                    if teacher is not None:
                        log_writer.add_scalar("train/momentum", momentum, x)
                window.zero_()  # else (mid-accumulation, or no image yet) the next line covers this window too
                window_start, window_iters, window_count, window_images_start = time.time(), 0, 0, num_images

    counts = torch.tensor([counted, num_images, bad_images, empty_batches], dtype=torch.float64)
    totals = all_reduce_sum(torch.cat([sums.double().cpu(), counts]).to(device))
    loss_sums, (counted, num_images, bad_images, empty_batches) = totals[:len(names)], totals[len(names):].tolist()
    stats = dict(zip(names, (loss_sums / counted).tolist() if counted else [float("nan")] * len(names)))
    stats.update(lr=lr, steps=steps_per_epoch, images=int(num_images), bad_images=int(bad_images),
                 empty_batches=int(empty_batches), nonfinite_skipped=nonfinite_skipped)
    if teacher is not None:
        stats["momentum"] = momentum
    summary = "  ".join(f"{n} {stats[n]:.4f}" for n in names) + f"  {stats['images']} images"
    if stats["bad_images"]:
        summary += (f", {stats['bad_images']} unreadable images skipped ({stats['empty_batches']} batches had no "
                    f"readable image)")
    if nonfinite_skipped:
        summary += f", {nonfinite_skipped} non-finite steps skipped"
    print(f"Epoch [{epoch}] done: {summary}", flush=True)
    return stats


def _grads_finite(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def _raise_if_nonfinite(first_bad_step, bad_losses, names, epoch, iters):
    # Every rank stops at the same check, even when only one of them saw the bad step.
    never = torch.iinfo(torch.long).max
    step = int(all_reduce_min(torch.where(first_bad_step >= 0, first_bad_step, torch.full_like(first_bad_step, never))))
    if step != never:
        shown = ", ".join(f"{n} {v}" for n, v in zip(names, bad_losses.tolist()))
        raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}, iteration {step - epoch * iters}): "
                                 f"{shown}. Stopping; the last good checkpoint is kept.")
