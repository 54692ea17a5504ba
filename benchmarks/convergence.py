"""The paper's efficiency claim at small scale: accuracy against the run's own compute time, and the time each way of
pre-training takes to reach the single-view baselines' accuracy.

The same encoder is pre-trained on Fashion-MNIST, with the same augmentation and masking ratio, for the same budget
of compute seconds in five ways,

    convmae_pixel  1 view, normalised pixel target, no visible branch    (ConvMAE style: the paper's baseline)
    maskfeat       1 view, HOG target, no visible branch                 (MaskFeat style)
    dm             2 disjoint views, HOG target, theta = 0               (disjoint masking only)
    dmjd_hog       2 disjoint views + visible distillation of HOG        (DMJD as released)
    dmjd_ema       2 disjoint views + visible distillation of an EMA teacher

and evaluated at evenly spaced points of that budget (plus the start) by a linear probe (standardised frozen
mean-pooled features, a linear layer) and a 20-NN classifier on the 10k test images.

The budget counts the run's own compute, so that a run sharing its machine gets the result it gets alone: on the CPU
the process's CPU time of the training steps, with torch pinned to `--threads` intra-op threads (1 by default: with
several OpenMP threads, CPU time grows under contention as the threads spin-wait for each other); on CUDA the GPU
time of the steps between CUDA events. Evaluation is not counted. The lr and EMA-momentum schedules and the
evaluation points follow the compute clock; the wall time of the steps is written beside it.

Results go to `convergence.csv` in `--out`, one row per evaluation, appended when a (configuration, seed) run ends;
a run whose rows are there is skipped, so that the same command completes a study over several sittings. A run cut
midway leaves no rows and runs again from the start. The csv's `setting` column holds every flag that changes a
result (and the machine); rows of another setting are never mixed in. From all rows of the setting the command then
writes `convergence.png` (accuracy against compute time, mean over seeds and the seeds' min-max band),
`convergence.md` (final accuracies; each configuration's time to the baselines' final accuracy and the speed-up, the
paper's ratio) and, with `--doc`, the `convergence` and `convergence_summary` blocks of those markdown files
(`convergence_gpu`, `convergence_gpu_summary` at the gpu scale):

    python benchmarks/convergence.py --budget 600 --evals 6 --seeds 0 1 2 --jobs 2 --out docs/convergence \
        --doc docs/CONVERGENCE.md README.md

`--device cuda` runs the same study at the "gpu" scale (ConViT-B, 96-pixel images; `--scale`).
Data: the Fashion-MNIST idx files from the Debian package `dataset-fashion-mnist`, or downloaded by torchvision.
"""
import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_dmjd  # noqa: E402,F401
from benchmarks.doc_block import provenance, rewrite_block  # noqa: E402
from engine_pretrain import LOSS_NAMES, PretrainTask  # noqa: E402
from models_dmjd import adaptive_lr, reachable_pred_ratio  # noqa: E402
from training.step import NonFiniteLossError, TrainStep  # noqa: E402
from util.demo_data import DEBIAN_DIR, locate_idx_files, read_idx  # noqa: E402
from util.misc import resolve_amp, resolve_device  # noqa: E402
from util.schedules import cosine_lr, cosine_momentum  # noqa: E402

CONFIGS = {
    "convmae_pixel": dict(num_views=1, theta=0.0, pred_type="pixel"),
    "maskfeat": dict(num_views=1, theta=0.0, pred_type="hog"),
    "dm": dict(num_views=2, theta=0.0, pred_type="hog"),
    "dmjd_hog": dict(num_views=2, theta=1.0, pred_type="hog", vis_target="hog"),
    "dmjd_ema": dict(num_views=2, theta=1.0, pred_type="hog", vis_target="ema"),
}
COLOURS = {"convmae_pixel": (148, 103, 189), "maskfeat": (31, 119, 180), "dm": (255, 127, 14),
           "dmjd_hog": (44, 160, 44), "dmjd_ema": (214, 39, 40)}
