"""training.run.Run: the run skeleton's files, resume and lifecycle, in one process on the CPU."""
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from helpers import as_script, pretrain_config
from training.errors import RunError
from training.run import Run, CheckpointState
from training.step import TrainStep
from dmjd_encoders.checkpoint import load_checkpoint


def enter_and_leave(cfg):
    with Run(cfg):
        pass


def state(lr=0.1, skipped=0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return CheckpointState(model, optimizer, TrainStep(model, optimizer, lambda p: lr, skipped=skipped))


def train(s: CheckpointState, steps=2):
    for index in range(steps):
        s.step(lambda: s.model(torch.ones(4, 3)).pow(2).mean(), 0.0, index)


def test_epochs_write_last_periodic_and_best_checkpoints_and_log_lines(tmp_path, capsys):
    cfg = pretrain_config(output_dir=str(tmp_path / "out"), epochs=4)
    s = state(skipped=1)
    with Run(cfg, save_freq=2, keep_last=1) as run:
        assert run.world_size == 1 and run.is_main and run.writer is not None
        for epoch in run.rounds(0, cfg.epochs):
            train(s)
            run.end_round(s, epoch, {"train_loss": 1.0 / (epoch + 1)}, best=epoch == 1, best_acc1=float(epoch))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-3.pth", "checkpoint-best.pth",
                                                                    "checkpoint-last.pth"]  # 1 kept of epochs 1, 3
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3] and log[1]["train_loss"] == 0.5
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == 1 and best["best_acc1"] == 1.0 and best["nonfinite_skipped"] == 1
    assert best["args"] == cfg.flags() and best.get("teacher") is None and best["scaler"] is None
    printed = capsys.readouterr().out
    assert "device cpu, world size 1, amp none" in printed and "training epochs 0 to 3" in printed
    assert "training time" in printed


def test_resume_restores_the_state_and_continues_at_the_next_epoch(tmp_path, capsys):
    cfg = pretrain_config(output_dir=str(tmp_path), epochs=3)
    first = state(skipped=2)
    with Run(cfg) as run:
        train(first)
        run.end_round(first, 0, {}, best_acc1=12.5)
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


# ---------------------------------------------------------------------------------------------------------------------
# What never goes wrong in silence: resume precedence and fallback, changed flags, signals, crash windows, the lock.

def finished_epochs(cfg, epochs, save_freq=None, lr=0.1):
    """A run of `epochs` epochs in cfg.output_dir; returns its state."""
    s = state(lr=lr)
    with Run(cfg, save_freq=save_freq) as run:
        for epoch in range(epochs):
            train(s)
            run.end_round(s, epoch, {"train_loss": float(epoch)})
    return s


def test_an_older_resume_never_wins_over_the_folders_newer_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    finished_epochs(pretrain_config(output_dir=str(out), epochs=6), 4, save_freq=2)  # periodic 1 and 3, last 3
    cfg = pretrain_config(output_dir=str(out), epochs=6, resume=str(out / "checkpoint-1.pth"))
    with Run(cfg, save_freq=2, keep_last=2) as run:
        assert run.resume(state()) == 4
    printed = capsys.readouterr().out
    assert f"--resume {out / 'checkpoint-1.pth'} is older than {out / 'checkpoint-last.pth'}: resuming from the " \
           "newer one" in printed
    assert (out / "checkpoint-3.pth").exists()  # nothing newer was pruned


def damage(path, data: bytes) -> None:
    """`path` with the bytes `data`, as a file of its own: damage written in place would reach every hard link of the
    file (an epoch's periodic checkpoint is checkpoint-last.pth's file under a second name)."""
    path.unlink()
    path.write_bytes(data)


