"""The cost of a dense task's training step (a training.loop.Task), measured the same way for segmentation
(benchmarks.segmentation_step) and detection (benchmarks.detection_step):

- activation memory per image: the bytes autograd keeps for the backward of one training forward and its loss
  (benchmarks.grad_checkpointing.saved_activation_bytes), from a batch of 2 to a batch of 3, in fp32 and under bf16
  autocast (counting saved tensors gives the same figure on any device);
- the batch-independent part: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter);
- FLOPs per image of the training forward and of forward + backward (torch.utils.flop_counter; batch 2, halved);
- images/s of the training loop's round (training.loop.train_round on the task, its TrainStep and optimizer) on one
  random batch already on the device, after a warm-up step; on CUDA also the peak memory allocated.

A benchmark gives the task, its config and two functions of a batch size n: `raw(n)`, a random batch as the loader
gives it (what `task.prepare` takes), and `prepared(n)`, one as `task.loss` takes it.
"""
import time
from typing import Callable, Iterable, List

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.grad_checkpointing import saved_activation_bytes
from training.distributed import synchronize
from training.loop import Schedule, train_round
from training.meters import Progress
from training.step import TrainStep, autocast_context, loss_and_parts
from training.task import Task
from util.misc import AMP_DTYPES

TABLE_HEADER = ("| crop | activations per image, fp32 | bf16 | weights + grads + AdamW | GFLOPs per image f / f+b | "
                "images/s (amp, batch) | peak GiB |\n|---|---|---|---|---|---|---|")


def step_device(name: str) -> torch.device:
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def activation_bytes_per_image(task: Task, prepared: Callable, amp_dtype, device, batches=(2, 3)) -> float:
    """Growth of the bytes kept for backward (training forward + loss) per image of the batch."""
    sizes = []
    for batch in batches:
        inputs, targets = prepared(batch)

        def forward():
            with autocast_context(device, amp_dtype):
                return task.loss(inputs, targets)[0]

        loss, kept = saved_activation_bytes(task.model, forward)
        del loss
        sizes.append(kept)
    return (sizes[1] - sizes[0]) / (batches[1] - batches[0])


def flops_per_image(task: Task, prepared: Callable) -> tuple:
    """(forward, forward + backward) FLOPs of one image of the training step (fp32; batch 2, halved)."""
    inputs, targets = prepared(2)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = loss_and_parts(task.loss(inputs, targets))[0]
    forward = counter.get_total_flops()
    with counter:
        loss.backward()
    task.model.zero_grad(set_to_none=True)
    return forward / 2, (forward + counter.get_total_flops()) / 2


def timed_steps(task: Task, cfg, raw: Callable, device, steps: int):
    """(seconds per step, peak bytes on CUDA or None) of the training loop's round over `steps` steps of one random
    batch of cfg.batch_size, after one warm-up step."""
    step = TrainStep.for_run(task.model, task.optimizer(), cfg, 0, cfg.schedules(steps), steps,
                             loss_names=task.loss_names)
    batch = (*raw(cfg.batch_size), 0)
    quiet = dict(print_freq=10 ** 6, device=device, names=task.loss_names)
    train_round(task, step, [batch], Progress("warm-up", 1, **quiet), 0, Schedule(1, 1, 1, "iteration"))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_round(task, step, [batch] * steps, Progress("timed", steps, **quiet), 0,
                Schedule(steps, steps, 1, "iteration"))
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def measure(task: Task, cfg, size: int, raw: Callable, prepared: Callable, device, steps: int, flops: bool) -> dict:
    """Every figure of the module's list for one crop size, as a row."""
    params = sum(p.numel() for p in task.model.parameters())
    result = {"size": size, "parameters": params, "fixed_bytes": 16 * params}
    for amp in ("none", "bf16"):
        result[f"activation_bytes_per_image_{amp}"] = activation_bytes_per_image(task, prepared, AMP_DTYPES[amp],
                                                                                 device)
    if flops:
        result["gflops_forward"], result["gflops_forward_backward"] = (f / 1e9 for f in flops_per_image(task,
                                                                                                       prepared))
    if steps > 0:
        seconds, peak = timed_steps(task, cfg, raw, device, steps)
        result.update(amp=cfg.amp, batch_size=cfg.batch_size, step_s=seconds, images_per_s=cfg.batch_size / seconds,
                      peak_bytes=peak)
    return result


def table_row(r: dict, speed_digits: int = 2) -> str:
    """A measured row (`measure`) as a line of the markdown table (TABLE_HEADER)."""
    flops = f"{r['gflops_forward']:.0f} / {r['gflops_forward_backward']:.0f}" if "gflops_forward" in r else "-"
    speed = (f"{r['images_per_s']:.{speed_digits}f} ({r['amp']}, {r['batch_size']})" if "images_per_s" in r
             else "-")
    peak = f"{r['peak_bytes'] / 2 ** 30:.2f}" if r.get("peak_bytes") else "-"
    return (f"| {r['size']} x {r['size']} | {r['activation_bytes_per_image_none'] / 2 ** 30:.2f} GiB | "
            f"{r['activation_bytes_per_image_bf16'] / 2 ** 30:.2f} GiB | {r['fixed_bytes'] / 2 ** 30:.2f} GiB "
            f"({r['parameters'] / 1e6:.1f} M parameters) | {flops} | {speed} | {peak} |")


def extrapolated(rows: List[dict], size: int) -> dict:
    """A row at crop `size` on the straight line through the first two measured rows, in the number of pixels: what
    grows with the pixels (activations, FLOPs) and what does not (weights); no speed. A lower bound wherever a part
    grows faster than the pixels (global attention)."""
    a, b = rows[0], rows[1]
    t = (size ** 2 - a["size"] ** 2) / (b["size"] ** 2 - a["size"] ** 2)
    keys = ("activation_bytes_per_image_none", "activation_bytes_per_image_bf16", "gflops_forward",
            "gflops_forward_backward")
    row = {k: a[k] + t * (b[k] - a[k]) for k in keys if k in a and k in b}
    return dict(row, size=size, parameters=b["parameters"], fixed_bytes=b["fixed_bytes"])


def print_table(title: str, sizes: Iterable[int], measure_size: Callable[[int], dict],
                speed_digits: int = 2) -> List[dict]:
    """Measures each size and prints its row of the markdown table as it comes; returns the rows."""
    print(title)
    print(TABLE_HEADER)
    rows = []
    for size in sizes:
        rows.append(measure_size(size))
        print(table_row(rows[-1], speed_digits), flush=True)
    return rows
