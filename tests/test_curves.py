"""plot_logs.py / util.curves: the curves of runs from their log.txt and TensorBoard events, one panel per kind of
value and unit, drawn with matplotlib; the axes are checked through matplotlib's API, not pixels. (The script tests
of pre-training, fine-tuning, probing and segmentation also draw their own runs' logs.)"""
import json
import math
import subprocess
import sys

import pytest

from helpers import ROOT
from training.loop import Schedule
from util.curves import collect_panels, draw_panels, plot_runs, read_log, read_run


def write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


PRETRAIN = [{"train_loss": 1.0 - 0.1 * e, "train_loss_mask": 0.6, "train_lr": 1e-3 * (e + 1), "train_images": 8,
             "epoch": e} for e in range(3)]
SEGMENT = [{"iteration": 2 * (e + 1), "train_loss": 2.0, "train_lr": 1e-4, "test_mIoU": 10.0 + e, "test_aAcc": 50.0,
            "test_mAcc": 20.0, "test_IoU": {"sky": 30.0 + e, "road": None}, "epoch": e} for e in range(2)]
# One small log of each script, with values that do not fall on round numbers (the ticks must still be round).
LOGS = {
    "pretrain": [{"train_loss": 2.97 - 0.41 * e, "train_loss_vis": 0.1537 / (e + 1), "train_lr": 3.87e-5 / (e + 1),
                  "train_momentum": 0.9961 + 0.0013 * e, "epoch": e} for e in range(4)],
    "finetune": [{"train_loss": 2.15 - 0.17 * e, "train_lr": 2.97e-6 * (e + 1), "test_loss": 1.71 - 0.13 * e,
                  "test_acc1": 61.43 + 7.3 * e, "test_acc5": 91.2 + 1.7 * e, "epoch": e} for e in range(4)],
    "segment": [{"iteration": 37 * (e + 1), "train_loss": 1.93 - 0.21 * e, "train_lr": 1.6e-3 * (1 - e / 3) + 1e-6,
                 "test_mIoU": 13.41 + 2.2 * e, "test_mAcc": 23.97 + e, "test_aAcc": 76.87 + e,
                 "test_IoU": {"bag": 8.2 * e, "coat": 19.07}, "epoch": e} for e in range(4)],
    "detect": [{"iteration": 50 * (e + 1), "train_loss": 3.11 - 0.4 * e, "train_lr": 6.4e-4,
                "test_bbox_AP": 7.43 + 1.3 * e, "test_bbox_AP50": 19.84 + e, "test_segm_AP": 6.57 + e,
                "epoch": e} for e in range(4)]}


def number(label: str) -> float:
    return float(label.replace("\u2212", "-"))  # matplotlib writes a typographic minus


def visible_ticks(axis):
    """(value, label) of the major ticks inside the axis's view."""
    low, high = sorted(axis.get_view_interval())
    ticks = zip(axis.get_majorticklocs(), axis.get_majorticklabels())
    return [(value, label.get_text()) for value, label in ticks if low <= value <= high]


def assert_round_ticks(axis):
    """Linear ticks are multiples of a spacing of 1, 2, 2.5 or 5 times a power of ten, labelled with at most four
    significant digits (not the data's own values, like 2.15 or 2.97e-06)."""
    ticks = visible_ticks(axis)
    assert len(ticks) >= 2, ticks
    step = ticks[1][0] - ticks[0][0]
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), ticks
    for value, label in ticks:
        assert math.isclose(value / step, round(value / step), abs_tol=1e-6), ticks
        assert math.isclose(number(label), value, rel_tol=1e-9, abs_tol=1e-12), ticks
        assert len(label.replace("\u2212", "").replace(".", "").strip("0")) <= 4, ticks


def drawn(runs: dict):
    """collect_panels and the figure of those panels, drawn (its tick labels set)."""
    panels = collect_panels(runs)
    figure = draw_panels(panels)
    figure.canvas.draw()
    return panels, figure


