"""Memory per image and images/s of the segmentation training step: UperNet on ConViT-B at 512 x 512 by default, built
and trained exactly as main_segment.py does (its flags, model, optimizer and training loop).

    python -m benchmarks.segmentation_step --device cuda --amp bf16            # a GPU: the recipe's step
    python -m benchmarks.segmentation_step --sizes 256 512 --steps 2            # this CPU

For each crop size:
- activation memory per image: the bytes autograd keeps for the backward of one training forward and its loss
  (benchmarks.grad_checkpointing.saved_activation_bytes), from a batch of 2 to a batch of 3 (BatchNorm's 1 x 1
  pooling branch needs two images); counting saved tensors gives the same figure on any device, in fp32 and under
  bf16 autocast;
- the batch-independent part: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter);
- FLOPs per image of the forward and of forward + backward (torch.utils.flop_counter);
- images/s of the training loop's round on engine_segment.SegmentTask (TrainStep: autocast, AdamW with layer
  decay, the poly lr) on random crops already on the device, after a warm-up step; on CUDA also the peak memory
  allocated.
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.grad_checkpointing import saved_activation_bytes
from engine_segment import SegmentTask, build_segmenter, resolve_config
from models_convvit import conv_weights_channels_last
from models_upernet import segmentation_loss
from training.distributed import synchronize
from training.flags import segmentation_parser
from training.loop import Schedule, train_round
from training.meters import Progress
from training.step import TrainStep, autocast_context
from util.misc import AMP_DTYPES


def parse_args(argv=None):
    p = argparse.ArgumentParser("memory and speed of the segmentation training step",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="convvit_base_patch16", help="the encoder")
    p.add_argument("--sizes", default=[512], type=int, nargs="+", help="crop sizes in pixels")
    p.add_argument("--batch_size", default=2, type=int, help="images per timed step (the recipe: 2 per GPU)")
    p.add_argument("--decoder_channels", default=768, type=int, help="UPerHead width (ConvMAE-B's config)")
    p.add_argument("--nb_classes", default=150, type=int, help="classes (ADE20K)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype of the timed step (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--steps", default=5, type=int, help="timed steps (after one warm-up step); 0: memory only")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count (a forward and backward at batch 1)")
    return p.parse_args(argv)


def step_config(args, size: int, batch_size: int, steps: int):
    """main_segment.py's config for this benchmark: the recipe with the model, size, batch and device asked for."""
    flags = ["--model", args.model, "--input_size", str(size), "--batch_size", str(batch_size),
             "--decoder_channels", str(args.decoder_channels), "--nb_classes", str(args.nb_classes),
             "--device", args.device, "--amp", args.amp, "--iters", str(max(steps, 1)),
             "--eval_interval", str(max(steps, 1)), "--warmup_iters", "0", "--print_freq", str(10 ** 6)]
    return resolve_config(segmentation_parser().parse_args(flags))[0]


def random_batch(cfg, batch_size: int, device: torch.device):
    images = torch.randn(batch_size, 3, cfg.input_size, cfg.input_size, device=device)
    labels = torch.randint(0, cfg.nb_classes, (batch_size, cfg.input_size, cfg.input_size), device=device)
    return images, labels


def activation_bytes_per_image(cfg, model, amp_dtype, device, batches=(2, 3)) -> float:
    """Growth of the bytes kept for backward (training forward + loss) per image of the batch."""
    sizes = []
    for batch in batches:
        images, labels = random_batch(cfg, batch, device)

        def forward():
            with autocast_context(device, amp_dtype):
                logits, aux = model(images)
                return segmentation_loss(logits, labels, aux, cfg.aux_weight, cfg.ignore_index)["loss"]

        loss, kept = saved_activation_bytes(model, forward)
        del loss
        sizes.append(kept)
    return (sizes[1] - sizes[0]) / (batches[1] - batches[0])


def flops_per_image(cfg, model, device):
    """(forward, forward + backward) FLOPs of one image of the training step (fp32; batch 2, halved)."""
    images, labels = random_batch(cfg, 2, device)
    counter = FlopCounterMode(display=False)
    with counter:
        logits, aux = model(images)
        loss = segmentation_loss(logits, labels, aux, cfg.aux_weight, cfg.ignore_index)["loss"]
    forward = counter.get_total_flops()
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward / 2, (forward + counter.get_total_flops()) / 2


def timed_steps(cfg, model, device, steps: int):
    """Seconds per step of the training loop's round (training.loop.train_round on engine_segment.SegmentTask) over
    `steps` steps of random crops, after one."""
    task = SegmentTask(model, cfg, device, [str(k) for k in range(cfg.nb_classes)])
    step = TrainStep.for_run(model, task.optimizer(), cfg, 0, cfg.lr_at, steps, loss_names=task.loss_names)
    batch = (*random_batch(cfg, cfg.batch_size, device), 0)
    quiet = dict(print_freq=10 ** 6, device=device, names=cfg.loss_names)
    train_round(task, step, [batch], Progress("warm-up", 1, **quiet), 0, Schedule(1, 1, 1, "iteration"))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_round(task, step, [batch] * steps, Progress("timed", steps, **quiet), 0, Schedule(steps, steps, 1, "iteration"))
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak


def measure(args, size: int) -> dict:
    cfg = step_config(args, size, args.batch_size, args.steps)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = conv_weights_channels_last(build_segmenter(cfg).to(device)).train()
    params = sum(p.numel() for p in model.parameters())
    result = {"size": size, "parameters": params, "fixed_bytes": 16 * params}
    for amp in ("none", "bf16"):
        result[f"activation_bytes_per_image_{amp}"] = activation_bytes_per_image(cfg, model, AMP_DTYPES[amp], device)
    if not args.no_flops:
        result["gflops_forward"], result["gflops_forward_backward"] = (f / 1e9 for f in flops_per_image(cfg, model,
                                                                                                       device))
    if args.steps > 0:
        seconds, peak = timed_steps(cfg, model, device, args.steps)
        result.update(amp=cfg.amp, batch_size=cfg.batch_size, step_s=seconds, images_per_s=cfg.batch_size / seconds,
                      peak_bytes=peak)
    return result


def main(argv=None):
    args = parse_args(argv)
    rows = []
    print(f"UperNet ({args.decoder_channels} channels, {args.nb_classes} classes) on {args.model}, training step")
    print("| crop | activations per image, fp32 | bf16 | weights + grads + AdamW | GFLOPs per image f / f+b | "
          "images/s (amp, batch) | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        r = measure(args, size)
        rows.append(r)
        flops = (f"{r['gflops_forward']:.0f} / {r['gflops_forward_backward']:.0f}" if "gflops_forward" in r else "-")
        speed = f"{r['images_per_s']:.2f} ({r['amp']}, {r['batch_size']})" if "images_per_s" in r else "-"
        peak = f"{r['peak_bytes'] / 2 ** 30:.2f}" if r.get("peak_bytes") else "-"
        print(f"| {size} x {size} | {r['activation_bytes_per_image_none'] / 2 ** 30:.2f} GiB | "
              f"{r['activation_bytes_per_image_bf16'] / 2 ** 30:.2f} GiB | {r['fixed_bytes'] / 2 ** 30:.2f} GiB "
              f"({r['parameters'] / 1e6:.1f} M parameters) | {flops} | {speed} | {peak} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