# What each scale pre-trains: "laptop" fits a CPU; "gpu" is the paper's ConViT-B (released decoder) at 96 pixels.
SCALES = {
    "laptop": dict(model="dmjd_convit_mini_patch8_hog", input_size=32, batch_size=128, blr=1.5e-3),
    "gpu": dict(model="dmjd_convit_base_patch16_dec8_hog", input_size=96, batch_size=256, blr=6e-4),
}
TRAIN_IMAGES = 60000  # Fashion-MNIST's training set: an epoch
METRICS = {"probe_acc": "linear probe", "knn_acc": "20-NN"}
FIELDS = ("setting", "config", "seed", "budget", "eval", "compute_s", "wall_s", "steps", "images", "probe_acc",
          "knn_acc")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DMJD convergence at small scale",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="runs to compare")
    p.add_argument("--baselines", nargs="+", default=["convmae_pixel", "maskfeat"], choices=list(CONFIGS),
                   help="configurations whose final accuracy the others' time is measured to")
    p.add_argument("--budget", default=600, type=float,
                   help="compute seconds of pre-training per run (CPU time of the steps; GPU time on CUDA)")
    p.add_argument("--evals", default=6, type=int, help="evaluations per run, evenly spaced in compute (plus t = 0)")
    p.add_argument("--seeds", nargs="+", default=[0, 1, 2], type=int, help="one run per seed and configuration")
    p.add_argument("--scale", default="auto", choices=["auto", *SCALES],
                   help="model, image size, batch and blr: " + "; ".join(
                       f"{k}: {v['model']} at {v['input_size']} px, batch {v['batch_size']}, blr {v['blr']}"
                       for k, v in SCALES.items()) + "; auto: gpu on CUDA, laptop otherwise")
    p.add_argument("--model", default=None, help="the DMJD model pre-trained; None: the scale's")
    p.add_argument("--input_size", default=None, type=int, help="image size the 32-pixel images are resized to "
                   "(None: the scale's)")
    p.add_argument("--batch_size", default=None, type=int, help="images per step; None: the scale's")
    p.add_argument("--blr", default=None, type=float, help="base lr of the adaptive rule; None: the scale's")
    p.add_argument("--mask_ratio", default=0.6, type=float, help="corruption rate of one view")
    p.add_argument("--mask_type", default="rand", choices=["rand", "block"], help="random or block masking")
    p.add_argument("--warmup_fraction", default=0.05, type=float, help="of the budget")
    p.add_argument("--probe_train", default=20000, type=int, help="training images for the probe and k-NN")
    p.add_argument("--probe_test", default=10000, type=int, help="test images the probe and k-NN are scored on")
    p.add_argument("--threads", default=1, type=int, help="torch intra-op threads of a run (the CPU-time unit)")
    p.add_argument("--jobs", default=1, type=int, help="runs at once, each in its own process (CPU only)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast of the steps: auto is bf16 on CUDA, none (fp32) on the CPU")
    p.add_argument("--data_dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default="docs/convergence", help="folder for the csv, png and md")
    p.add_argument("--doc", nargs="*", default=[], help="markdown files whose convergence and convergence_summary "
                   "blocks (convergence_gpu and convergence_gpu_summary at the gpu scale) are rewritten")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything that decides a run's result besides its configuration and seed; its `key` names the csv rows."""
    scale: str
    model: str
    input_size: int
    batch_size: int
    blr: float
    mask_ratio: float
    mask_type: str
    warmup_fraction: float
    budget: float
    evals: int
    probe_train: int
    probe_test: int
    threads: int
    amp: str
    device: str
    machine: str

    @classmethod
    def from_args(cls, args, device: torch.device) -> "Setting":
        if args.jobs > 1 and device.type != "cpu":
            raise ValueError(f"--jobs {args.jobs} runs several processes on the CPU; on {device.type} use --jobs 1")
        if args.budget <= 0 or args.evals < 1 or args.threads < 1:
            raise ValueError("--budget must be > 0, --evals and --threads >= 1")
        scale = scale_name(args.scale, device)
        picked = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SCALES[scale].items()}
        return cls(scale=scale, **picked, mask_ratio=args.mask_ratio, mask_type=args.mask_type,
                   warmup_fraction=args.warmup_fraction, budget=float(args.budget), evals=args.evals,
                   probe_train=args.probe_train, probe_test=args.probe_test, threads=args.threads,
                   amp=resolve_amp(args.amp, device)[0], device=device.type, machine=machine_name(device))

    @property
    def block(self) -> str:
        """The name of the docs' blocks this scale's report goes to ("convergence" at the laptop scale, else
        "convergence_<scale>"), and "<that>_summary" for its paragraph."""
        return "convergence" if self.scale == "laptop" else f"convergence_{self.scale}"

    @property
    def key(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def scale_name(scale: str, device: torch.device) -> str:
    """--scale as a name of SCALES: "auto" is the ConViT-B scale on CUDA and the laptop one elsewhere."""
    if scale != "auto":
        return scale
    return "gpu" if device.type == "cuda" else "laptop"


def machine_name(device: torch.device) -> str:
    """The processor the compute seconds were counted on: a GPU's name, or the CPU's model name and cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}_x{os.cpu_count()}".replace(" ", "_")


# ---------------------------------------------------------------------------------------------------------------------
# Data and evaluation.

def load_fashion_mnist(data_dir, device):
    files = locate_idx_files([data_dir] if data_dir else [DEBIAN_DIR],
                             os.path.expanduser("~/.cache/dmjd/fashion_mnist"))

    def images(key):  # 28x28 grey -> 32x32 RGB uint8 (zero padding keeps the items' scale)
        x = torch.from_numpy(read_idx(files[key]).copy())
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous().to(device)

    def labels(key):
        return torch.from_numpy(read_idx(files[key]).astype(np.int64)).to(device)

    return (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
            images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def augment(x, generator):
    """Random flips and shifts of up to 3 pixels, per image, on the device."""
    b, _, h, w = x.shape
    flip = torch.rand(b, 1, 1, 1, generator=generator, device=x.device) < 0.5
    x = torch.where(flip, x.flip(3), x)
    pad = F.pad(x, (3, 3, 3, 3))
    dy, dx = torch.randint(0, 7, (2, b), generator=generator, device=x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, 3, h, w + 6)
    x = pad.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, 3, h, w)
    return x.gather(3, cols)


def model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """The 32-pixel uint8 images at the scale's size: as they are, or resized bilinearly to floats in 0-255 (the
    model normalises either, and computes its HOG on the same values)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def features(model, x, size, batch=1000):
    """Mean-pooled encoder tokens of every image, all tokens visible."""
    encoder = model.encoder
    encoder.eval()
    out = torch.cat([encoder.forward_features(model.normalize(model_input(x[i:i + batch], size))).mean(dim=1)
                     for i in range(0, len(x), batch)])
    encoder.train()
    return out.float()