def test_panels_follow_the_keys_of_each_script(tmp_path):
    runs = {"pre": read_run(str(write_log(tmp_path / "pre", PRETRAIN))),
            "seg": read_run(str(write_log(tmp_path / "seg", SEGMENT)))}
    panels = {panel.title: panel for panel in collect_panels(runs)}
    assert list(panels) == ["loss, by epoch", "loss, by iteration", "learning rate, by epoch",
                            "learning rate, by iteration", "segmentation (%)", "per-class IoU (%) of seg"]
    assert panels["loss, by epoch"].axis == "epoch" and panels["loss, by iteration"].axis == "iteration"
    assert [s.label for s in panels["loss, by epoch"].series] == ["pre: train_loss", "pre: train_loss_mask"]
    assert [s.label for s in panels["loss, by iteration"].series] == ["seg: train_loss"]
    # an epoch's record where the epoch ends; segmentation's by iteration
    assert panels["loss, by epoch"].series[0].xs == [1.0, 2.0, 3.0]
    assert panels["loss, by iteration"].series[0].xs == [2.0, 4.0]
    panel = panels["per-class IoU (%) of seg"]
    assert [(s.label, s.ys) for s in panel.series] == [("sky", [30.0, 31.0])]  # a class without IoU has no curve


def test_the_picture_holds_each_series(tmp_path):
    out = tmp_path / "curves.png"
    titles = plot_runs([str(write_log(tmp_path / "pre", PRETRAIN))], str(out))
    assert titles == ["loss", "learning rate"] and out.stat().st_size > 0
    panels, figure = drawn({"pre": read_run(str(tmp_path / "pre"))})
    for panel, ax in zip(panels, figure.axes):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == [s.legend for s in panel.series]
        for line, s in zip(lines, panel.series):
            assert list(line.get_xdata()) == s.xs and list(line.get_ydata()) == s.ys
        assert len({line.get_color() for line in lines}) == len(lines)  # each curve its own colour


@pytest.mark.parametrize("script", list(LOGS))
def test_every_panel_has_round_ticks_and_a_log_axis_for_the_lr(tmp_path, script):
    panels, figure = drawn({script: read_run(str(write_log(tmp_path / script, LOGS[script])))})
    assert len(figure.axes) == len(panels) >= 3
    for panel, ax in zip(panels, figure.axes):
        assert_round_ticks(ax.xaxis)
        if panel.title == "learning rate":
            assert ax.get_yscale() == "log"
            for value, label in visible_ticks(ax.yaxis):  # powers of ten, written as such
                assert math.isclose(math.log10(value), round(math.log10(value))) and "10^{" in label
        else:
            assert ax.get_yscale() == "linear"
            assert_round_ticks(ax.yaxis)


def test_epochs_and_iterations_never_share_an_axis(tmp_path):
    runs = {name: read_run(str(write_log(tmp_path / name, LOGS[name]))) for name in ("finetune", "segment")}
    panels, figure = drawn(runs)
    assert {panel.axis for panel in panels} == {"epoch", "iteration"}
    for panel, ax in zip(panels, figure.axes):
        from_finetune = [line.get_label().startswith("finetune: ") for line in ax.get_lines()]
        assert all(from_finetune) if panel.axis == "epoch" else not any(from_finetune)
        assert ax.get_xlabel() == ("epochs" if panel.axis == "epoch" else "iterations (optimizer steps)")


def test_detection_scores_have_a_panel(tmp_path):
    titles = plot_runs([str(write_log(tmp_path / "det", LOGS["detect"]))], str(tmp_path / "det.png"))
    assert titles == ["loss", "learning rate", "detection AP"]


def test_a_learning_rate_of_zero_is_left_off_the_log_axis(tmp_path):
    records = [{"iteration": 10 * (e + 1), "train_lr": lr, "epoch": e} for e, lr in enumerate([1e-3, 5e-4, 0.0])]
    (panel,) = collect_panels({"seg": read_run(str(write_log(tmp_path / "seg", records)))})
    assert panel.series[0].ys == [1e-3, 5e-4]  # poly's last value: log 0 has no place


