"""plot_logs.py / util.curves: the curves of runs from their log.txt, one panel per kind of value. (The script tests
of pre-training, fine-tuning, probing and segmentation also draw their own runs' logs.)"""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT
from util.curves import collect_panels, plot_runs, read_log
from util.visualization import label_palette


def write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


PRETRAIN = [{"train_loss": 1.0 - 0.1 * e, "train_loss_mask": 0.6, "train_lr": 1e-3 * (e + 1), "train_images": 8,
             "epoch": e} for e in range(3)]
SEGMENT = [{"iteration": 2 * (e + 1), "train_loss": 2.0, "train_lr": 1e-4, "test_mIoU": 10.0 + e, "test_aAcc": 50.0,
            "test_mAcc": 20.0, "test_IoU": {"sky": 30.0 + e, "road": None}, "epoch": e} for e in range(2)]


def test_panels_follow_the_keys_of_each_script(tmp_path):
    runs = {"pre": read_log(str(write_log(tmp_path / "pre", PRETRAIN))),
            "seg": read_log(str(write_log(tmp_path / "seg", SEGMENT)))}
    panels = {title: (axis, series) for title, axis, series in collect_panels(runs)}
    assert list(panels) == ["loss", "learning rate", "segmentation (%)", "per-class IoU (%) of seg"]
    axis, series = panels["loss"]
    assert axis == "epoch / iteration"
    assert [s.label for s in series] == ["pre: train_loss", "pre: train_loss_mask", "seg: train_loss"]
    assert series[0].xs == [0.0, 1.0, 2.0] and series[2].xs == [2.0, 4.0]  # segmentation: by iteration
    axis, series = panels["per-class IoU (%) of seg"]
    assert [(s.label, s.ys) for s in series] == [("sky", [30.0, 31.0])]  # a class without IoU has no curve


def test_the_picture_holds_each_series_colour(tmp_path):
    out = tmp_path / "curves.png"
    titles = plot_runs([str(write_log(tmp_path / "pre", PRETRAIN))], str(out))
    assert titles == ["loss", "learning rate"]
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    for color in label_palette(2):  # the two loss curves' colours (and the lr curve's first)
        assert (pixels == color).all(axis=1).sum() > 20


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
