"""Throughput of the full DMJD pre-training step, and of the input pipeline.

Step mode (default): forward (both branches), backward, AdamW step and EMA update on synthetic uint8 images already
on the device, timed after warm-up. Each fast path can be switched on alone, so one run measures its effect against
a plain baseline (the step as the authors' release runs it, see PATHS) built in the same process:

    python benchmarks/throughput.py --model dmjd_convit_base_patch16_dec8_hog --batch_size 64 \
        --paths plain,sparse_stages,fused_attn,fused_adamw,channels_last,bf16,hog_once,device_masks,no_sync,all \
        --peak_tflops 989

prints images/s (unique images; each has --num_views views), the ratio to the first path, peak memory and memory
per image, FLOPs per image (torch.utils.flop_counter) and the achieved fraction of --peak_tflops.

Data mode: decode, crop, flip, collate and host-to-device copy from an ImageFolder, in images/s:

    python benchmarks/throughput.py --data /path/to/imagenet --num_workers 16 --batch_size 256
"""
import argparse
import contextlib
import gc
import itertools
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import timm
import torch
from timm.layers import set_fused_attn, use_fused_attn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_dmjd  # noqa: E402,F401  (registers the models)
from benchmarks import grad_checkpointing  # noqa: E402
from engine_pretrain import LOSS_NAMES, PretrainTask  # noqa: E402
from training.distributed import synchronize  # noqa: E402
from training.meters import LossMeter  # noqa: E402
from training.step import TrainStep, autocast_context  # noqa: E402
from util.hog import hog_targets  # noqa: E402
from util.misc import AMP_DTYPES, resolve_device  # noqa: E402

# The plain path is the step as the authors' release runs it: fp32, dense conv stages, unfused attention, a
# per-parameter AdamW, contiguous memory, HOG computed for every view, masks drawn on the host and copied over, and
# the loss read back every step. Each other path switches on one fast path over it; "all" switches on every one
# that applies, and "all_eager" every one but compile (what main_pretrain.py runs on CUDA without --compile).
SWITCHES = ("sparse_stages", "fused_attn", "fused_adamw", "channels_last", "compile", "hog_once", "device_masks",
            "no_sync")
PATHS = ("plain", *SWITCHES[:5], "bf16", *SWITCHES[5:], "all", "all_eager")
BENCHMARK_LR = 1e-4


@dataclass
class Path:
    sparse_stages: bool = False
    fused_attn: bool = False
    fused_adamw: bool = False
    channels_last: bool = False
    amp: str = "none"
    compile: bool = False
    hog_once: bool = False  # HOG once per image, indexed by the views (plain: once per view)
    device_masks: bool = False  # masks drawn on the device (plain: on the host, then copied)
    no_sync: bool = False  # nothing read back in the step (plain: the loss, every step)


def path_config(name: str, device: torch.device) -> Path:
    if name == "plain":
        return Path()
    if name == "bf16":
        return Path(amp="bf16")
    if name in ("all", "all_eager"):
        every = {switch: True for switch in SWITCHES}
        return Path(**{**every, "compile": name == "all"}, amp="bf16" if device.type == "cuda" else "none")
    if name in SWITCHES:
        return Path(**{name: True})
    raise SystemExit(f"error: unknown path {name!r} in --paths; choose from {', '.join(PATHS)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DMJD pre-training throughput",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="dmjd_convit_base_patch16_dec8_hog", help="the DMJD model timed")
    p.add_argument("--batch_size", default=64, type=int, help="images per step (x num_views samples)")
    p.add_argument("--input_size", default=224, type=int, help="crop size in pixels")
    p.add_argument("--num_views", default=2, type=int, help="views per image")
    p.add_argument("--mask_ratio", default=0.6, type=float, help="corruption rate of one view")
    p.add_argument("--vis_target", default="hog", choices=["hog", "ema"], help="visible-branch target")
    p.add_argument("--theta", default=1.0, type=float, help="visible-loss weight (0: no visible branch)")
    p.add_argument("--paths", default="plain,all", help=f"comma-separated, from {', '.join(PATHS)}")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--warmup", default=3, type=int, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", default=10, type=int, help="timed steps")
    p.add_argument("--repeats", default=1, type=positive_int,
                   help="rounds through all --paths; each path's figures are the median of its rounds")
    p.add_argument("--peak_tflops", default=None, type=peak_arg,
                   help="the device's dense peak in TFLOP/s, or 'measure': time a large bf16 (CUDA) or fp32 (CPU) "
                        "matmul here and use that")
    p.add_argument("--memory", action="store_true",
                   help="also estimate activation memory per image (fp32 and bf16 autocast) and the largest batch")
    p.add_argument("--memory_gib", default=None, type=float,
                   help="device memory for the largest-batch estimate (none: the GPU's, or 80 on the CPU)")
    p.add_argument("--data", default=None, help="data mode: an ImageFolder root with train/")
    p.add_argument("--num_workers", default=8, type=int, help="data mode: loader workers")
    p.add_argument("--batches", default=50, type=int,
                   help="data mode: timed batches (at least 10 x the workers' queue of 2 batches each)")
    return p.parse_args(argv)


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def peak_arg(value: str):
    if value == "measure":
        return value
    try:
        peak = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of TFLOP/s or 'measure', got {value!r}") from None
    if not peak > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return peak


