"""Throughput of the full DMJD pre-training step on synthetic data already on the device.

    python benchmarks/throughput.py --model dmjd_convit_base_patch16_dec8_hog --batch_size 64 --amp bf16

Times forward (both branches), backward and the AdamW step after warm-up, and prints images/s (unique images, each
with --num_views views), peak memory, FLOPs per image (torch.utils.flop_counter, forward and forward+backward) and,
with --peak_tflops, the achieved fraction of that peak.
"""
import argparse
import os
import sys
import time

import torch
import timm
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_dmjd  # noqa: E402,F401  (registers the models)
from engine_pretrain import autocast_context  # noqa: E402
from models_dmjd import EMATeacher  # noqa: E402
from util.misc import resolve_device, synchronize  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser("DMJD pre-training step throughput")
    p.add_argument("--model", default="dmjd_convit_base_patch16_dec8_hog")
    p.add_argument("--batch_size", default=64, type=int, help="images per step (x num_views samples)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--num_views", default=2, type=int)
    p.add_argument("--mask_ratio", default=0.6, type=float)
    p.add_argument("--vis_target", default="hog", choices=["hog", "ema"])
    p.add_argument("--theta", default=1.0, type=float)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", default=3, type=int, help="untimed steps")
    p.add_argument("--steps", default=10, type=int, help="timed steps")
    p.add_argument("--peak_tflops", default=None, type=float, help="the device's dense peak for the chosen precision")
    return p.parse_args(argv)


def build(args, device):
    model = timm.create_model(args.model, img_size=args.input_size, num_views=args.num_views,
                              mask_ratio=args.mask_ratio, vis_target=args.vis_target, theta=args.theta).to(device)
    teacher = EMATeacher(model.encoder).to(device) if model.uses_teacher else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, teacher, optimizer


def count_flops(model, teacher, images, device, amp_dtype):
    """FLOPs of one forward and of one forward + backward, per image."""
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast_context(device, amp_dtype):
            loss, _ = model(images, teacher=teacher)
    forward = counter.get_total_flops()
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward / images.shape[0], (forward + counter.get_total_flops()) / images.shape[0]


def time_steps(model, teacher, optimizer, images, device, amp_dtype, warmup, steps):
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    def step():
        with autocast_context(device, amp_dtype):
            loss, _ = model(images, teacher=teacher)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.update(model.encoder, 0.996)

    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main(args):
    device = resolve_device(args.device)
    amp_name = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    amp_dtype = AMP[amp_name]
    torch.manual_seed(0)
    model, teacher, optimizer = build(args, device)
    images = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8,
                           device=device)
    params = sum(p.numel() for p in model.parameters())
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    fwd, fwd_bwd = count_flops(model, teacher, images, device, amp_dtype)
    seconds = time_steps(model, teacher, optimizer, images, device, amp_dtype, args.warmup, args.steps)
    ips = args.batch_size / seconds
    print(f"model {args.model}  params {params / 1e6:.2f} M (encoder {encoder_params / 1e6:.2f} M)  "
          f"input {args.input_size}  views {args.num_views}  batch {args.batch_size}  amp {amp_name}  device {device}")
    print(f"GFLOPs per image: forward {fwd / 1e9:.1f}, forward+backward {fwd_bwd / 1e9:.1f}")
    print(f"step {seconds * 1000:.1f} ms  {ips:.1f} images/s  achieved {fwd_bwd * ips / 1e12:.2f} TFLOP/s", end="")
    if args.peak_tflops:
        print(f" = {100 * fwd_bwd * ips / 1e12 / args.peak_tflops:.1f}% of {args.peak_tflops:g}", end="")
    print()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        print(f"peak memory {peak / 2 ** 30:.2f} GiB ({peak / args.batch_size / 2 ** 20:.1f} MiB per image)")
    else:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"peak host memory (max RSS) {rss / 2 ** 30:.2f} GiB")
    return {"images_per_s": ips, "step_s": seconds, "gflops_fwd": fwd / 1e9, "gflops_fwd_bwd": fwd_bwd / 1e9}


if __name__ == "__main__":
    main(parse_args())