def linear_probe(train_x, train_y, test_x, test_y, epochs=100, seed=0):
    """A linear layer on standardised frozen features, full-batch Adam; test accuracy (%). The head's initial
    weights come from `seed` without touching the training run's random stream (its masks draw from it)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    head = head.to(train_x.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = F.cross_entropy(head(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * (head(test_x).argmax(1) == test_y).float().mean().item()


def knn(train_x, train_y, test_x, test_y, k=20):
    """k-NN on cosine similarity, majority vote; test accuracy (%)."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    correct = 0
    for i in range(0, len(test_x), 1000):
        nearest = (test_x[i:i + 1000] @ train_x.T).topk(k, dim=1).indices
        correct += (train_y[nearest].mode(dim=1).values == test_y[i:i + 1000]).sum().item()
    return 100 * correct / len(test_x)


def evaluate(model, data, setting: Setting, seed: int):
    train_x, train_y, test_x, test_y = data
    n_train, n_test = setting.probe_train, setting.probe_test
    f_train = features(model, train_x[:n_train], setting.input_size)
    f_test = features(model, test_x[:n_test], setting.input_size)
    return (linear_probe(f_train, train_y[:n_train], f_test, test_y[:n_test], seed=seed),
            knn(f_train, train_y[:n_train], f_test, test_y[:n_test]))


