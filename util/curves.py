"""Training curves of one or several runs, drawn with matplotlib as panels of one PNG: losses, learning rate (on a
log axis), EMA momentum, accuracy, segmentation and detection scores, per-class IoU. `plot_logs.py` is its command.

Two sources per run folder. log.txt holds one JSON record per round: per epoch for pre-training, fine-tuning and
probing, per evaluation interval (with its `iteration`) for segmentation and detection. The TensorBoard events that
the run writes beside it hold the training values of every progress line (`train/loss`, `train/lr`, ...: the window's
mean loss and the lr at its last step, every --print_freq steps); where a run has them, they replace that key's
once-a-round value, which would draw a warmup-then-cosine schedule as a few straight segments. A value the events do
not have is drawn per round, and its legend says so.

Runs counted in epochs and runs counted in iterations never share an axis: a panel holds one kind, and a kind of
value that runs of both have gets a panel per unit. On the epoch axis a record of epoch e is drawn at e + 1, where
that epoch ends, so that it lines up with the progress lines inside the epoch.
"""
import json
import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

# Panels: a title, the log.txt keys it draws, and its y scale. The lr spans decades (a warmup from near zero, a
# cosine down to --min_lr): only a log axis shows all of it.
PANELS = (
    ("loss", r"(train|test)_loss\w*", "linear"),
    ("learning rate", r"train_lr", "log"),
    ("EMA teacher momentum", r"train_momentum", "linear"),
    ("top-1 / top-5 accuracy (%)", r"test_acc[15]", "linear"),
    ("segmentation (%)", r"test_(mIoU|mAcc|aAcc)", "linear"),
    ("detection AP", r"test_(bbox|segm)_AP(50|75)?", "linear"),
)
PER_CLASS_KEY = "test_IoU"  # {class name: IoU or None}, one panel per run
TENSORBOARD_PREFIX = "train/"  # the loop's per-progress-line scalars: train/<name> is log.txt's train_<name>
STEP = "step"  # the `per` of a series read from TensorBoard
AXIS_LABELS = {"epoch": "epochs", "iteration": "iterations (optimizer steps)"}
ROUND_NAMES = {"epoch": "per epoch", "iteration": "per evaluation interval"}
ROUND_STEPS = [1, 2, 2.5, 5, 10]  # tick spacings (times a power of ten): matplotlib's default y axis has them
MAX_LEGEND = 20  # series; a per-class panel of ADE20K's 150 classes would be all legend


class Series(NamedTuple):
    """One curve: `per` says how often it has a point: "epoch" or "iteration" (once a round of log.txt), or "step"
    (every progress line, from TensorBoard)."""
    label: str
    xs: List[float]
    ys: List[float]
    per: str

    @property
    def legend(self) -> str:
        return self.label + (" (every --print_freq steps)" if self.per == STEP else f" ({ROUND_NAMES[self.per]})")


class Panel(NamedTuple):
    title: str
    axis: str  # "epoch" or "iteration": the unit of the x axis
    series: List[Series]
    scale: str = "linear"  # of the y axis


class RunLog(NamedTuple):
    """A run as the plot reads it: its log.txt rounds and the per-step values of its TensorBoard events
    ({log key: (x in the run's unit, values)})."""
    records: List[dict]
    steps: Dict[str, Tuple[List[float], List[float]]]

    @property
    def axis(self) -> str:
        """Segmentation and detection log per evaluation interval, with its iteration: their x axis; the other
        scripts', the epoch."""
        return "iteration" if self.records and all("iteration" in r for r in self.records) else "epoch"


def read_log(path: str) -> List[dict]:
    """The round records of a run's log.txt (`path`: the run's folder or the file); lines without an epoch (such
    as an evaluation-only run's) are left out."""
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


def read_steps(folder: str, axis: str) -> Dict[str, Tuple[List[float], List[float]]]:
    """The training scalars of the TensorBoard events in `folder` (none there: {}), as {log.txt key: (x, values)}
    with x in the run's unit: TensorBoard's x is epoch x 1000 for an epoch-based run, the optimizer step for an
    iteration-based one. A resumed run that redid steps has them once, as the resumed run wrote them (TensorBoard's
    own purge of such steps needs a SessionLog.START event, which PyTorch's writer does not write)."""
    if not os.path.isdir(folder) or not any(n.startswith("events.out.tfevents.") for n in os.listdir(folder)):
        return {}
    from tensorboard.backend.event_processing import event_accumulator as ea
    # every scalar point (the default keeps a sample of 10,000); of the pictures, none
    accumulator = ea.EventAccumulator(folder, size_guidance={ea.SCALARS: 0, ea.IMAGES: 1, ea.HISTOGRAMS: 1,
                                                             ea.TENSORS: 1, ea.AUDIO: 1})
    accumulator.Reload()
    scale = 1000.0 if axis == "epoch" else 1.0
    steps = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.startswith(TENSORBOARD_PREFIX):
            kept = []
            for event in accumulator.Scalars(tag):  # in the order written, event file after event file
                while kept and kept[-1].step >= event.step:  # a resumed run redoes the steps after its checkpoint
                    kept.pop()
                kept.append(event)
            steps["train_" + tag[len(TENSORBOARD_PREFIX):]] = ([e.step / scale for e in kept],
                                                               [e.value for e in kept])
    return steps