def test_auto_resume_falls_back_over_damaged_files_naming_each(tmp_path, capsys):
    out = tmp_path / "out"
    good = finished_epochs(pretrain_config(output_dir=str(out), epochs=6), 4, save_freq=2)
    last = out / "checkpoint-last.pth"
    damage(last, last.read_bytes()[:1000])  # truncated, as by a node crash before the data reached the disk
    data = bytearray((out / "checkpoint-3.pth").read_bytes())
    weight = good.model.weight.detach().numpy().tobytes()
    at = bytes(data).index(weight)  # a bit flipped inside the saved weights
    data[at + 5] ^= 0x10
    damage(out / "checkpoint-3.pth", data)
    (out / ".checkpoint-last.pth.tmp4242").write_bytes(b"half a checkpoint")
    resumed = state()
    with Run(pretrain_config(output_dir=str(out), epochs=6)) as run:
        assert run.resume(resumed) == 2  # checkpoint-1.pth, the newest good one
    printed = capsys.readouterr().out
    assert "removed 1 temporary files of interrupted saves: .checkpoint-last.pth.tmp4242" in printed
    assert f"skipping {last}: {last} cannot be read as a checkpoint" in printed
    assert f"skipping {out / 'checkpoint-3.pth'}: {out / 'checkpoint-3.pth'} is damaged: its content does not " \
           f"match the checksum" in printed
    assert not (out / ".checkpoint-last.pth.tmp4242").exists()