# ---------------------------------------------------------------------------------------------------------------------
# The compute clock and one run.

class ComputeClock:
    """Seconds of the run's own compute, counted only between `start()` and `stop()`, with wall time beside it.

    On the CPU: the process's CPU time, which other processes on the machine do not advance (time spent waiting
    for a core is not counted). On CUDA: the GPU time between CUDA events recorded at `start()` and at each reading;
    a reading waits for the GPU, so the steps are timed to their end (on a GPU of its own, that is the steps' wall
    time, host-side gaps included)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.compute, self.wall = 0.0, 0.0
        self._started = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.process_time()

    def _since(self, mark) -> float:
        if self.cuda:
            end = self._now()
            end.synchronize()
            return mark.elapsed_time(end) / 1000
        return time.process_time() - mark

    def start(self) -> None:
        self._started = (self._now(), time.perf_counter())

    def elapsed(self) -> float:
        """Compute seconds so far, the running span included."""
        return self.compute + (self._since(self._started[0]) if self._started else 0.0)

    def stop(self) -> None:
        self.compute = self.elapsed()
        self.wall += time.perf_counter() - self._started[1]
        self._started = None


def build_run(setting: Setting, name: str, device: torch.device):
    """The model, its pre-training task (teacher and post-step hook) and the step, schedules in budget fractions."""
    cfg = CONFIGS[name]
    pred_ratio = reachable_pred_ratio(cfg["num_views"], setting.mask_ratio)
    model = timm.create_model(setting.model, img_size=setting.input_size, mask_ratio=setting.mask_ratio,
                              pred_ratio=pred_ratio, mask_type=setting.mask_type, **cfg).to(device)
    task = PretrainTask(model, None, device)
    lr, _ = adaptive_lr(setting.blr, setting.batch_size, pred_ratio, setting.mask_ratio)
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    schedules = {"lr": functools.partial(cosine_lr, base_lr=lr, min_lr=0.0, warmup=setting.warmup_fraction, total=1.0),
                 "momentum": functools.partial(cosine_momentum, start=0.996, total=1.0)}  # the EMA teacher's
    step = TrainStep(model, optimizer, schedules,
                     amp_dtype=resolve_amp(setting.amp, device)[1], loss_names=LOSS_NAMES,
                     after_step=task.after_step)
    return model, task, step


def pretrain_run(setting: Setting, name: str, seed: int, data, device: torch.device) -> List[dict]:
    """Pre-trains one configuration for `setting.budget` compute seconds; a row per evaluation, the start included.
    The caller pins torch to `setting.threads` threads (main, or a worker as it starts)."""
    torch.manual_seed(seed)
    model, task, step = build_run(setting, name, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    train_x = data[0]
    clock = ComputeClock(device)
    steps, rows = 0, []

    def row(index):
        probe_acc, knn_acc = evaluate(model, data, setting, seed)
        print(f"{name:<13} seed {seed}  {clock.compute:6.0f} s compute  {clock.wall:6.0f} s wall  {steps:5d} steps  "
              f"probe {probe_acc:5.2f}%  20-NN {knn_acc:5.2f}%", flush=True)
        return dict(setting=setting.key, config=name, seed=seed, budget=setting.budget, eval=index,
                    compute_s=round(clock.compute, 3), wall_s=round(clock.wall, 3), steps=steps,
                    images=steps * setting.batch_size, probe_acc=round(probe_acc, 4), knn_acc=round(knn_acc, 4))

    rows.append(row(0))
    for index in range(1, setting.evals + 1):
        until = setting.budget * index / setting.evals
        clock.start()
        while (spent := clock.elapsed()) < until:
            idx = torch.randint(0, len(train_x), (setting.batch_size,), generator=generator, device=device)
            images = model_input(augment(train_x[idx], generator), setting.input_size)
            step(lambda: task.loss(images, None), spent / setting.budget, steps)
            steps += 1
        clock.stop()
        try:
            step.raise_if_nonfinite()
        except NonFiniteLossError as err:
            raise RuntimeError(f"{name} seed {seed}: {err}") from None
        rows.append(row(index))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# The csv: one row per evaluation, a run's rows appended together.

def read_rows(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ValueError(f"{path} has the columns {reader.fieldnames}, not {list(FIELDS)}: it was written by "
                             f"another version of this benchmark; move it away or choose another --out")
        rows = list(reader)
    for r in rows:
        for k in ("seed", "eval", "steps", "images"):
            r[k] = int(r[k])
        for k in ("budget", "compute_s", "wall_s", "probe_acc", "knn_acc"):
            r[k] = float(r[k])
    return rows


def append_rows(path: str, rows: Sequence[dict]) -> None:
    """Appends a finished run's rows in one write, the header first in a new file."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def finished_runs(rows: Sequence[dict], setting: Setting) -> set:
    """(configuration, seed) pairs of the setting whose final evaluation is in the rows."""
    return {(r["config"], r["seed"]) for r in rows if r["setting"] == setting.key and r["eval"] == setting.evals}


