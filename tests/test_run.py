"""training.run.Run: the run skeleton's files, resume and lifecycle, in one process on the CPU."""
import json

import pytest
import torch

from helpers import pretrain_config
from training.run import Run, TrainState
from training.step import TrainStep


def state(lr=0.1, skipped=0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return TrainState(model, optimizer, TrainStep(model, optimizer, lambda p: lr, skipped=skipped))


def train(s: TrainState, steps=2):
    for index in range(steps):
        s.step(lambda: s.model(torch.ones(4, 3)).pow(2).mean(), 0.0, index)


def test_epochs_write_last_periodic_and_best_checkpoints_and_log_lines(tmp_path, capsys):
    cfg = pretrain_config(output_dir=str(tmp_path / "out"), epochs=4)
    s = state(skipped=1)
    with Run(cfg, save_freq=2, keep_last=1) as run:
        assert run.world_size == 1 and run.is_main and run.writer is not None
        for epoch in run.epochs(0):
            train(s)
            run.end_epoch(s, epoch, {"train_loss": 1.0 / (epoch + 1)}, best=epoch == 1, best_acc1=float(epoch))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-3.pth", "checkpoint-best.pth",
                                                                    "checkpoint-last.pth"]  # 1 kept of epochs 1, 3
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3] and log[1]["train_loss"] == 0.5
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == 1 and best["best_acc1"] == 1.0 and best["nonfinite_skipped"] == 1
    assert best["args"] == cfg.flags() and best["teacher"] is None and best["scaler"] is None
    printed = capsys.readouterr().out
    assert "device cpu, world size 1, amp none" in printed and "training epochs 0 to 3" in printed
    assert "training time" in printed


def test_resume_restores_the_state_and_continues_at_the_next_epoch(tmp_path, capsys):
    cfg = pretrain_config(output_dir=str(tmp_path), epochs=3)
    first = state(skipped=2)
    with Run(cfg) as run:
        train(first)
        run.end_epoch(first, 0, {}, best_acc1=12.5)
    resumed = state()
    with Run(cfg) as run:  # auto-resume from the output folder's checkpoint-last.pth
        assert run.resume(resumed) == 1
        assert run.saved["best_acc1"] == 12.5 and run.saved["epoch"] == 0
    assert "continuing at epoch 1" in capsys.readouterr().out
    for a, b in zip(first.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.step.skipped == 2
    assert resumed.optimizer.state_dict()["state"][0]["step"] == first.optimizer.state_dict()["state"][0]["step"]

    weights_only = torch.nn.Linear(3, 2)
    with Run(pretrain_config(output_dir=str(tmp_path / "eval"), resume=str(tmp_path / "checkpoint-last.pth"))) as run:
        assert run.resume(None, weights_only, auto=False) == 0
    assert torch.equal(weights_only.weight, first.model.weight)
    with Run(pretrain_config(output_dir=str(tmp_path / "fresh"))) as run:
        assert run.resume(state()) == 0  # nothing to resume


def test_a_config_resolved_for_another_world_size_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="resolved for 2 processes, the run has 1"):
        with Run(pretrain_config(output_dir=str(tmp_path), world_size=2)):
            pass
