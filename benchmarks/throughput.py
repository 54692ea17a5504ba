"""Throughput of the full DMJD pre-training step, and of the input pipeline.

Step mode (default): forward (both branches), backward, AdamW step and EMA update on synthetic uint8 images already
on the device, timed after warm-up. Each fast path can be switched on alone, so one run measures its effect against
a plain baseline built in the same process:

    python benchmarks/throughput.py --model dmjd_convit_base_patch16_dec8_hog --batch_size 64 \
        --paths plain,fused_attn,fused_adamw,channels_last,bf16,compile,all --peak_tflops 989

prints images/s (unique images; each has --num_views views), the ratio to the first path, peak memory and memory
per image, FLOPs per image (torch.utils.flop_counter) and the achieved fraction of --peak_tflops.

Data mode: decode, crop, flip, collate and host-to-device copy from an ImageFolder, in images/s:

    python benchmarks/throughput.py --data /path/to/imagenet --num_workers 16 --batch_size 256
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_dmjd  # noqa: E402,F401  (registers the models)
from engine_pretrain import autocast_context  # noqa: E402
from models_dmjd import EMATeacher  # noqa: E402
from util.misc import AMP_DTYPES, resolve_device, synchronize  # noqa: E402

# Each path switches on one fast path over the plain fp32 step; "all" switches on every one that applies.
PATHS = ("plain", "fused_attn", "fused_adamw", "channels_last", "bf16", "compile", "all")


@dataclass
class Path:
    fused_attn: bool = False
    fused_adamw: bool = False
    channels_last: bool = False
    amp: str = "none"
    compile: bool = False


def path_config(name: str, device: torch.device) -> Path:
    if name == "plain":
        return Path()
    if name == "bf16":
        return Path(amp="bf16")
    if name == "all":
        return Path(True, True, True, "bf16" if device.type == "cuda" else "none", True)
    if name in ("fused_attn", "fused_adamw", "channels_last", "compile"):
        return Path(**{name: True})
    raise SystemExit(f"error: unknown path {name!r} in --paths; choose from {', '.join(PATHS)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser("DMJD pre-training throughput")
    p.add_argument("--model", default="dmjd_convit_base_patch16_dec8_hog")
    p.add_argument("--batch_size", default=64, type=int, help="images per step (x num_views samples)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--num_views", default=2, type=int)
    p.add_argument("--mask_ratio", default=0.6, type=float)
    p.add_argument("--vis_target", default="hog", choices=["hog", "ema"])
    p.add_argument("--theta", default=1.0, type=float)
    p.add_argument("--paths", default="plain,all", help=f"comma-separated, from {', '.join(PATHS)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", default=3, type=int, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", default=10, type=int, help="timed steps")
    p.add_argument("--peak_tflops", default=None, type=float, help="the device's dense peak for the chosen precision")
    p.add_argument("--data", default=None, help="data mode: an ImageFolder root with train/")
    p.add_argument("--num_workers", default=8, type=int, help="data mode: loader workers")
    p.add_argument("--batches", default=50, type=int, help="data mode: timed batches")
    return p.parse_args(argv)


def set_fused_attention(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def build(args, device, path: Path):
    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.input_size, num_views=args.num_views,
                              mask_ratio=args.mask_ratio, vis_target=args.vis_target, theta=args.theta).to(device)
    set_fused_attention(model, path.fused_attn)
    if path.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = EMATeacher(model.encoder).to(device) if model.uses_teacher else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  **({"fused": True} if path.fused_adamw else {"foreach": False}))
    step_model = torch.compile(model) if path.compile else model
    return model, step_model, teacher, optimizer


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


def time_path(args, device, path: Path, images):
    amp_dtype = AMP_DTYPES[path.amp]
    model, step_model, teacher, optimizer = build(args, device, path)
    if path.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    def step():
        with autocast_context(device, amp_dtype):
            loss, _ = step_model(images, teacher=teacher)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.update(model.encoder, 0.996)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    flops = count_flops(model, teacher, images, device, amp_dtype)
    del model, step_model, teacher, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak, flops


def run_steps(args):
    device = resolve_device(args.device)
    images = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8,
                           device=device)
    print(f"model {args.model}  input {args.input_size}  views {args.num_views}  batch {args.batch_size}  "
          f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})  "
          f"torch {torch.__version__}  timm {timm.__version__}")
    results = {}
    base_ips = None
    print(f"{'path':<14}{'ms/step':>10}{'images/s':>11}{'ratio':>8}{'GFLOP/img f+b':>15}{'TFLOP/s':>9}"
          f"{'% peak':>8}{'peak GiB':>10}{'MiB/img':>9}")
    for name in [n.strip() for n in args.paths.split(",") if n.strip()]:
        path = path_config(name, device)
        seconds, peak, (fwd, fwd_bwd) = time_path(args, device, path, images)
        ips = args.batch_size / seconds
        base_ips = base_ips or ips
        tflops = fwd_bwd * ips / 1e12
        pct = f"{100 * tflops / args.peak_tflops:.1f}" if args.peak_tflops else "-"
        mem = f"{peak / 2 ** 30:.2f}" if peak is not None else "-"
        per_img = f"{peak / args.batch_size / 2 ** 20:.0f}" if peak is not None else "-"
        print(f"{name:<14}{seconds * 1000:>10.1f}{ips:>11.1f}{ips / base_ips:>8.2f}{fwd_bwd / 1e9:>15.1f}"
              f"{tflops:>9.2f}{pct:>8}{mem:>10}{per_img:>9}", flush=True)
        results[name] = {"images_per_s": ips, "step_s": seconds, "gflops_fwd": fwd / 1e9,
                         "gflops_fwd_bwd": fwd_bwd / 1e9, "peak_bytes": peak}
    if device.type == "cpu":
        import resource
        print(f"peak host memory (max RSS of the process) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    return results


def run_data(args):
    from util.datasets import build_pretrain_dataset
    device = resolve_device(args.device)
    dataset = build_pretrain_dataset(args.data, args.input_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0, prefetch_factor=4
                                         if args.num_workers > 0 else None)
    it = iter(loader)
    for _ in range(min(5, args.batches)):  # start the workers
        next(it)
    start, n = time.perf_counter(), 0
    for _ in range(args.batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch[0].to(device, non_blocking=True)
        n += batch[0].shape[0]
    synchronize(device)
    ips = n / (time.perf_counter() - start)
    print(f"data pipeline: {ips:.1f} images/s with {args.num_workers} workers (batch {args.batch_size}, "
          f"{args.input_size} px crops, to {device})")
    return ips


if __name__ == "__main__":
    cli = parse_args()
    run_data(cli) if cli.data else run_steps(cli)