# ---------------------------------------------------------------------------------------------------------------------
# What the rows show: curves over seeds, the time to an accuracy, the report.

def curves(rows: Sequence[dict]) -> Dict[str, Dict[int, List[dict]]]:
    """config -> seed -> that run's rows in evaluation order."""
    out = {}
    for r in sorted(rows, key=lambda r: r["eval"]):
        out.setdefault(r["config"], {}).setdefault(r["seed"], []).append(r)
    return {name: out[name] for name in CONFIGS if name in out}


def mean_curve(by_seed: Dict[int, List[dict]], metric: str):
    """Mean compute time and mean, min and max of `metric` over seeds at each evaluation (seeds evaluate at the
    same budget fractions, a step apart at most)."""
    points = list(zip(*by_seed.values()))
    return ([statistics.mean(r["compute_s"] for r in p) for p in points],
            [statistics.mean(r[metric] for r in p) for p in points],
            [min(r[metric] for r in p) for p in points], [max(r[metric] for r in p) for p in points])


def time_to_accuracy(times: Sequence[float], accuracies: Sequence[float], target: float) -> Optional[float]:
    """The first time a curve reaches `target`, linear between evaluations; None when it never does."""
    for i, (t, acc) in enumerate(zip(times, accuracies)):
        if acc >= target:
            if i == 0:
                return t
            t0, acc0 = times[i - 1], accuracies[i - 1]
            return t0 + (t - t0) * (target - acc0) / (acc - acc0)
    return None


def speedups(rows: Sequence[dict], baseline: str, metric: str) -> Dict[str, dict]:
    """Per configuration: the compute time its mean curve takes to reach the baseline's final mean accuracy, the
    same on each seed's curve, and the speed-up (baseline's time / its time), the paper's ratio."""
    by_config = curves(rows)
    target = statistics.mean(runs[-1][metric] for runs in by_config[baseline].values())
    baseline_time = time_to_accuracy(*mean_curve(by_config[baseline], metric)[:2], target)
    out = {}
    for name, by_seed in by_config.items():
        reached = time_to_accuracy(*mean_curve(by_seed, metric)[:2], target)
        per_seed = [time_to_accuracy([r["compute_s"] for r in runs], [r[metric] for r in runs], target)
                    for runs in by_seed.values()]
        speedup = None if reached is None else (baseline_time / reached if reached > 0 else math.inf)
        out[name] = dict(target=target, time=reached, per_seed=per_seed, speedup=speedup)
    return out


def spread(values, digits=2) -> str:
    mean = statistics.mean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def finals(by_seed: Dict[int, List[dict]], metric: str) -> List[float]:
    return [runs[-1][metric] for runs in by_seed.values()]


