"""Memory per image, FLOPs per image and images/s of the detection training step: Mask R-CNN with FPN on ConViT-B
(ConvMAE's detection backbone: windows of 16, four global blocks) at 1024 x 1024 by default, built and trained as
main_detect.py does (its flags, model, optimizer and training loop).

    python -m benchmarks.detection_step --device cuda --amp bf16                 # a GPU: the recipe's step
    python -m benchmarks.detection_step --sizes 256 384 --steps 1                # this CPU, to extrapolate

For each crop size, on random crops with 8 random instances each (boxes and masks, already on the device):
- activation memory per image: the bytes autograd keeps for the backward of one training forward and its losses
  (benchmarks.grad_checkpointing.saved_activation_bytes), from a batch of 2 to a batch of 3, in fp32 and under
  bf16 autocast;
- the batch-independent part: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter);
- FLOPs per image of the training forward and of forward + backward (torch.utils.flop_counter; the RoI heads' share
  depends on the 512 proposals sampled per image, not on the crop size);
- images/s of the training loop's round (training.loop.train_round on engine_detect.DetectTask), after a warm-up
  step; on CUDA also the peak memory allocated.
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.grad_checkpointing import saved_activation_bytes
from engine_detect import DetectConfig, DetectTask, build_detector, resolve_config
from models_convvit import conv_weights_channels_last
from training.distributed import synchronize
from training.flags import detection_parser
from training.loop import Schedule, train_round
from training.meters import Progress
from training.step import TrainStep, autocast_context
from util.misc import AMP_DTYPES

COCO_CLASSES = 80


def parse_args(argv=None):
    p = argparse.ArgumentParser("memory and speed of the detection training step",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="convvit_base_patch16", help="the encoder")
    p.add_argument("--sizes", default=[1024], type=int, nargs="+", help="crop sizes in pixels")
    p.add_argument("--batch_size", default=2, type=int, help="images per timed step (the recipe: 4 per GPU)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype of the timed step (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--steps", default=3, type=int, help="timed steps (after one warm-up step); 0: memory only")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count (a forward and backward at batch 1)")
    p.add_argument("--fpn_channels", default=256, type=int, help="FPN and heads' width (the recipe's)")
    p.add_argument("--rois_per_image", default=512, type=int, help="proposals sampled per image (the recipe's)")
    p.add_argument("--window_size", default=16, type=int, help="stage-3 attention windows (ConvMAE's detection)")
    p.add_argument("--global_blocks", default=[0, 3, 6, 10], type=int, nargs="*", help="blocks attending globally")
    return p.parse_args(argv)


def step_config(args, size: int, batch_size: int) -> DetectConfig:
    """main_detect.py's config for this benchmark: the recipe with the model, size, batch and device asked for."""
    flags = ["--model", args.model, "--input_size", str(size), "--batch_size", str(batch_size),
             "--device", args.device, "--amp", args.amp, "--print_freq", str(10 ** 6),
             "--fpn_channels", str(args.fpn_channels), "--rois_per_image", str(args.rois_per_image),
             "--window_size", str(args.window_size), "--global_blocks", *map(str, args.global_blocks)]
    return resolve_config(detection_parser().parse_args(flags))[0]