def test_an_unreadable_explicit_resume_stops_the_run_naming_it(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with Run(pretrain_config(output_dir=str(tmp_path / "out"), resume=str(bad))) as run:
        with pytest.raises(SystemExit, match=rf"--resume {bad} cannot be read as a checkpoint") as stop:
            as_script(run.resume, state())
    assert "weights_only=False" not in str(stop.value)


def test_changed_flags_that_define_the_run_stop_it_naming_each(tmp_path):
    out = str(tmp_path)
    finished_epochs(pretrain_config(output_dir=out, epochs=6), 1)
    changed = pretrain_config(output_dir=out, epochs=8, batch_size=32, num_views=3, lr=0.5)
    with Run(changed) as run:
        with pytest.raises(SystemExit) as stop:
            as_script(run.resume, state())
    message = str(stop.value)
    for shown in ("--epochs: saved 6, given 8", "--batch_size: saved 64, given 32", "--num_views: saved 2, given 3",
                  "--lr: saved 0.001, given 0.5", "--allow_flag_changes batch_size,epochs,lr,num_views"):
        assert shown in message
    allowed = pretrain_config(output_dir=out, epochs=8, allow_flag_changes="epochs")
    with Run(allowed) as run:
        assert run.resume(state()) == 1


def test_a_stop_signal_ends_the_epoch_at_a_step_with_a_checkpoint_to_continue_from(tmp_path, capsys):
    import os
    import signal

    cfg = pretrain_config(output_dir=str(tmp_path), epochs=2, accum_iter=2)
    s = state()

    def stopped_run():
        with Run(cfg) as run:
            for epoch in run.rounds(0, cfg.epochs):
                progress = run.progress(epoch, 8)
                for it, _ in progress.track(range(8)):
                    if it == 2:
                        os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-window: the window finishes first
                    progress.losses.add(torch.tensor([1.0]), 1)
                run.stop_if_requested(s, epoch, progress)  # raises Preempted, which a script's main exits 75 with

    with pytest.raises(SystemExit) as stop:
        as_script(stopped_run)
    assert stop.value.code == 75
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["resume_at"] == {"epoch": 0, "iteration": 4} and ckpt["epoch"] == -1
    assert ckpt["progress"]["losses"]["count"] == 4
    assert "received SIGUSR1: stopping after the current step" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone with the run

    with Run(cfg) as run:
        assert run.resume(state()) == 0
        for epoch in run.rounds(0, cfg.epochs):
            progress = run.progress(epoch, 8)
            assert progress.first == (4 if epoch == 0 else 0)
            assert progress.losses.count == (4 if epoch == 0 else 0)
            break
    assert "continuing at epoch 0, iteration 4" in capsys.readouterr().out


def test_a_stop_signal_between_rounds_stops_before_the_next_round_with_the_saved_one_kept(tmp_path, capsys):
    import signal

    cfg = pretrain_config(output_dir=str(tmp_path), epochs=3)
    s, trained = state(), []

    def stopped_run():
        with Run(cfg) as run:
            for epoch in run.rounds(0, cfg.epochs):
                progress = run.progress(epoch, 1)  # one step a round: no step of a round checks after the first
                for it, _ in progress.track(range(1)):
                    train(s, steps=1)
                    progress.losses.add(torch.tensor([1.0]), 1)
                trained.append(epoch)
                run.stop_if_requested(s, epoch, progress)
                os.kill(os.getpid(), signal.SIGTERM)  # as if it came during the round's evaluation or saves
                run.end_round(s, epoch, {"train_loss": 1.0})

    with pytest.raises(SystemExit) as stop:
        as_script(stopped_run)
    assert stop.value.code == 75 and trained == [0]  # epoch 1 never began
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and "resume_at" not in ckpt
    assert f"stopping before epoch 1: {tmp_path / 'checkpoint-last.pth'} holds epochs 0 to 0" in capsys.readouterr().out
    with Run(cfg) as run:
        assert run.resume(state()) == 1


def end_of_epoch_1_killed(cfg, monkeypatch, save_freq, saves, **extra) -> CheckpointState:
    """Epoch 0, then epoch 1 whose end is killed after its first `saves` checkpoint files (never its log line);
    returns the state."""
    import training.output as output_module
    from dmjd_encoders.checkpoint import link_checkpoint as real_link
    s = state()
    with Run(cfg, save_freq=save_freq) as run:
        train(s)
        run.end_round(s, 0, {"train_loss": 0.5})
        real_save, saved = output_module.save_checkpoint, []

        def crash_in_window(path):
            saved.append(path)
            if len(saved) == saves:
                raise KeyboardInterrupt("killed")

        def crashing_save(ckpt, path):
            real_save(ckpt, path)
            crash_in_window(path)

        def crashing_link(source, path):
            real_link(source, path)
            crash_in_window(path)

        def crashing_log(log, record):
            raise KeyboardInterrupt("killed")

        monkeypatch.setattr(output_module, "save_checkpoint", crashing_save)
        monkeypatch.setattr(output_module, "link_checkpoint", crashing_link)
        monkeypatch.setattr(output_module, "append_line", crashing_log)
        train(s)
        with pytest.raises(KeyboardInterrupt):
            run.end_round(s, 1, {"train_loss": 0.25}, **extra)
    monkeypatch.undo()
    return s


@pytest.mark.parametrize("window", ["after_last", "after_periodic", "after_best"])
def test_a_crash_between_an_epochs_files_is_completed_at_the_next_start(tmp_path, monkeypatch, window):
    out = tmp_path / "out"
    cfg = pretrain_config(output_dir=str(out), epochs=4)
    saves = ["after_last", "after_periodic", "after_best"].index(window) + 1
    end_of_epoch_1_killed(cfg, monkeypatch, 2, saves, best=True, best_acc1=50.0)
    with Run(cfg, save_freq=2):
        pass  # the start completes the epoch's files
    for name in ("checkpoint-1.pth", "checkpoint-best.pth"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["epoch"] == 1 and ckpt["best_acc1"] == 50.0, name
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and lines[1]["train_loss"] == 0.25


def test_an_epochs_periodic_and_best_checkpoints_are_links_to_its_last_not_copies(tmp_path):
    out = tmp_path / "out"
    cfg = pretrain_config(output_dir=str(out), epochs=4)
    s = state()
    with Run(cfg, save_freq=2) as run:
        for epoch in range(2):
            train(s)
            run.end_round(s, epoch, {"train_loss": 0.5}, best=epoch == 1)
        last, periodic, best = (out / f"checkpoint-{name}.pth" for name in ("last", 1, "best"))
        assert last.samefile(periodic) and last.samefile(best) and last.stat().st_nlink == 3  # one copy on disk
        saved = periodic.read_bytes()
        train(s)
        run.end_round(s, 2, {"train_loss": 0.25})  # replaces checkpoint-last.pth, never writes into the old file
    assert not last.samefile(periodic) and periodic.read_bytes() == saved
    assert torch.load(last, weights_only=True)["epoch"] == 2
    periodic.unlink()  # deleting one name leaves the other whole
    best_ckpt = torch.load(best, weights_only=True)
    assert best_ckpt["epoch"] == 1 and load_checkpoint(str(best))["epoch"] == 1  # its checksum still matches


def test_without_hard_links_an_epochs_checkpoints_are_copies(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out"
    s = state()
    with Run(pretrain_config(output_dir=str(out), epochs=2), save_freq=1) as run:
        train(s)
        run.end_round(s, 0, {"train_loss": 0.5}, best=True)
    last = out / "checkpoint-last.pth"
    for name in ("checkpoint-0.pth", "checkpoint-best.pth"):
        assert not last.samefile(out / name) and (out / name).read_bytes() == last.read_bytes(), name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint")) == []  # no temporary left


def test_completing_an_epochs_files_links_them_to_its_last_checkpoint(tmp_path, monkeypatch):
    import training.output as output_module
    out = tmp_path / "out"
    cfg = pretrain_config(output_dir=str(out), epochs=4)
    s = state()
    with Run(cfg, save_freq=1) as run:
        train(s)
        monkeypatch.setattr(output_module, "link_checkpoint", lambda source, path: None)  # a crash before the link
        run.end_round(s, 0, {"train_loss": 0.5}, best=True)
    monkeypatch.undo()
    assert not (out / "checkpoint-0.pth").exists()
    with Run(cfg, save_freq=1):
        pass
    for name in ("checkpoint-0.pth", "checkpoint-best.pth"):
        assert (out / "checkpoint-last.pth").samefile(out / name), name


def test_a_live_run_holds_the_output_folder_and_a_dead_ones_lock_does_not_count(tmp_path):
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); f.write('pid 12345 on elsewhere');"
        " f.flush(); print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        with pytest.raises(SystemExit, match=r"--output_dir .* is in use by a live run \(pid 12345 on elsewhere"):
            as_script(enter_and_leave, pretrain_config(output_dir=str(out)))
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with Run(pretrain_config(output_dir=str(out))):  # the holder died: its lock is gone
        pass


def test_a_full_disk_names_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    from dmjd_encoders.checkpoint import save_checkpoint
    save_checkpoint({"epoch": 1}, str(tmp_path / "c.pth"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=rf"no space left on the device of {tmp_path} \(\d+ MiB free\) while writing "
                                      rf"{tmp_path / 'c.pth'}; the previous file is kept"):
        save_checkpoint({"epoch": 2}, str(tmp_path / "c.pth"))
    monkeypatch.undo()
    assert torch.load(tmp_path / "c.pth", weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary file left


def test_saves_reach_the_disk_before_they_replace_the_old_file(tmp_path, monkeypatch):
    import os

    from dmjd_encoders.checkpoint import save_checkpoint
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    save_checkpoint({"epoch": 1}, str(tmp_path / "c.pth"))
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder that holds it


# ---------------------------------------------------------------------------------------------------------------------
# Failures as a cluster delivers them (docs/RELIABILITY.md, 17 to 22).

def stopped_progress(run, epoch, iters=4, at=2):
    """A Progress of `iters` iterations that a stop signal ends after iteration `at`."""
    import os
    import signal
    progress = run.progress(epoch, iters)
    for it, _ in progress.track(range(iters)):
        if it == at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        progress.losses.add(torch.tensor([1.0]), 1)
    assert progress.stopped
    return progress


def nan_step(s: CheckpointState):
    """A step whose loss is NaN: the weights become NaN too, and nothing reads the loss back."""
    s.step(lambda: s.model(torch.full((4, 3), float("nan"))).pow(2).mean(), 0.0, 99)


def test_a_stop_after_a_nonfinite_loss_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    cfg = pretrain_config(output_dir=str(out), epochs=3)
    s = state()
    with Run(cfg) as run:
        train(s)
        run.end_round(s, 0, {"train_loss": 0.5})
        before = (out / "checkpoint-last.pth").read_bytes()
        nan_step(s)
        assert not torch.isfinite(s.model.weight).all()
        with pytest.raises(SystemExit, match=r"non-finite loss at step 99.*the last good checkpoint is kept.*found "
                                             r"when stopping on a signal: nothing was saved") as stop:
            as_script(run.stop_if_requested, s, 1, stopped_progress(run, 1))
    assert stop.value.code != 75  # not a requeue: the resumed run would meet the same loss
    assert (out / "checkpoint-last.pth").read_bytes() == before


def test_no_save_writes_nonfinite_weights_or_optimizer_state_over_a_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    s = state()
    with Run(pretrain_config(output_dir=str(out), epochs=3)) as run:
        train(s)
        run.end_round(s, 0, {"train_loss": 0.5})
        before = (out / "checkpoint-last.pth").read_bytes()
        with torch.no_grad():
            s.model.bias[0] = float("inf")
        with pytest.raises(SystemExit, match=rf"not saving {out / 'checkpoint-last.pth'}: 1 tensors of the model or "
                                             r"optimizer state are non-finite \(model.bias\); the last good checkpoint "
                                             r"is kept"):
            as_script(run.end_round, s, 1, {"train_loss": 0.25})
        with torch.no_grad():
            s.model.bias[0] = 0.0
        moment = next(iter(s.optimizer.state.values()))["exp_avg"]
        moment.fill_(float("nan"))
        with pytest.raises(SystemExit, match=r"optimizer.state.0.exp_avg"):  # the stop save makes the same check
            as_script(run.stop_if_requested, s, 1, stopped_progress(run, 1))
    assert (out / "checkpoint-last.pth").read_bytes() == before
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]


def damage_every_checkpoint(out, weights: torch.Tensor):
    """checkpoint-last.pth truncated, a flipped bit in checkpoint-1.pth's `weights`, checkpoint-0.pth random bytes."""
    last = out / "checkpoint-last.pth"
    damage(last, last.read_bytes()[:700])
    data = bytearray((out / "checkpoint-1.pth").read_bytes())
    data[bytes(data).index(weights.detach().numpy().tobytes()) + 2] ^= 0x40
    damage(out / "checkpoint-1.pth", data)
    damage(out / "checkpoint-0.pth", bytes(range(256)) * 4)


def folder_snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_whose_checkpoints_are_all_damaged_stops_naming_each_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    s = finished_epochs(pretrain_config(output_dir=str(out), epochs=4), 2, save_freq=1)
    damage_every_checkpoint(out, s.model.weight)
    (out / ".checkpoint-last.pth.tmp4242").write_bytes(b"half a checkpoint")
    before = folder_snapshot(out)
    with pytest.raises(SystemExit) as stop:
        as_script(enter_and_leave, pretrain_config(output_dir=str(out), epochs=4))
    message = str(stop.value)
    assert message.startswith(f"error: every checkpoint in --output_dir {out} is damaged")
    assert f"{out / 'checkpoint-last.pth'} cannot be read as a checkpoint" in message
    assert f"{out / 'checkpoint-1.pth'} is damaged: its content does not match the checksum" in message
    assert f"{out / 'checkpoint-0.pth'} cannot be read as a checkpoint: it is not a PyTorch checkpoint" in message
    assert "Nothing was changed" in message and "--start_over" in message
    after = folder_snapshot(out)
    assert after.keys() - {Path(".lock")} == before.keys() - {Path(".lock")}  # no TensorBoard file, nothing removed
    assert all(after[name] == data for name, data in before.items() if name.name != ".lock")

    with Run(pretrain_config(output_dir=str(out), epochs=4, start_over=True)) as run:  # deliberately
        assert run.resume(state()) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("set-aside-")]
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-0.pth", "checkpoint-1.pth",
                                                          "checkpoint-last.pth", "log.txt"]
    assert not (out / "log.txt").exists() and not list(out.glob("checkpoint-*.pth"))


def test_start_over_is_refused_while_a_checkpoint_loads(tmp_path):
    out = tmp_path / "out"
    finished_epochs(pretrain_config(output_dir=str(out), epochs=4), 1)
    with pytest.raises(SystemExit, match=rf"--start_over, but {out / 'checkpoint-last.pth'} loads"):
        as_script(enter_and_leave, pretrain_config(output_dir=str(out), epochs=4, start_over=True))


def test_completing_an_epochs_files_never_copies_a_damaged_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    cfg = pretrain_config(output_dir=str(out), epochs=4)
    s = end_of_epoch_1_killed(cfg, monkeypatch, 1, 1)  # checkpoint-1.pth and the log line are due
    last = out / "checkpoint-last.pth"
    data = bytearray(last.read_bytes())
    at = bytes(data).index(s.model.weight.detach().numpy().tobytes())
    data[at + 3] ^= 0x08  # a flipped bit in the weights: the file still opens, memory-mapped
    damage(last, data)
    with Run(cfg, save_freq=1) as run:
        assert run.resume(state()) == 1  # from checkpoint-0.pth
    assert not (out / "checkpoint-1.pth").exists()
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    assert f"not completing the files of epoch 1: {last} is damaged" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_torn_log_line_is_named_kept_in_a_copy_and_the_run_continues(tmp_path, capsys, where):
    out = tmp_path / "out"
    cfg = pretrain_config(output_dir=str(out), epochs=4)
    finished_epochs(cfg, 3)
    log = out / "log.txt"
    lines = log.read_text().splitlines(keepends=True)
    if where == "last":  # the last append was cut short (ENOSPC): a torn line with no newline
        original = "".join(lines[:2]) + lines[2][:17]
    else:  # garbage in the middle
        original = lines[0] + '{"epoch": 1, "train_lo\x00\x00\n' + lines[2]
    log.write_text(original)
    with Run(cfg) as run:
        assert run.resume(state()) == 3
    printed = capsys.readouterr().out
    assert f"{log}: line {3 if where == 'last' else 2} is not a JSON record" in printed
    copies = list(out.glob("log.txt.*.orig"))
    assert len(copies) == 1 and copies[0].read_text() == original and f"kept as {copies[0]}" in printed
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == [0, 1, 2] if where == "last" else epochs == [0, 2]  # the last epoch's line completed from its
    # checkpoint (checkpoint-last.pth says which line its epoch has); a middle line is gone, its copy kept


@pytest.mark.parametrize("line", ['{"epoch": "three", "train_loss": 1.0}', '[1, 2]', '{"epoch": 1, "iteration": 2.5}',
                                  '{"epoch": true}'])
def test_a_log_line_of_another_shape_is_set_aside_as_a_torn_one_is(tmp_path, capsys, line):
    """A hand-edited line (a string where the round is, a list): before, every later start failed comparing rounds
    (`'<' not supported between instances of 'str' and 'int'`)."""
    out = tmp_path / "out"
    cfg = pretrain_config(output_dir=str(out), epochs=4)
    finished_epochs(cfg, 2)
    log = out / "log.txt"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + line + "\n" + lines[1])
    with Run(cfg) as run:
        assert run.resume(state()) == 2
    printed = capsys.readouterr().out
    assert f"{log}: line 2 is not a record of the run (an object whose epoch and iteration are integers" in printed
    assert [json.loads(kept)["epoch"] for kept in log.read_text().splitlines()] == [0, 1]
    assert len(list(out.glob("log.txt.*.orig"))) == 1


@pytest.mark.parametrize("name", ["log.txt", ".lock", "checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-3.pth"])
def test_a_folder_where_the_run_writes_a_file_stops_it_at_start_naming_it(tmp_path, name):
    """Before: a log.txt or .lock folder gave an IsADirectoryError traceback, and a checkpoint-last.pth folder was
    skipped without a word, the run training a whole round before its save failed on the rename."""
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    with pytest.raises(RunError, match=re.escape(f"{out / name} is a folder: the run writes a file of that name in "
                                                 f"--output_dir {out}; move it away")):
        enter_and_leave(pretrain_config(output_dir=str(out)))
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written


def test_allowing_a_model_change_on_resume_is_a_clear_error(tmp_path):
    out = str(tmp_path)
    finished_epochs(pretrain_config(output_dir=out, epochs=4), 1)
    other = CheckpointState(*(lambda m: (m, torch.optim.AdamW(m.parameters()), None))(torch.nn.Linear(3, 5)))
    changed = pretrain_config(output_dir=out, epochs=4, model="dmjd_convit_small_patch16_dec8_hog",
                              allow_flag_changes="model")
    with Run(changed) as run:
        with pytest.raises(SystemExit) as stop:
            as_script(run.resume, other)
    message = str(stop.value)
    assert message.startswith(f"error: {tmp_path / 'checkpoint-last.pth'} holds the weights of --model "
                              "dmjd_convit_tiny_patch16_dec1_hog, which do not load into this run's --model "
                              "dmjd_convit_small_patch16_dec8_hog")
    assert ("Resume with --model dmjd_convit_tiny_patch16_dec1_hog, or train dmjd_convit_small_patch16_dec8_hog in "
            "another --output_dir") in message


def test_a_full_disk_while_writing_the_log_or_tensorboard_names_the_file_or_folder(tmp_path, monkeypatch):
    import builtins
    import errno

    from training.output import NamedWriter as _NamedWriter, append_line as _append_line
    real_open = builtins.open

    def full_open(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OSError, match=rf"no space left on the device of {tmp_path} \(\d+ MiB free\) while writing "
                                      rf"{tmp_path / 'log.txt'}; the line is not written"):
        _append_line(str(tmp_path / "log.txt"), {"epoch": 0})
    monkeypatch.undo()

    writer = _NamedWriter(str(tmp_path / "tb"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer._writer, "add_scalar", full)
    with pytest.raises(OSError, match=rf"no space left on the device of {tmp_path / 'tb'} .* TensorBoard's event "
                                      r"file is not written"):
        writer.add_scalar("train/loss", 1.0, 0)
    writer.close()


# ---------------------------------------------------------------------------------------------------------------------
# Another script's checkpoint: named as such, before any flag is compared or weight loaded.

SCRIPT_TASKS = {"main_pretrain": "pre-training", "main_finetune": "fine-tuning", "main_linprobe": "linear-probing",
                "main_segment": "segmentation", "main_detect": "detection"}


def script_config(script: str, out, *argv: str):
    """The resolved run config of `script` (a key of SCRIPT_TASKS) for one process on the CPU, writing to `out`."""
    import importlib
    flags = ["--input_size", "64", "--device", "cpu", "--output_dir", str(out), *argv]
    if script == "main_pretrain":
        return pretrain_config(output_dir=str(out), **{name[2:]: value for name, value in zip(argv[::2], argv[1::2])})
    module = importlib.import_module(script)
    args = module.get_args_parser().parse_args(["--model", "convvit_tiny_patch16", *flags])
    if script in ("main_segment", "main_detect"):
        return importlib.import_module(script.replace("main_", "engine_")).resolve_config(args,
                                                                                           module.get_args_parser())[0]
    from training.classification import resolve_classification
    engine = importlib.import_module(script.replace("main_", "engine_"))
    config = engine.FinetuneConfig if script == "main_finetune" else engine.LinprobeConfig
    resolved = {} if script == "main_finetune" else {"probe_features": "pool_then_fresh_norm"}
    return resolve_classification(config, module.get_args_parser(), args, **resolved)[0]


@pytest.mark.parametrize("saved_by, started_by", [(a, b) for a in SCRIPT_TASKS for b in SCRIPT_TASKS if a != b])
def test_another_scripts_checkpoint_is_named_with_its_script_on_resume_evaluation_and_any_allowed_change(
        tmp_path, saved_by, started_by):
    from dmjd_encoders.checkpoint import save_checkpoint
    path = str(tmp_path / "other.pth")
    save_checkpoint({"model": {}, "args": script_config(saved_by, tmp_path / "saved").flags(), "epoch": 0}, path)
    named = (f"{path} is a {SCRIPT_TASKS[saved_by]} checkpoint, from {saved_by}.py, not a {SCRIPT_TASKS[started_by]} "
             f"one: ")
    resume_it = f"resume it with {saved_by}.py" + (f", or start from its encoder with --finetune {path}"
                                                  if saved_by == "main_pretrain" else "")
    for allowed in ("", "all"):  # the flags it would have blamed, allowed to change, or not
        with Run(script_config(started_by, tmp_path / f"resume{allowed}", "--allow_flag_changes", allowed,
                               "--resume", path)) as run:
            for where in (run.resume_path, lambda: run.resume(state())):  # before the model is built, and at load
                with pytest.raises(RunError) as stop:
                    where()
                assert str(stop.value) == named + resume_it
    folder = tmp_path / "folder"  # the output folder holds the other script's run
    folder.mkdir()
    (folder / "checkpoint-last.pth").write_bytes(Path(path).read_bytes())
    with Run(script_config(started_by, folder)) as run:
        with pytest.raises(RunError) as stop:
            run.resume(state())
    assert str(stop.value) == (named.replace(path, str(folder / "checkpoint-last.pth")) +
                               resume_it.replace(path, str(folder / "checkpoint-last.pth")) +
                               f" (--output_dir {folder} holds that run: give this one another --output_dir)")
    if started_by == "main_pretrain":
        return  # pre-training evaluates nothing
    with Run(script_config(started_by, tmp_path / "eval", "--eval", "--resume", path)) as run:
        with pytest.raises(RunError) as stop:
            run.resume(None, torch.nn.Linear(3, 2), auto=False)
    assert str(stop.value) == named + (f"start from its encoder with --finetune {path}" if saved_by == "main_pretrain"
                                       else f"evaluate it with {saved_by}.py --eval --resume {path}")
