"""One epoch of supervised training (fine-tuning or linear probing) and evaluation."""
import contextlib
import math
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from engine_pretrain import autocast_context
from util.misc import all_reduce_mean, all_reduce_sum, apply_gradients
from util.schedules import adjust_learning_rate, epoch_iterations


def train_one_epoch(model: torch.nn.Module, criterion, data_loader, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, args, amp_dtype: Optional[torch.dtype] = None, scaler=None,
                    mixup_fn=None, log_writer=None) -> Dict[str, float]:
    model.train()
    accum = args.accum_iter
    iters = epoch_iterations(len(data_loader), accum)
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=device)
    window = torch.zeros((), device=device)
    window_start, window_count = time.time(), 0
    lr = float("nan")

    optimizer.zero_grad(set_to_none=True)
    for it, (images, targets, _) in enumerate(data_loader):  # util.datasets.skip_bad_collate batches
        if it >= iters:
            break
        progress = epoch + it / iters
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, progress, args)
        # A batch whose files were all unreadable still takes its step (every DDP rank must), with zero weight.
        weight = 1.0
        if images is None:
            images, targets, weight = torch.zeros(2, 3, args.input_size, args.input_size), torch.zeros(2).long(), 0.0
        if mixup_fn is not None and len(images) % 2:  # an unreadable file left an odd batch: Mixup needs pairs
            images, targets = images[:-1], targets[:-1]
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)

        sync_now = (it + 1) % accum == 0
        no_sync = model.no_sync() if (is_ddp and not sync_now) else contextlib.nullcontext()
        with no_sync:
            with autocast_context(device, amp_dtype):
                outputs = model(images)
            loss = criterion(outputs.float(), targets) * weight
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if sync_now:
            apply_gradients(optimizer, scaler, params, args.clip_grad)

        loss_sum += loss.detach()
        window += loss.detach()
        window_count += 1
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:
            mean = (window / window_count).item()
            if not math.isfinite(mean):
                raise RuntimeError(f"non-finite loss {mean} in epoch {epoch} before iteration {it + 1}; stopping")
            step_time = (time.time() - window_start) / window_count
            print(f"Epoch [{epoch}] [{it + 1}/{iters}]  lr {lr:.3e}  loss {mean:.4f}  {step_time:.3f} s/it", flush=True)
            if log_writer is not None:
                x = int((progress + 1 / iters) * 1000)
                log_writer.add_scalar("train/loss", mean, x)
                log_writer.add_scalar("train/lr", lr, x)
            window.zero_()
            window_start, window_count = time.time(), 0

    return {"loss": all_reduce_mean(loss_sum / iters).item(), "lr": lr}


@torch.no_grad()
def evaluate(data_loader, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over every sample the loader gives this process, summed over
    processes (each sample counted once when the loader shards the set without padding)."""
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1, top-5, count
    for images, targets, _ in data_loader:
        if images is None:  # every file of the batch was unreadable (each was named in a warning)
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            outputs = model(images)
        outputs = outputs.float()
        top5 = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        correct = top5 == targets.unsqueeze(1)
        totals += torch.stack([F.cross_entropy(outputs, targets, reduction="sum").double(),
                               correct[:, 0].sum().double(), correct.any(dim=1).sum().double(),
                               torch.tensor(float(targets.numel()), device=device, dtype=torch.float64)])
    loss, top1, top5, count = all_reduce_sum(totals).tolist()
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count, "count": int(count)}