def random_batch(size: int, batch_size: int, device: torch.device, instances: int = 8):
    """Random uint8 crops with `instances` random boxes each, their masks the boxes' rectangles."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch_size):
        corners = torch.randint(0, size // 2, (instances, 2), generator=g)
        extents = torch.randint(size // 16, size // 2, (instances, 2), generator=g)
        boxes = torch.cat([corners, corners + extents], dim=1).float()
        masks = torch.zeros(instances, size, size, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            mask[y0:y1, x0:x1] = 1
        labels = torch.randint(1, COCO_CLASSES + 1, (instances,), generator=g)
        images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


class _Classes:  # what DetectTask reads of a validation set, for a step that is never evaluated
    class_names = [str(k) for k in range(COCO_CLASSES)]
    category_ids = list(range(1, COCO_CLASSES + 1))
    coco_data = {"images": [], "annotations": [], "categories": [{"id": k} for k in range(1, COCO_CLASSES + 1)]}


def activation_bytes_per_image(task: DetectTask, size: int, amp_dtype, device, batches=(2, 3)) -> float:
    """Growth of the bytes kept for backward (training forward + losses) per image of the batch."""
    sizes = []
    for batch in batches:
        images, targets, _ = task.prepare(*random_batch(size, batch, device))

        def forward():
            with autocast_context(device, amp_dtype):
                return task.loss(images, targets)[0]

        loss, kept = saved_activation_bytes(task.model, forward)
        del loss
        sizes.append(kept)
    return (sizes[1] - sizes[0]) / (batches[1] - batches[0])


def flops_per_image(task: DetectTask, size: int, device) -> tuple:
    """(forward, forward + backward) FLOPs of one image of the training step (fp32; batch 2, halved)."""
    images, targets, _ = task.prepare(*random_batch(size, 2, device))
    counter = FlopCounterMode(display=False)
    with counter:
        loss = task.loss(images, targets)[0]
    forward = counter.get_total_flops()
    with counter:
        loss.backward()
    task.model.zero_grad(set_to_none=True)
    return forward / 2, (forward + counter.get_total_flops()) / 2


def timed_steps(task: DetectTask, cfg: DetectConfig, device, steps: int):
    """Seconds per step of the training loop's round over `steps` steps of one random batch, after one."""
    step = TrainStep.for_run(task.model, task.optimizer(), cfg, 0, cfg.lr_at, steps, loss_names=task.loss_names)
    batch = (*random_batch(cfg.input_size, cfg.batch_size, device), 0)
    quiet = dict(print_freq=10 ** 6, device=device, names=task.loss_names)
    train_round(task, step, [batch], Progress("warm-up", 1, **quiet), 0, Schedule(1, 1, 1, "iteration"))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    timed = Schedule(steps, steps, 1, "iteration")
    train_round(task, step, [batch] * steps, Progress("timed", steps, **quiet), 0, timed)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return (time.perf_counter() - start) / steps, peak


def measure(args, size: int) -> dict:
    cfg = step_config(args, size, args.batch_size)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = conv_weights_channels_last(build_detector(cfg, COCO_CLASSES).to(device)).train()
    task = DetectTask(model, cfg, device, _Classes())
    params = sum(p.numel() for p in model.parameters())
    result = {"size": size, "parameters": params, "fixed_bytes": 16 * params}
    for amp in ("none", "bf16"):
        result[f"activation_bytes_per_image_{amp}"] = activation_bytes_per_image(task, size, AMP_DTYPES[amp], device)
    if not args.no_flops:
        result["gflops_forward"], result["gflops_forward_backward"] = (f / 1e9 for f in flops_per_image(task, size,
                                                                                                       device))
    if args.steps > 0:
        seconds, peak = timed_steps(task, cfg, device, args.steps)
        result.update(amp=cfg.amp, batch_size=cfg.batch_size, step_s=seconds, images_per_s=cfg.batch_size / seconds,
                      peak_bytes=peak)
    return result


def main(argv=None):
    args = parse_args(argv)
    rows = []
    print(f"Mask R-CNN with FPN on {args.model}, training step ({COCO_CLASSES} classes)")
    print("| crop | activations per image, fp32 | bf16 | weights + grads + AdamW | GFLOPs per image f / f+b | "
          "images/s (amp, batch) | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        r = measure(args, size)
        rows.append(r)
        flops = (f"{r['gflops_forward']:.0f} / {r['gflops_forward_backward']:.0f}" if "gflops_forward" in r else "-")
        speed = f"{r['images_per_s']:.3f} ({r['amp']}, {r['batch_size']})" if "images_per_s" in r else "-"
        peak = f"{r['peak_bytes'] / 2 ** 30:.2f}" if r.get("peak_bytes") else "-"
        print(f"| {size} x {size} | {r['activation_bytes_per_image_none'] / 2 ** 30:.2f} GiB | "
              f"{r['activation_bytes_per_image_bf16'] / 2 ** 30:.2f} GiB | {r['fixed_bytes'] / 2 ** 30:.2f} GiB "
              f"({r['parameters'] / 1e6:.1f} M parameters) | {flops} | {speed} | {peak} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