def measure_matmul_tflops(device: torch.device, size: int = None, seconds: float = 2.0):
    """Dense matmul throughput: bf16 on CUDA (the precision of the fast path), fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        n += 10
        synchronize(device)
    return 2 * size ** 3 * n / (time.perf_counter() - start) / 1e12, dtype


def synthetic_images(batch: int, input_size: int, device) -> torch.Tensor:
    """Random uint8 crops [batch, 3, input_size, input_size] already on the device, as the step takes them."""
    return torch.randint(0, 256, (batch, 3, input_size, input_size), dtype=torch.uint8, device=device)


def saved_activation_bytes(model, teacher, images, device, amp_dtype) -> int:
    """Bytes that one training forward keeps for backward (grad_checkpointing.saved_activation_bytes); its growth
    with the batch is the activation memory per image."""
    def forward():
        with autocast_context(device, amp_dtype):
            return model(images, teacher=teacher)[0]
    loss, saved = grad_checkpointing.saved_activation_bytes(model, forward)
    del loss
    return saved


def memory_estimate(args, device, amp: str, batches=(1, 2), sparse_stages: bool = True):
    """(activation bytes per image, batch-independent bytes, largest batch for the given memory).

    Batch-independent: fp32 weights, gradients and the two AdamW moments (16 bytes per parameter), the EMA
    teacher, plus what the forward saves whatever the batch (e.g. bf16 copies of the weights under autocast).
    The largest batch keeps 10% of the memory back for the allocator's fragmentation and kernel workspaces."""
    amp_dtype = AMP_DTYPES[amp]
    training = Path(sparse_stages=sparse_stages, fused_attn=True, hog_once=True, device_masks=True, no_sync=True)
    model, _, task, _ = build(args, device, training)
    teacher = task.teacher
    sizes = []
    for batch in batches:
        images = synthetic_images(batch, args.input_size, device)
        sizes.append(saved_activation_bytes(model, teacher, images, device, amp_dtype))
    per_image = (sizes[1] - sizes[0]) / (batches[1] - batches[0])
    fixed_saved = sizes[0] - per_image * batches[0]
    n_params = sum(p.numel() for p in model.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    fixed = 16 * n_params + 4 * n_teacher + max(0.0, fixed_saved)
    if args.memory_gib:
        capacity = args.memory_gib * 2 ** 30
    elif device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = 80 * 2 ** 30
    largest = int((0.9 * capacity - fixed) // per_image) if per_image > 0 else None
    del model, teacher
    return per_image, fixed, largest, capacity


def memory_line(per_image: float, fixed: float, largest, capacity: float) -> str:
    """memory_estimate's figures in words."""
    return (f"{per_image / 2 ** 20:.1f} MiB of activations saved for backward per image, {fixed / 2 ** 30:.3g} GiB "
            f"independent of the batch (weights, gradients, AdamW, teacher); largest batch in "
            f"{capacity / 2 ** 30:.0f} GiB, 10% held back: {largest}")


@contextlib.contextmanager
def fused_attention(enabled: bool):
    """timm's switch for the attention kernel (fused SDPA or the explicit softmax), for the models built inside."""
    before = use_fused_attn()
    set_fused_attn(enabled)
    try:
        yield
    finally:
        set_fused_attn(before)


def hog_per_view(model) -> None:
    """Replaces the model's per-image HOG by the release's: HOG of every view's copy of the image, the same values
    for K times the work."""
    def hog(raw):
        return hog_targets(raw.repeat(model.num_views, 1, 1, 1), model.patch_size, model.hog_cell_size, model.hog_bins)
    model.hog = hog


def build(args, device, path: Path):
    torch.manual_seed(0)
    encoder_options = {"sparse_stages": path.sparse_stages} if "convit" in args.model else {}
    with fused_attention(path.fused_attn):
        model = timm.create_model(args.model, img_size=args.input_size, num_views=args.num_views,
                                  mask_ratio=args.mask_ratio, vis_target=args.vis_target, theta=args.theta,
                                  **encoder_options).to(device)
    if not path.hog_once:
        hog_per_view(model)
    if path.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = PretrainTask(model, None, device)  # the teacher and its update
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  **({"fused": True} if path.fused_adamw else {"foreach": False}))
    step_model = torch.compile(model) if path.compile else model
    return model, step_model, task, optimizer


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


def make_step(args, device, path: Path, images):
    """The pre-training step of a path: training's own TrainStep (autocast, grad scaler with fp16, optimizer) with
    the pre-training task's post-step hook (its EMA teacher) on its model, with its losses summed on the device as
    the loop does; returns a closure that takes one step, the model, the teacher (or None), the (channels-last) images and the optimizer."""
    model, step_model, task, optimizer = build(args, device, path)
    teacher = task.teacher
    if path.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    num_visible = model.num_visible_tokens
    schedules = {"lr": lambda steps: BENCHMARK_LR, "momentum": lambda steps: 0.996}
    train_step = TrainStep(step_model, optimizer, schedules, amp_dtype=AMP_DTYPES[path.amp],
                           loss_names=LOSS_NAMES, after_step=task.after_step)
    meter = LossMeter(LOSS_NAMES, device)
    index = itertools.count()

    def forward():
        masks = None  # drawn on the device by the model
        if not path.device_masks:  # as a data loader hands them over: drawn on the host, pinned, copied
            masks = model.make_masks(images.shape[0])
            masks = (masks.pin_memory() if device.type == "cuda" else masks).to(device, non_blocking=True)
        return step_model(images, masks, teacher=teacher, num_visible=num_visible)

    def step():
        losses, count = train_step(forward, 0.0, next(index))
        meter.add(losses, count)
        if not path.no_sync:
            losses[0].item()  # the loss read every step, as the release logs it: the host waits for the step

    return step, model, teacher, images, optimizer


def time_path(args, device, path: Path, images, with_flops: bool = True):
    """Seconds per step after warm-up, peak and resident device memory (None on the CPU) and, `with_flops`,
    (forward, forward + backward) FLOPs per image."""
    step, model, teacher, images, _ = make_step(args, device, path, images)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    resident = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)  # weights, AdamW moments, teacher (gradients are freed)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    flops = count_flops(model, teacher, images, device, AMP_DTYPES[path.amp]) if with_flops else None
    del step, model, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak, resident, flops