def compare(rows: Sequence[dict], name: str, baseline: str, metric: str) -> str:
    """'+1.23 points over maskfeat (seeds' ranges apart)': the difference of final means, and whether every seed of
    one is above every seed of the other."""
    by_config = curves(rows)
    mine, theirs = finals(by_config[name], metric), finals(by_config[baseline], metric)
    apart = min(mine) > max(theirs) or max(mine) < min(theirs)
    return (f"{statistics.mean(mine) - statistics.mean(theirs):+.2f} points against {baseline} "
            f"(seeds' ranges {'apart' if apart else 'overlap'})")


def report(rows: Sequence[dict], setting: Setting, baselines: Sequence[str], png: str) -> str:
    """The markdown of the study: what ran, final accuracies, times to the baselines' accuracy and the picture."""
    by_config = curves(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"`{setting.model}` at {setting.input_size} px, batch {setting.batch_size}, blr {setting.blr}, masking "
             f"{setting.mask_ratio} ({setting.mask_type}); {setting.budget:.0f} compute seconds per run "
             f"({setting.device}, {setting.threads} thread(s), amp {setting.amp}), {setting.evals} evaluations; "
             f"seeds {', '.join(map(str, seeds))}; {provenance_of(setting)}. Mean ± standard deviation over seeds.",
             "", "| configuration | seeds | steps | steps per compute s | effective epochs | compute s | wall s (steps) "
             "| linear probe (%) | 20-NN (%) |", "|---|---|---|---|---|---|---|---|---|"]
    # a seed's configurations start from the same encoder: one start per seed
    starts = list({seed: runs[0] for by_seed in by_config.values() for seed, runs in by_seed.items()}.values())
    lines.append(f"| random init | {len(starts)} | 0 | - | 0 | 0 | 0 | {spread([r['probe_acc'] for r in starts])} | "
                 f"{spread([r['knn_acc'] for r in starts])} |")
    for name, by_seed in by_config.items():
        last = [runs[-1] for runs in by_seed.values()]
        views = CONFIGS[name]["num_views"]
        lines.append(f"| {name} | {len(last)} | {spread([r['steps'] for r in last], 0)} | "
                     f"{spread([r['steps'] / r['compute_s'] for r in last])} | "
                     f"{spread([r['images'] * views / TRAIN_IMAGES for r in last], 1)} | "
                     f"{spread([r['compute_s'] for r in last], 0)} | {spread([r['wall_s'] for r in last], 0)} | "
                     f"{spread([r['probe_acc'] for r in last])} | {spread([r['knn_acc'] for r in last])} |")
    lines += ["", "Effective epochs: images x views / 60,000, the paper's ETE. Steps per compute second: how steady "
                  "the unit was (other work on the machine still slows a step through shared caches and memory); "
                  "wall / compute seconds: how busy the machine was."]
    for baseline in [b for b in baselines if b in by_config]:
        lines += ["", f"Compute seconds to reach {baseline}'s final mean accuracy (on the mean curve over seeds, "
                      f"linear between evaluations; per seed in brackets, - where a seed never reaches it) and the "
                      f"speed-up, {baseline}'s time / the configuration's (the paper's ratio):", ""]
        tables = {m: speedups(rows, baseline, m) for m in METRICS}
        lines += ["| configuration | " + " | ".join(f"{label} to {tables[m][baseline]['target']:.2f} % (s) | speed-up"
                                                  for m, label in METRICS.items()) + " |",
                  "|---|" + "---|---|" * len(METRICS)]
        for name in by_config:
            cells = []
            for m in METRICS:
                s = tables[m][name]
                seeds_text = ", ".join("-" if t is None else f"{t:.0f}" for t in s["per_seed"])
                cells += [("not reached" if s["time"] is None else f"{s['time']:.0f}") + f" [{seeds_text}]",
                          "-" if s["speedup"] is None else f"{s['speedup']:.2f}x"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"![accuracy against compute time]({png})"]
    return "\n".join(lines) + "\n"


