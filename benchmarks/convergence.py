"""The paper's efficiency claim at small scale: accuracy against pre-training wall-clock time.

The same small ConViT is pre-trained on Fashion-MNIST for the same wall-clock budget in four ways,

    maskfeat   1 view, HOG target                                (MaskFeat style)
    dm         2 disjoint views, HOG target, theta = 0           (disjoint masking only)
    dmjd_hog   2 disjoint views + visible distillation of HOG    (DMJD as released)
    dmjd_ema   2 disjoint views + visible distillation of an EMA teacher

and evaluated at evenly spaced times (evaluation time is not counted) by a linear probe (BatchNorm without affine +
linear layer on frozen, mean-pooled features) and a 20-NN classifier, on the 10k test images. Writes
`convergence.csv` (one row per evaluation), `convergence.png` (probe accuracy against time) and `convergence.md`
(a table of the final accuracies, mean and spread over seeds):

    python benchmarks/convergence.py --budget 300 --evals 5 --seeds 0 1 2 --out docs/convergence

Data: the Fashion-MNIST idx files from the Debian package `dataset-fashion-mnist`, or downloaded by torchvision.
"""
import argparse
import csv
import math
import os
import statistics
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_dmjd  # noqa: E402,F401
from engine_pretrain import LOSS_NAMES, PretrainTask  # noqa: E402
from models_dmjd import adaptive_lr, reachable_pred_ratio  # noqa: E402
from training.distributed import synchronize  # noqa: E402
from training.step import NonFiniteLossError, TrainStep  # noqa: E402
from util.demo_data import DEBIAN_DIR, locate_idx_files, read_idx  # noqa: E402
from util.misc import resolve_device  # noqa: E402
from util.schedules import cosine_lr, cosine_momentum  # noqa: E402