# Operators of the matmul kind (linear layers, attention, convolutions); most of the rest is memory-bound.
MATMUL_LIKE = ("mm", "linear", "conv", "attention", "gemm")


def profile_path(args, device, path: Path, steps: int = 3, rows: int = 20):
    """Where one path's step at --batch_size spends its time: the operators with the most self time on the device
    (the CPU without a GPU) over `steps` steps after warm-up, the share of matmul-like operators, and how busy the
    device was (its operators' time over the wall time: well under 100% means the step waits for the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    images = synthetic_images(args.batch_size, args.input_size, device)
    step, model, teacher, images, _ = make_step(args, device, path, images)
    for _ in range(max(1, args.warmup)):
        step()
    synchronize(device)
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    del step, model, teacher, images
    # Operators only: the kernels they launch are listed as events of their own, and would be counted twice.
    self_us = {e.key: e.self_device_time_total if on_device else e.self_cpu_time_total
               for e in prof.key_averages() if e.device_type == DeviceType.CPU}
    self_us = {key: t for key, t in self_us.items() if t > 0}
    total_us = sum(self_us.values())
    matmul_us = sum(t for key, t in self_us.items() if any(word in key.removeprefix("aten::") for word in MATMUL_LIKE))
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:rows]
    if on_device:
        torch.cuda.empty_cache()
    return {"wall_ms_per_step": wall_us / 1e3 / steps, "busy_fraction": total_us / wall_us if on_device else None,
            "matmul_fraction": matmul_us / total_us if total_us else 0.0,
            "top": [{"op": key, "ms_per_step": t / 1e3 / steps, "fraction": t / total_us} for key, t in top]}


def run_steps(args, deadline: float = None, base_ips: float = None, keep_going: bool = False):
    """Times each of --paths, --repeats times over (in rounds through all of them, so that a machine's drift
    reaches every path alike); ratios are to the first path of the same round, or to `base_ips` (images/s of an
    earlier run in this process), and with several rounds each path gets the median. With a `deadline`
    (time.perf_counter()), paths not started by then are skipped. A path that runs out of memory is reported and
    skipped; with `keep_going`, so is one that fails otherwise (e.g. a compiler error), with its traceback printed,
    so that one broken path does not cost the figures of the others."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in main_pretrain.py
    images = synthetic_images(args.batch_size, args.input_size, device)
    print(f"model {args.model}  input {args.input_size}  views {args.num_views}  batch {args.batch_size}  "
          f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})  "
          f"torch {torch.__version__}  timm {timm.__version__}", flush=True)
    results = {"paths": {}}
    peak_tflops = args.peak_tflops
    if peak_tflops == "measure":
        peak_tflops, dtype = measure_matmul_tflops(device)
        print(f"measured dense peak: {peak_tflops:.1f} TFLOP/s ({str(dtype).replace('torch.', '')} matmul)", flush=True)
        results["measured_peak_tflops"] = peak_tflops
    header = (f"{'path':<14}{'ms/step':>10}{'images/s':>11}{'ratio':>8}{'GFLOP/img f+b':>15}{'TFLOP/s':>9}"
              f"{'% peak':>8}{'peak GiB':>10}{'act MiB/img':>13}")
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    configs = {name: path_config(name, device) for name in names}  # unknown names fail before any work
    rounds = {name: [] for name in names}  # per measured round: (seconds, ratio)
    figures = {}  # per path, from its first round: peak memory, resident memory, FLOPs
    ended = {}  # paths that failed, ran out of memory or were never started in time
    for round_index in range(args.repeats):
        # Each round starts one path further on, so that a path's place in the order cannot bias its median (on a
        # shared CPU the first path of a round was seen to run slower); with one round the order is --paths'.
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        if args.repeats == 1:
            print(header, flush=True)
        else:
            print(f"round {round_index + 1} of {args.repeats}, in the order {','.join(order)}", flush=True)
        measured = {}  # this round's seconds per step
        for name in order:
            if name in ended:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                print(f"{name:<14} skipped: out of time", flush=True)
                if not rounds[name]:
                    ended[name] = {"skipped": True}
                continue
            failure = None
            try:
                seconds, peak, resident, flops = time_path(args, device, configs[name], images,
                                                           with_flops=name not in figures)
            except torch.OutOfMemoryError:
                failure = {"out_of_memory": True}
                print(f"{name:<14} out of memory at batch {args.batch_size}", flush=True)
            except Exception as err:
                if not keep_going:
                    raise
                traceback.print_exc(file=sys.stdout)
                lines = str(err).strip().splitlines()
                failure = {"error": f"{type(err).__name__}: {lines[0] if lines else ''}"}
                print(f"{name:<14} failed: {failure['error']}", flush=True)
            if failure is not None:
                ended[name] = failure
                # The failed step's tensors were held by the traceback, released on leaving the except clause.
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            figures.setdefault(name, (peak, resident, flops))
            measured[name] = seconds
            if args.repeats == 1:  # the order is --paths': the baseline, if measured, came first
                ips = args.batch_size / seconds
                print(_step_line(name, args.batch_size, seconds, ips / (base_ips or ips), *figures[name],
                                 peak_tflops), flush=True)
                base_ips = base_ips or ips
        # the round's ratios: to `base_ips` (with one round, the first path's if none was given), else to the
        # round's first path in --paths order that was measured
        round_base = base_ips or next((args.batch_size / measured[n] for n in names if n in measured), None)
        if args.repeats > 1 and measured:
            print(header, flush=True)
        for name in names:
            if name in measured:
                ratio = args.batch_size / measured[name] / round_base
                rounds[name].append((measured[name], ratio))
                if args.repeats > 1:
                    print(_step_line(name, args.batch_size, measured[name], ratio, *figures[name], peak_tflops),
                          flush=True)
    if args.repeats > 1:
        print(f"median of {args.repeats} rounds (ratio: the median of the rounds' ratios, and their range)\n{header}",
              flush=True)
    for name in names:
        if not rounds[name]:
            results["paths"][name] = ended[name]
            continue
        seconds, ratio = (statistics.median(column) for column in zip(*rounds[name]))
        peak, resident, (fwd, fwd_bwd) = figures[name]
        ips = args.batch_size / seconds
        tflops = fwd_bwd * ips / 1e12
        if args.repeats > 1:
            ratios = [r for _, r in rounds[name]]
            print(_step_line(name, args.batch_size, seconds, ratio, *figures[name], peak_tflops) +
                  f"  (ratio {min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} rounds)", flush=True)
        results["paths"][name] = {"images_per_s": ips, "ratio": ratio, "step_s": seconds,
                                  "gflops_fwd": fwd / 1e9, "gflops_fwd_bwd": fwd_bwd / 1e9, "tflops": tflops,
                                  "fraction_of_peak": tflops / peak_tflops if peak_tflops else None,
                                  "peak_bytes": peak, "resident_bytes": resident,
                                  "rounds": [{"step_s": t, "ratio": r} for t, r in rounds[name]]}
    if device.type == "cpu":
        import resource
        print(f"peak host memory (max RSS of the process) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    if args.memory:
        results["memory"] = {}
        # sparse conv stages are what main_pretrain.py runs; the dense ones (ConViT only) for comparison
        stages = ("sparse", "dense") if "convit" in args.model else ("sparse",)
        for kind in stages:
            for amp in ("none", "bf16"):
                per_image, fixed, largest, capacity = memory_estimate(args, device, amp,
                                                                      sparse_stages=kind == "sparse")
                label = f"{'fp32' if amp == 'none' else amp}{', dense conv stages' if kind == 'dense' else ''}"
                print(f"memory ({label}): {memory_line(per_image, fixed, largest, capacity)}", flush=True)
                key = amp if kind == "sparse" else f"{amp}_dense_stages"
                results["memory"][key] = {"activation_bytes_per_image": per_image, "fixed_bytes": fixed,
                                          "largest_batch": largest, "capacity_bytes": capacity}
    return results


def _step_line(name, batch, seconds, ratio, peak, resident, flops, peak_tflops) -> str:
    fwd_bwd = flops[1]
    ips = batch / seconds
    tflops = fwd_bwd * ips / 1e12
    pct = f"{100 * tflops / peak_tflops:.1f}" if peak_tflops else "-"
    mem = f"{peak / 2 ** 30:.2f}" if peak is not None else "-"
    per_img = f"{(peak - resident) / batch / 2 ** 20:.0f}" if peak is not None else "-"
    return (f"{name:<14}{seconds * 1000:>10.1f}{ips:>11.1f}{ratio:>8.2f}{fwd_bwd / 1e9:>15.4g}{tflops:>9.2f}"
            f"{pct:>8}{mem:>10}{per_img:>13}")


def run_data(args):
    """Images/s of the input pipeline alone, as main_pretrain.py builds it.

    Workers fill a queue of `num_workers x 2` batches ahead of the consumer, so a short timed window would mostly
    drain that queue; the window is therefore at least 10 times the queue (at most 10% optimistic), and it runs
    over epoch boundaries (each a small refill bubble, so on the conservative side)."""
    from util.datasets import build_pretrain_dataset, skip_bad_collate
    device = resolve_device(args.device)
    dataset = build_pretrain_dataset(args.data, args.input_size)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"error: {args.data}/train has {len(dataset)} images, fewer than --batch_size {args.batch_size}")
    prefetch = 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=skip_bad_collate,  # as main_pretrain.py
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0,
                                         prefetch_factor=prefetch if args.num_workers > 0 else None)
    batches = max(args.batches, 10 * args.num_workers * prefetch)

    def forever():
        while True:
            yield from loader

    it = forever()
    next(it)  # the workers are up
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        images = next(it)[0]
        if images is not None:  # None: no readable image in the batch
            images.to(device, non_blocking=True)
            n += images.shape[0]
    synchronize(device)
    ips = n / (time.perf_counter() - start)
    print(f"data pipeline: {ips:.1f} images/s with {args.num_workers} workers ({batches} batches of "
          f"{args.batch_size}, {args.input_size} px crops, to {device})", flush=True)
    return ips


if __name__ == "__main__":
    cli = parse_args()
    run_data(cli) if cli.data else run_steps(cli)