def read_run(path: str) -> RunLog:
    records = read_log(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    run = RunLog(records, {})
    return run._replace(steps=read_steps(folder, run.axis))


def _finite(points, positive: bool) -> Tuple[List[float], List[float]]:
    points = [(float(x), float(y)) for x, y in points if isinstance(y, (int, float)) and not isinstance(y, bool)
              and math.isfinite(y) and (y > 0 or not positive)]
    return [x for x, _ in points], [y for _, y in points]


def _round_x(record: dict, axis: str) -> float:
    """Where a round's record goes on its axis: where the round ends."""
    return record["iteration"] if axis == "iteration" else record["epoch"] + 1


def _series_of(run: RunLog, key: str, label: str, positive: bool) -> Optional[Series]:
    if key in run.steps:
        xs, ys = _finite(zip(*run.steps[key]), positive)
        per = STEP
    else:
        xs, ys = _finite([(_round_x(r, run.axis), r.get(key)) for r in run.records], positive)
        per = run.axis
    return Series(label, xs, ys, per) if xs else None


def collect_panels(runs: Dict[str, RunLog]) -> List[Panel]:
    """The panels that some run has values for, one per kind of value and unit of the x axis (the unit named in the
    title only when both are there); a series is labelled with its key, and with its run's name when there are
    several runs."""
    panels = []
    for title, pattern, scale in PANELS:
        by_axis: Dict[str, List[Series]] = {}
        for name, run in runs.items():
            keys = sorted({k for r in run.records for k in r if re.fullmatch(pattern, k)} |
                          {k for k in run.steps if re.fullmatch(pattern, k)})
            for key in keys:
                found = _series_of(run, key, f"{name}: {key}" if len(runs) > 1 else key, scale == "log")
                if found:
                    by_axis.setdefault(run.axis, []).append(found)
        for axis in AXIS_LABELS:
            if axis in by_axis:
                panels.append(Panel(title + (f", by {axis}" if len(by_axis) > 1 else ""), axis, by_axis[axis], scale))
    for name, run in runs.items():
        classes = list(dict.fromkeys(c for r in run.records for c in (r.get(PER_CLASS_KEY) or {})))
        series = []
        for label in classes:
            xs, ys = _finite([(_round_x(r, run.axis), (r.get(PER_CLASS_KEY) or {}).get(label)) for r in run.records],
                             positive=False)
            if xs:
                series.append(Series(str(label), xs, ys, run.axis))
        if series:
            panels.append(Panel("per-class IoU (%)" + (f" of {name}" if len(runs) > 1 else ""), run.axis, series))
    return panels


def draw_panels(panels: Sequence[Panel], columns: int = 2):
    """A matplotlib Figure of the panels, `columns` to a row. Ticks are matplotlib's: round values (1, 2, 2.5 or 5
    times a power of ten; powers of ten on the log axis), labelled with the digits they need."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(6.4 * columns, 4.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # renders without pyplot or a display
    for index, panel in enumerate(panels):
        ax = figure.add_subplot(rows, columns, index + 1)
        for s in panel.series:
            per_round = s.per != STEP
            ax.plot(s.xs, s.ys, marker="o" if per_round else None, markersize=3, linewidth=1.5 if per_round else 1,
                    label=s.legend)
        ax.set_yscale(panel.scale)
        ax.set_xlabel(AXIS_LABELS[panel.axis])
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator("auto", steps=ROUND_STEPS, integer=panel.axis == "iteration"))
        ax.grid(True, which="major", alpha=0.3)
        if len(panel.series) <= MAX_LEGEND:
            ax.set_title(panel.title)
            ax.legend(fontsize="small")
        else:
            ax.set_title(f"{panel.title}: {len(panel.series)} curves, no legend")
    return figure


def plot_runs(paths: Sequence[str], out: str, names: Sequence[str] = (), columns: int = 2) -> List[str]:
    """Draws the curves of the runs at `paths` (output folders or log.txt files; `names`: their labels, default the
    paths as given) into the PNG `out`; returns the panels' titles."""
    names = list(names) or [p.rstrip("/").removesuffix("/log.txt") for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    runs = {name: read_run(path) for name, path in zip(names, paths)}
    panels = collect_panels(runs)
    if not panels:
        raise ValueError(f"no curve to draw: the log.txt of {', '.join(paths)} holds no round with a loss, learning "
                         "rate, accuracy, segmentation or detection score")
    figure = draw_panels(panels, columns)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=100)
    return [panel.title for panel in panels]