CONFIGS = {
    "maskfeat": dict(num_views=1, theta=0.0),
    "dm": dict(num_views=2, theta=0.0),
    "dmjd_hog": dict(num_views=2, theta=1.0, vis_target="hog"),
    "dmjd_ema": dict(num_views=2, theta=1.0, vis_target="ema"),
}
COLOURS = {"maskfeat": (31, 119, 180), "dm": (255, 127, 14), "dmjd_hog": (44, 160, 44), "dmjd_ema": (214, 39, 40)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DMJD convergence at small scale",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="dmjd_convit_mini_patch8_hog", help="the DMJD model pre-trained")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="runs to compare")
    p.add_argument("--budget", default=300, type=float, help="pre-training seconds per run")
    p.add_argument("--evals", default=5, type=int, help="evaluations per run, evenly spaced in time (plus t = 0)")
    p.add_argument("--seeds", nargs="+", default=[0], type=int, help="one run per seed and configuration")
    p.add_argument("--batch_size", default=128, type=int, help="images per step")
    p.add_argument("--blr", default=1.5e-3, type=float, help="base lr of the adaptive rule")
    p.add_argument("--mask_ratio", default=0.6, type=float, help="corruption rate of one view")
    p.add_argument("--mask_type", default="rand", choices=["rand", "block"], help="random or block masking")
    p.add_argument("--warmup_fraction", default=0.05, type=float, help="of the budget")
    p.add_argument("--probe_train", default=20000, type=int, help="training images for the probe and k-NN")
    p.add_argument("--data_dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default="docs/convergence", help="folder for the csv, png and md")
    return p.parse_args(argv)


def load_fashion_mnist(data_dir, device):
    files = locate_idx_files([data_dir] if data_dir else [DEBIAN_DIR],
                             os.path.expanduser("~/.cache/dmjd/fashion_mnist"))

    def images(key):  # 28x28 grey -> 32x32 RGB uint8 (zero padding keeps the digits' scale)
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


@torch.no_grad()
def features(encoder, normalize, x, batch=1000):
    encoder.eval()
    out = torch.cat([encoder.forward_features(normalize(x[i:i + batch])).mean(dim=1) for i in range(0, len(x), batch)])
    encoder.train()
    return out


def linear_probe(train_x, train_y, test_x, test_y, epochs=100, seed=0):
    """BatchNorm without affine and a linear layer on frozen features, full-batch Adam; test accuracy (%)."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1).to(train_x.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = F.cross_entropy(head(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * (head(test_x).argmax(1) == test_y).float().mean().item()


def knn(train_x, train_y, test_x, test_y, k=20):
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    correct = 0
    for i in range(0, len(test_x), 1000):
        nearest = (test_x[i:i + 1000] @ train_x.T).topk(k, dim=1).indices
        correct += (train_y[nearest].mode(dim=1).values == test_y[i:i + 1000]).sum().item()
    return 100 * correct / len(test_x)


def evaluate(model, data, probe_train, seed):
    train_x, train_y, test_x, test_y = data
    encoder, normalize = model.encoder, model.normalize
    f_train = features(encoder, normalize, train_x[:probe_train])
    f_test = features(encoder, normalize, test_x)
    return (linear_probe(f_train, train_y[:probe_train], f_test, test_y, seed=seed),
            knn(f_train, train_y[:probe_train], f_test, test_y))


def pretrain_run(args, name, seed, data, device):
    """Pre-trains one configuration for args.budget seconds; yields an evaluation row at each checkpoint time."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    pred_ratio = reachable_pred_ratio(cfg["num_views"], args.mask_ratio)
    model = timm.create_model(args.model, img_size=32, mask_ratio=args.mask_ratio, pred_ratio=pred_ratio,
                              mask_type=args.mask_type, **cfg).to(device)
    # the pre-training task's teacher and post-step hook, its schedules following the clock: progress = time / budget
    task = PretrainTask(model, None, device, momentum_at=lambda progress: cosine_momentum(progress, 0.996, 1.0))
    lr, _ = adaptive_lr(args.blr, args.batch_size, pred_ratio, args.mask_ratio)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.05)
    step = TrainStep(model, optimizer, lambda progress: cosine_lr(progress, lr, 0.0, args.warmup_fraction, 1.0),
                     loss_names=LOSS_NAMES, after_step=task.after_step)
    generator = torch.Generator(device=device).manual_seed(seed)
    train_x = data[0]
    eval_times = [args.budget * (i + 1) / args.evals for i in range(args.evals)]

    acc, knn_acc = evaluate(model, data, args.probe_train, seed)
    yield dict(config=name, seed=seed, seconds=0.0, steps=0, images=0, probe_acc=acc, knn_acc=knn_acc)
    trained, steps = 0.0, 0
    for until in eval_times:
        synchronize(device)
        start = time.perf_counter()
        while trained + (time.perf_counter() - start) < until:
            progress = (trained + time.perf_counter() - start) / args.budget
            idx = torch.randint(0, len(train_x), (args.batch_size,), generator=generator, device=device)
            images = augment(train_x[idx], generator)
            step(lambda: task.loss(images, None), progress, steps)
            steps += 1
        synchronize(device)
        trained += time.perf_counter() - start
        try:
            step.raise_if_nonfinite()
        except NonFiniteLossError as err:
            raise RuntimeError(f"{name} seed {seed}: {err}") from None
        acc, knn_acc = evaluate(model, data, args.probe_train, seed)
        row = dict(config=name, seed=seed, seconds=round(trained, 1), steps=steps, images=steps * args.batch_size,
                   probe_acc=acc, knn_acc=knn_acc)
        print(f"{name:<9} seed {seed}  {trained:6.0f} s  {steps:5d} steps  probe {acc:5.2f}%  20-NN {knn_acc:5.2f}%",
              flush=True)
        yield row


def plot(rows, path, budget):
    """Probe accuracy against pre-training time, mean over seeds, one line per configuration (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont
    width, height, left, right, top, bottom = 900, 560, 80, 200, 40, 70
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    accs = [r["probe_acc"] for r in rows]
    lo, hi = math.floor(min(accs) - 1), math.ceil(max(accs) + 1)

    def xy(seconds, acc):
        return (left + (width - left - right) * seconds / budget,
                height - bottom - (height - top - bottom) * (acc - lo) / (hi - lo))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        s = budget * i / 5
        x, _ = xy(s, lo)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{s:.0f}", fill="black", font=font)
    for i in range(6):
        a = lo + (hi - lo) * i / 5
        _, y = xy(0, a)
        draw.line([left - 5, y, left, y], fill="black")
        draw.line([left, y, width - right, y], fill=(230, 230, 230))
        draw.text((left - 45, y - 6), f"{a:.1f}", fill="black", font=font)
    draw.text((left + 150, height - 30), "pre-training wall-clock time (s)", fill="black", font=font)
    draw.text((10, 10), "linear-probe top-1 (%) on Fashion-MNIST test, mean over seeds", fill="black", font=font)
    for n, name in enumerate(dict.fromkeys(r["config"] for r in rows)):
        by_seed = {}  # seeds evaluate at slightly different times: average the i-th evaluations
        for r in rows:
            if r["config"] == name:
                by_seed.setdefault(r["seed"], []).append(r)
        series = list(zip(*by_seed.values()))
        line = [xy(statistics.mean(r["seconds"] for r in group), statistics.mean(r["probe_acc"] for r in group))
                for group in series]
        colour = COLOURS.get(name, (0, 0, 0))
        draw.line(line, fill=colour, width=3)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([width - right + 15, top + 20 + 20 * n, width - right + 40, top + 20 + 20 * n], fill=colour, width=3)
        draw.text((width - right + 45, top + 14 + 20 * n), name, fill="black", font=font)
    img.save(path)


def table(rows, args, device):
    finals = {}
    for r in rows:
        key = (r["config"], r["seed"])
        if r["steps"] >= finals.get(key, {"steps": -1})["steps"]:
            finals[key] = r
    start = {r["seed"]: r for r in rows if r["steps"] == 0 and r["config"] == args.configs[0]}

    def spread(values):
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    lines = [f"Budget {args.budget:.0f} s of pre-training per run on {device}, {len(args.seeds)} seed(s) "
             f"({', '.join(map(str, args.seeds))}); mean ± standard deviation over seeds.", "",
             "| configuration | steps | images seen | linear probe top-1 (%) | 20-NN top-1 (%) |",
             "|---|---|---|---|---|",
             f"| random init (no pre-training) | 0 | 0 | {spread([r['probe_acc'] for r in start.values()])} | "
             f"{spread([r['knn_acc'] for r in start.values()])} |"]
    for name in args.configs:
        final = [r for (c, _), r in finals.items() if c == name]
        lines.append(f"| {name} | {spread([r['steps'] for r in final])} | "
                     f"{spread([r['images'] for r in final])} | {spread([r['probe_acc'] for r in final])} | "
                     f"{spread([r['knn_acc'] for r in final])} |")
    return "\n".join(lines) + "\n"


def main(args):
    device = resolve_device(args.device)
    data = load_fashion_mnist(args.data_dir, device)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.configs:
            rows.extend(pretrain_run(args, name, seed, data, device))
    with open(os.path.join(args.out, "convergence.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, "convergence.png"), args.budget)
    md = table(rows, args, device)
    with open(os.path.join(args.out, "convergence.md"), "w") as f:
        f.write(md)
    print(md)
    return rows


if __name__ == "__main__":
    main(parse_args())
