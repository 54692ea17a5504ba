"""Training curves from log.txt, the JSON line that every script appends per epoch (or, for segmentation, per
evaluation interval): losses, learning rate, EMA momentum, accuracy, segmentation scores and per-class IoU, for one
or several runs, drawn with Pillow (no plotting library) as panels of one PNG. `plot_logs.py` is its command."""
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from util.visualization import label_legend, label_palette, text_font

# Panels: a title and the log.txt keys it draws (of pre-training, fine-tuning, probing and segmentation).
PANELS = (
    ("loss", r"(train|test)_loss\w*"),
    ("learning rate", r"train_lr"),
    ("EMA teacher momentum", r"train_momentum"),
    ("top-1 / top-5 accuracy (%)", r"test_acc[15]"),
    ("segmentation (%)", r"test_(mIoU|mAcc|aAcc)"),
)
PER_CLASS_KEY = "test_IoU"  # {class name: IoU or None}, one panel per run


@dataclass
class Series:
    label: str
    xs: List[float]
    ys: List[float]


def read_log(path: str) -> List[dict]:
    """The epoch records of a run's log.txt (`path`: the run's folder or the file); lines without an epoch (such as
    an evaluation-only run's) are left out."""
    log = os.path.join(path, "log.txt") if os.path.isdir(path) else path
    if not os.path.isfile(log):
        raise FileNotFoundError(f"{path}: no log.txt (is it a run's --output_dir?)")
    records = []
    with open(log) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{log}, line {number}: not a JSON line ({err.msg})") from None
            if "epoch" in record:
                records.append(record)
    return records


def x_axis(records: Sequence[dict]) -> str:
    """Segmentation logs per evaluation interval: its iteration is the x axis; the other scripts, the epoch."""
    return "iteration" if records and all("iteration" in r for r in records) else "epoch"


def _numbers(records: Sequence[dict], x_key: str, value) -> Tuple[List[float], List[float]]:
    points = [(r[x_key], value(r)) for r in records]
    points = [(x, y) for x, y in points if isinstance(y, (int, float)) and math.isfinite(y)]
    return [float(x) for x, _ in points], [float(y) for _, y in points]


def collect_panels(runs: Dict[str, Sequence[dict]]) -> List[Tuple[str, str, List[Series]]]:
    """(title, x axis, series) of every panel that some run has values for; a series is labelled with its key, and
    with its run's name when there are several runs."""
    panels = []
    for title, pattern in PANELS:
        series, axes = [], set()
        for run, records in runs.items():
            keys = sorted({k for r in records for k in r if re.fullmatch(pattern, k)})
            for key in keys:
                xs, ys = _numbers(records, x_axis(records), lambda r, key=key: r.get(key))
                if xs:
                    series.append(Series(f"{run}: {key}" if len(runs) > 1 else key, xs, ys))
                    axes.add(x_axis(records))
        if series:
            panels.append((title, " / ".join(sorted(axes)), series))
    for run, records in runs.items():
        classes = list(dict.fromkeys(c for r in records for c in (r.get(PER_CLASS_KEY) or {})))
        series = []
        for name in classes:
            xs, ys = _numbers(records, x_axis(records), lambda r, name=name: (r.get(PER_CLASS_KEY) or {}).get(name))
            if xs:
                series.append(Series(str(name), xs, ys))
        if series:
            panels.append(("per-class IoU (%)" + (f" of {run}" if len(runs) > 1 else ""), x_axis(records), series))
    return panels


def _ticks(low: float, high: float, count: int = 5) -> List[Tuple[float, str]]:
    """`count` evenly spaced values with labels of as few significant digits as keep them apart."""
    values = [low + (high - low) * i / (count - 1) for i in range(count)]
    for digits in range(3, 10):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == count:
            break
    return list(zip(values, labels))


def _span(values: Sequence[float]) -> Tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:  # a single point or a flat curve: a band around it
        pad = abs(low) * 0.05 or 1.0
        return low - pad, high + pad
    return low, high


def draw_panel(title: str, x_name: str, series: Sequence[Series], width: int = 520, height: int = 300) -> np.ndarray:
    """One panel: axes with five ticks each, a line and dots per series, its title, and a legend below."""
    font = text_font(12)
    left, right, top, bottom = 64, 12, 24, 36
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    x_low, x_high = _span([x for s in series for x in s.xs])
    y_low, y_high = _span([y for s in series for y in s.ys])

    def at(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    draw.text((width / 2, top / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for y, label in _ticks(y_low, y_high):
        _, py = at(x_low, y)
        draw.line([(left, py), (width - right, py)], fill=(225, 225, 225))
        draw.text((left - 4, py), label, fill=(0, 0, 0), font=font, anchor="rm")
    for x, label in _ticks(x_low, x_high):
        px, _ = at(x, y_low)
        draw.text((px, height - bottom + 4), label, fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((width / 2, height - 4), x_name, fill=(0, 0, 0), font=font, anchor="mb")
    colors = label_palette(len(series))
    for s, color in zip(series, colors):
        color = tuple(int(c) for c in color)
        points = [at(x, y) for x, y in zip(s.xs, s.ys)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    legend = label_legend([(color, s.label) for s, color in zip(series, colors)], width)
    return np.concatenate([np.asarray(picture), legend])


def plot_runs(paths: Sequence[str], out: str, names: Sequence[str] = (), columns: int = 2) -> List[str]:
    """Draws the curves of the runs at `paths` (output folders or log.txt files; `names`: their labels, default the
    paths as given) into the PNG `out`; returns the panels' titles."""
    names = list(names) or [p.rstrip("/").removesuffix("/log.txt") for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    runs = {name: read_log(path) for name, path in zip(names, paths)}
    panels = collect_panels(runs)
    if not panels:
        raise ValueError(f"no curve to draw: the log.txt of {', '.join(paths)} holds no epoch with a loss, learning "
                         "rate, accuracy or segmentation score")
    pictures = [draw_panel(title, x_name, series) for title, x_name, series in panels]
    gap = 8
    cell_h, cell_w = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    rows = -(-len(pictures) // columns)
    n_cols = min(columns, len(pictures))
    sheet = np.full((rows * (cell_h + gap) + gap, n_cols * (cell_w + gap) + gap, 3), 255, np.uint8)
    for i, p in enumerate(pictures):
        top, left = gap + (i // columns) * (cell_h + gap), gap + (i % columns) * (cell_w + gap)
        sheet[top:top + p.shape[0], left:left + p.shape[1]] = p
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray(sheet).save(out)
    return [title for title, _, _ in panels]