def summary(rows: Sequence[dict], setting: Setting, baselines: Sequence[str]) -> str:
    """One paragraph: each configuration's speed-up on the linear probe against the first baseline, and its final
    accuracy against each baseline."""
    by_config = curves(rows)
    present = [b for b in baselines if b in by_config]
    if not present:
        return "No baseline has finished runs yet."
    first = present[0]
    probe = speedups(rows, first, "probe_acc")
    parts = []
    for name in by_config:
        if name == first:
            continue
        s = probe[name]
        reach = ("does not reach it within the budget" if s["time"] is None else
                 "is there at the start (random init)" if s["time"] == 0 else
                 f"reaches it in {s['time']:.0f} s ({s['speedup']:.2f}x faster than {first})")
        against = "; ".join(compare(rows, name, b, "probe_acc") for b in present if b != name)
        parts.append(f"{name} {reach}; final probe {against}")
    seeds = sorted({r["seed"] for r in rows})
    return (f"At {setting.budget:.0f} compute seconds per run ({setting.model}, {setting.input_size} px, "
            f"{setting.device}, {len(seeds)} seed(s); {provenance_of(setting)}), {first}'s final linear-probe "
            f"accuracy is {probe[first]['target']:.2f}%: " + ". ".join(parts) + ".")


def provenance_of(setting: Setting) -> str:
    """provenance() with the run's threads rather than the reporting process's."""
    text = provenance(torch.device(setting.device))
    return text.replace(f"({torch.get_num_threads()} threads)", f"({setting.threads} thread(s) per run)")