def write_events(folder, points, schedule: Schedule):
    """TensorBoard scalars as the training loop writes them (meters.log_window at schedule.axis): `points` are
    (round, micro-batches done, {name: value})."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(folder))
    for round_index, done, values in points:
        for name, value in values.items():
            writer.add_scalar(f"train/{name}", value, schedule.axis(round_index, done))
    writer.close()


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return 1e-3 * step / warmup
    return 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def test_per_step_values_come_from_the_runs_tensorboard_events(tmp_path):
    """The lr and loss of every progress line (here every 5 of 40 steps per epoch) replace log.txt's once-an-epoch
    values, which would draw the warmup and the cosine as two straight segments; the test accuracy stays per
    epoch, and the legends say which is which."""
    schedule = Schedule.of_epochs(2, 40, 1)
    folder = write_log(tmp_path / "ft", LOGS["finetune"][:2])
    points = [(r, done, {"lr": warmup_cosine(r * 40 + done, 80, 8), "loss": 2.0 - 0.01 * (r * 40 + done)})
              for r in range(2) for done in range(5, 41, 5)]
    write_events(folder, points, schedule)
    panels = {panel.title: panel for panel in collect_panels({"ft": read_run(str(folder))})}
    (lr,) = panels["learning rate"].series
    assert lr.per == "step" and lr.xs == [s / 40 for s in range(5, 81, 5)]  # epochs, from epoch x 1000
    assert lr.ys == pytest.approx([warmup_cosine(s, 80, 8) for s in range(5, 81, 5)])
    assert lr.ys[1] > lr.ys[0] and lr.ys[1] > lr.ys[-1]  # the warmup, then the decay
    assert "every --print_freq steps" in lr.legend
    loss = {s.label: s for s in panels["loss"].series}
    assert loss["train_loss"].per == "step" and len(loss["train_loss"].xs) == 16
    assert loss["test_loss"].per == "epoch" and loss["test_loss"].xs == [1.0, 2.0]
    assert "(per epoch)" in loss["test_loss"].legend
    (acc1, _) = panels["top-1 / top-5 accuracy (%)"].series
    assert acc1.per == "epoch" and "(per epoch)" in acc1.legend


def test_a_resumed_run_draws_the_steps_it_redid_once(tmp_path):
    """A run stopped after step 30 and resumed from its checkpoint at step 20 writes steps 25 and 30 again, into a
    second event file: the curve has each step once, the resumed run's value."""
    schedule = Schedule(steps=40, round_steps=40, accum_iter=1, unit="iteration")
    folder = write_log(tmp_path / "seg", [{"iteration": 40, "train_lr": 1e-4, "epoch": 0}])
    write_events(folder, [(0, done, {"lr": 1.0}) for done in range(5, 31, 5)], schedule)
    write_events(folder, [(0, done, {"lr": 2.0}) for done in range(25, 41, 5)], schedule)
    (panel,) = collect_panels({"seg": read_run(str(folder))})
    assert panel.series[0].xs == [5, 10, 15, 20, 25, 30, 35, 40]
    assert panel.series[0].ys == [1.0] * 4 + [2.0] * 4


def test_the_command_draws_several_runs_and_names_what_is_missing(tmp_path):
    pre, seg = write_log(tmp_path / "a", PRETRAIN), write_log(tmp_path / "b", SEGMENT)
    proc = subprocess.run([sys.executable, str(ROOT / "plot_logs.py"), str(pre), str(seg / "log.txt"), "--names",
                           "pretrain", "segment", "--out", str(tmp_path / "both.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "per-class IoU (%) of segment" in proc.stdout and (tmp_path / "both.png").is_file()
    proc = subprocess.run([sys.executable, str(ROOT / "plot_logs.py"), str(tmp_path / "none")], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "no log.txt" in proc.stderr


def test_a_damaged_line_is_named(tmp_path):
    (tmp_path / "log.txt").write_text(json.dumps(PRETRAIN[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not a JSON line"):
        read_log(str(tmp_path))


def test_requirements_name_matplotlib_with_a_lower_bound():
    """The plots need matplotlib; .ci/lowest installs the lowest version of each line."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("matplotlib>=") for line in lines)
