"""training.meters: device-side loss sums and the progress lines every loop prints."""
import re
import time

import pytest
import torch

from training.loop import Schedule
from training.meters import LossMeter, Progress, log_window
from training.step import NonFiniteLossError, TrainStep


def test_loss_meter_windows_and_epoch_means():
    meter = LossMeter(("loss", "part"), torch.device("cpu"))
    assert meter.read_window() is None  # nothing yet: the window carries on
    meter.add(torch.tensor([2.0, 4.0]), 2)
    meter.add(torch.tensor([1.0, 1.0]), 1)
    assert meter.read_window() == {"loss": 1.0, "part": pytest.approx(5 / 3)}
    meter.add(torch.tensor([3.0, 0.0]), 1)
    assert meter.read_window() == {"loss": 3.0, "part": 0.0}
    assert meter.totals(images=7) == {"loss": 1.5, "part": 1.25, "images": 7}


def test_progress_lines_give_eta_throughput_and_data_wait(capsys):
    def slow_batches():
        for _ in range(6):
            time.sleep(0.01)  # data wait
            yield torch.zeros(4)

    progress = Progress("Epoch [3]", total=6, print_freq=3, device=torch.device("cpu"), later_iters=12)
    lines = []
    for index, batch in progress.track(slow_batches()):
        progress.count(len(batch))
        if progress.due(index):
            lines.append(progress.line(index, {"loss": 0.5}, lr=1e-3))
    assert [line.split("  ")[0] for line in lines] == ["Epoch [3] [3/6]", "Epoch [3] [6/6]"]
    first = lines[0]
    assert re.search(r"eta 0:00:00 \(run 0:00:00\)  lr 1\.000e-03  loss 0\.5000  [0-9.]+ s/it  "
                     r"[0-9.]+ images/s per process  data 0\.01[0-9] s/it", first), first
    assert "mem" not in first  # peak device memory is shown on CUDA only
    assert progress.iterations == 6 and progress.images == 24
    assert "images/s per process" in progress.summary()
    assert capsys.readouterr().out.count("Epoch [3]") == 2


def test_progress_stops_at_its_total():
    progress = Progress("x", total=2, print_freq=1, device=torch.device("cpu"))
    assert [i for i, _ in progress.track(range(5))] == [0, 1]


def test_progress_stops_at_an_agreed_optimizer_step_boundary_and_resumes_where_it_stopped():
    asked = []
    progress = Progress("Epoch [1]", total=8, print_freq=100, device=torch.device("cpu"), names=("loss",),
                        stop=lambda: asked.append(True) or len(asked) == 2, stop_every=2)
    for index, batch in progress.track(range(8)):
        progress.count(4, bad_images=1)
        progress.losses.add(torch.tensor([float(index)]), 1)
    assert progress.stopped and len(asked) == 2  # asked before iterations 2 and 4, stopped before 4
    state = progress.state_dict()
    assert state["iteration"] == 4 and state["images"] == 16 and state["counts"] == {"bad_images": 4}
    resumed = Progress("Epoch [1]", total=8, print_freq=100, device=torch.device("cpu"), names=("loss",), first=4)
    resumed.load_state_dict(state)
    seen = []
    for index, batch in resumed.track(range(4, 8)):
        seen.append((index, batch))
        resumed.count(4, bad_images=1)
        resumed.losses.add(torch.tensor([float(index)]), 1)
    assert seen == [(4, 4), (5, 5), (6, 6), (7, 7)] and not resumed.stopped
    assert resumed.totals() == {"loss": 3.5, "images": 32, "bad_images": 8}  # the whole epoch's record


class _Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_log_window_checks_prints_and_writes_tensorboard_scalars(capsys):
    model = torch.nn.Linear(1, 1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda p: 0.1)
    progress = Progress("Epoch [0]", total=4, print_freq=2, device=torch.device("cpu"), names=("loss",))
    writer = _Writer()
    log_window(step, progress, 1, 0, writer)  # an empty window prints nothing
    assert writer.scalars == [] and capsys.readouterr().out == ""
    out = step(lambda: model(torch.ones(1)).sum(), 0.0, 0)
    progress.losses.add(*out)
    log_window(step, progress, 1, Schedule(4, 4, 1).axis(0, 2), writer, momentum=0.99)
    assert [tag for tag, _, _ in writer.scalars] == ["train/loss", "train/lr", "train/momentum"]
    assert {x for _, _, x in writer.scalars} == {500}  # epoch_1000x: 2 of 4 iterations of epoch 0
    step(lambda: model(torch.ones(1)).sum() * float("nan"), 0.0, 1)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1"):
        log_window(step, progress, 3, 1000, writer)


def test_the_loop_axis_is_epoch_x_1000_for_epochs_and_the_optimizer_step_for_iterations():
    epochs, intervals = Schedule(12, 4, 2), Schedule(500, 50, 2, unit="iteration")
    assert epochs.axis(1, 4) == 1500 and epochs.round_batches == 8 and epochs.rounds == 3
    assert intervals.axis(2, 10) == 105 and intervals.axis(3, 0) == 150  # 2 micro-batches per step
    assert intervals.header(2) == "Iterations 100-150" and intervals.label(2) == "iteration 150"
    assert epochs.header(1) == "Epoch [1]" and epochs.label(1) == "epoch 1"


def test_a_schedule_whose_rounds_do_not_divide_its_steps_ends_with_a_shorter_round():
    schedule = Schedule(92187, 3688, 1, unit="iteration")  # ConvMAE's 25-epoch COCO schedule, evaluated every 3688
    assert schedule.rounds == 25 and schedule.batches_in(0) == 3688 and schedule.batches_in(24) == 92187 - 24 * 3688
    assert schedule.label(24) == "iteration 92187" and schedule.header(24) == "Iterations 88512-92187"
    assert schedule.batches_after(23) == 92187 - 24 * 3688 and schedule.batches_after(24) == 0
    assert Schedule.of_epochs(3, 10, 4) == Schedule(6, 2, 4)  # 2 whole windows of 4 batches per epoch