def plot(rows: Sequence[dict], path: str, setting: Setting, baseline: Optional[str]) -> None:
    """Linear-probe and 20-NN accuracy against compute time: mean over seeds, the seeds' min-max band, and a
    dashed line at the baseline's final mean accuracy (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont
    panel_w, height, left, top, bottom, legend_w = 520, 560, 70, 50, 70, 170
    img = Image.new("RGBA", (2 * panel_w + legend_w, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    by_config = curves(rows)
    budget = setting.budget
    for p, (metric, label) in enumerate(METRICS.items()):
        x0, x1, y0, y1 = p * panel_w + left, (p + 1) * panel_w - 20, top, height - bottom
        accs = [r[metric] for r in rows if r["eval"] > 0]
        lo, hi = math.floor(min(accs) - 0.5), math.ceil(max(accs) + 0.5)

        def xy(seconds, acc):
            return x0 + (x1 - x0) * seconds / budget, y1 - (y1 - y0) * (acc - lo) / (hi - lo)

        for i in range(7):
            x, _ = xy(budget * i / 6, lo)
            draw.line([x, y1, x, y1 + 5], fill="black")
            draw.text((x - 10, y1 + 8), f"{budget * i / 6:.0f}", fill="black", font=font)
        for i in range(hi - lo + 1):
            _, y = xy(0, lo + i)
            draw.line([x0 - 5, y, x0, y], fill="black")
            draw.line([x0, y, x1, y], fill=(235, 235, 235))
            draw.text((x0 - 30, y - 6), f"{lo + i}", fill="black", font=font)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0 + 120, height - 30), f"compute seconds ({setting.device})", fill="black", font=font)
        draw.text((x0, 20), f"{label} top-1 (%), Fashion-MNIST test; mean and min-max over seeds", fill="black",
                  font=font)
        for name, by_seed in by_config.items():
            times, mean, low, high = (c[1:] for c in mean_curve(by_seed, metric))  # without t = 0: off the axis
            colour = COLOURS.get(name, (0, 0, 0))
            band = Image.new("RGBA", img.size, (0, 0, 0, 0))
            ImageDraw.Draw(band).polygon([xy(t, a) for t, a in zip(times, high)] +
                                         [xy(t, a) for t, a in zip(times[::-1], low[::-1])], fill=(*colour, 50))
            img.alpha_composite(band)
            draw = ImageDraw.Draw(img)
            line = [xy(t, a) for t, a in zip(times, mean)]
            draw.line(line, fill=colour, width=3)
            for x, y in line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if baseline in by_config:
            target = statistics.mean(finals(by_config[baseline], metric))
            _, y = xy(0, target)
            for x in range(int(x0), int(x1), 12):
                draw.line([x, y, min(x + 6, x1), y], fill=COLOURS[baseline], width=1)
    for n, name in enumerate(by_config):
        x, y = 2 * panel_w + 5, top + 20 + 20 * n
        draw.line([x, y, x + 25, y], fill=COLOURS.get(name, (0, 0, 0)), width=3)
        draw.text((x + 30, y - 6), name, fill="black", font=font)
    if baseline in by_config:
        draw.text((2 * panel_w + 5, top + 40 + 20 * len(by_config)), f"dashed: {baseline}'s\nfinal mean", fill="black",
                  font=font)
    img.convert("RGB").save(path)


# ---------------------------------------------------------------------------------------------------------------------
# The command.

_worker_data = None


def _start_worker(data_dir, threads):
    global _worker_data
    torch.set_num_threads(threads)
    _worker_data = load_fashion_mnist(data_dir, torch.device("cpu"))


def _run_in_worker(setting: Setting, name: str, seed: int) -> List[dict]:
    return pretrain_run(setting, name, seed, _worker_data, torch.device("cpu"))


def run_missing(args, setting: Setting, device: torch.device, path: str) -> None:
    """Runs the (configuration, seed) pairs without rows in the csv, seed by seed, appending each as it ends."""
    done = finished_runs(read_rows(path), setting)
    todo = [(name, seed) for seed in args.seeds for name in args.configs if (name, seed) not in done]
    for name, seed in sorted(done & {(n, s) for n in args.configs for s in args.seeds}):
        print(f"{name} seed {seed}: finished before, skipped", flush=True)
    if not todo:
        return
    if args.jobs == 1:
        data = load_fashion_mnist(args.data_dir, device)
        for name, seed in todo:
            append_rows(path, pretrain_run(setting, name, seed, data, device))
        return
    # spawn, not fork: a forked child of a process that used OpenMP can hang in its first parallel region
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn, initializer=_start_worker,
                                                initargs=(args.data_dir, setting.threads)) as pool:
        futures = [pool.submit(_run_in_worker, setting, name, seed) for name, seed in todo]
        for future in concurrent.futures.as_completed(futures):
            append_rows(path, future.result())


def write_report(args, setting: Setting, path: str) -> str:
    rows = [r for r in read_rows(path) if r["setting"] == setting.key]
    finished = finished_runs(rows, setting)
    rows = [r for r in rows if (r["config"], r["seed"]) in finished]
    if not rows:
        raise ValueError(f"{path} has no finished run of this setting")
    baselines = [b for b in args.baselines if b in {r["config"] for r in rows}]
    png = os.path.join(args.out, "convergence.png")
    plot(rows, png, setting, baselines[0] if baselines else None)
    md = report(rows, setting, args.baselines, "convergence.png")
    with open(os.path.join(args.out, "convergence.md"), "w") as f:
        f.write(md)
    text = summary(rows, setting, args.baselines)
    for doc in args.doc:
        with open(doc) as f:
            content = f.read()
        link = os.path.relpath(png, os.path.dirname(doc) or ".")
        blocks = {setting.block: report(rows, setting, args.baselines, link), f"{setting.block}_summary": text}
        present = [b for b in blocks if f"<!-- {b} -->" in content]
        if not present:
            raise ValueError(f"{doc} has neither a {setting.block} nor a {setting.block}_summary block")
        for block in present:
            rewrite_block(doc, block, blocks[block])
    print(md + "\n" + text)
    return md


def main(args):
    device = resolve_device(args.device)
    setting = Setting.from_args(args, device)
    torch.set_num_threads(setting.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "convergence.csv")
    start = time.perf_counter()
    run_missing(args, setting, device, path)
    print(f"runs done in {(time.perf_counter() - start) / 60:.1f} minutes of wall time", flush=True)
    return write_report(args, setting, path)


if __name__ == "__main__":
    main(parse_args())
