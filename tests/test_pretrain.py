"""main_pretrain.py end to end on a tiny ImageFolder (CPU, gloo)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engine_pretrain
import main_pretrain
from helpers import as_script, load, read_log, run_script as run, script_env, stop_with_signal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(image_folder):
    return image_folder("data", {"train": 8})


def pretrain_cmd(data_root, out, *extra, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return launcher + [
        str(ROOT / "main_pretrain.py"), "--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64",
        "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu",
        "--print_freq", "1", "--data_path", str(data_root), "--output_dir", str(out), *extra]


def test_pretrain_runs_logs_and_resumes(data_root, tmp_path):
    out = tmp_path / "run"
    proc = run(pretrain_cmd(data_root, out, "--vis_target", "ema", "--save_freq", "1", "--keep_last", "1"))
    assert "lr = blr 0.0006 x 4 images / 256 x (pred_ratio 1 / mask_ratio 0.6)" in proc.stdout
    speeds = [float(m) for m in re.findall(r" s/it  ([0-9.]+) images/s per process", proc.stdout)]
    assert speeds and all(speed > 0 for speed in speeds)
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) and r["train_loss_vis"] > 0 for r in log)
    from util.curves import plot_runs
    assert plot_runs([str(out)], str(tmp_path / "curves.png")) == ["loss", "learning rate", "EMA teacher momentum"]
    assert sorted(os.listdir(out)).count("checkpoint-1.pth") == 1 and not (out / "checkpoint-0.pth").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/loss_mask", "train/loss_vis", "train/lr", "train/momentum"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Images("masks_and_predictions")] == [1]  # --vis_freq 20: the last epoch
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and ckpt["teacher"] is not None and isinstance(ckpt["args"], dict)

    # Same command with more epochs, a deliberate change: resumes automatically from checkpoint-last.pth.
    proc = run(pretrain_cmd(data_root, out, "--vis_target", "ema", "--epochs", "3", "--allow_flag_changes", "epochs"))
    assert "continuing at epoch 2" in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]
    ckpt2 = load(out / "checkpoint-last.pth")
    assert ckpt2["epoch"] == 2
    assert not torch.equal(ckpt2["teacher"]["encoder.blocks3.0.attn.qkv.weight"],
                           ckpt["teacher"]["encoder.blocks3.0.attn.qkv.weight"])


@pytest.mark.parametrize("workers", ["0", "2"])
def test_killed_run_resumes_to_the_same_weights(data_root, tmp_path, workers):
    """With loader workers too: every crop is seeded from (seed, epoch, index), so new workers make the same ones."""
    args = ("--epochs", "3", "--seed", "3", "--num_workers", workers)
    run(pretrain_cmd(data_root, tmp_path / "straight", *args))

    out = tmp_path / "killed"
    env = script_env()
    proc = subprocess.Popen(pretrain_cmd(data_root, out, *args), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    run(pretrain_cmd(data_root, out, *args))

    a, b = load(tmp_path / "straight" / "checkpoint-last.pth"), load(out / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert read_log(tmp_path / "straight")[-1] == read_log(out)[-1]


def test_torchrun_two_processes_gloo(data_root, tmp_path):
    out = tmp_path / "ddp"
    # channels-last weights under DDP: the gradient buckets follow each parameter's layout
    proc = run(pretrain_cmd(data_root, out, "--epochs", "1", "--accum_iter", "2", "--batch_size", "2",
                            "--channels_last", torchrun=True))
    assert "world size 2" in proc.stdout and "Grad strides do not match" not in proc.stderr
    # 2 processes x 2 images x 2 accumulation steps = 8 unique images per optimizer step
    assert "x 8 images / 256" in proc.stdout
    log = read_log(out)
    assert len(log) == 1 and log[0]["train_steps"] == 2 and np.isfinite(log[0]["train_loss"])


def test_channels_last_flag_changes_the_layout_not_the_losses(data_root, tmp_path):
    logs = {}
    for flag in ("--no-channels_last", "--channels_last"):
        out = tmp_path / flag.strip("-")
        run(pretrain_cmd(data_root, out, "--epochs", "1", "--vis_target", "ema", flag))
        logs[flag] = read_log(out)[0]
        weight = load(out / "checkpoint-last.pth")["model"]["encoder.patch_embed1.proj.weight"]
        assert weight.is_contiguous(memory_format=torch.channels_last) == (flag == "--channels_last")
        assert not weight.is_contiguous() or flag != "--channels_last"
    for key in ("train_loss", "train_loss_mask", "train_loss_vis"):
        assert logs["--channels_last"][key] == pytest.approx(logs["--no-channels_last"][key], rel=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--mask_ratio", "1.2"], "--mask_ratio"),
    (["--num_views", "1", "--pred_ratio", "1.0"], "--pred_ratio"),
    (["--pred_ratio", "0.5"], "--pred_ratio"),
    (["--model", "dmjd_convit_tiny_patch16_dec1_hogg"], "did you mean dmjd_convit_tiny_patch16_dec1_hog"),
    (["--input_size", "72"], "divisible by the model's stride"),
    (["--input_size", "48"], "block"),
    (["--batch_size", "64"], "--batch_size"),
])
def test_bad_flags_fail_early_naming_the_flag(data_root, tmp_path, flags, message):
    proc = run(pretrain_cmd(data_root, tmp_path / "bad", *flags), check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "bad" / "checkpoint-last.pth").exists()


def test_missing_train_folder_is_named(tmp_path):
    proc = run(pretrain_cmd(tmp_path, tmp_path / "out"), check=False, timeout=120)
    assert proc.returncode != 0 and "no 'train/' folder" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--block_size", "0"], "--block_size must be >= 1"),
    (["--keep_last", "-1"], "--keep_last must be >= 0"),
    (["--skip_nonfinite", "-1"], "--skip_nonfinite must be >= 0"),
    (["--num_workers", "-2"], "--num_workers must be >= 0"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--blr", "-1"], "--blr must be > 0"),
    (["--clip_grad", "0"], "--clip_grad must be > 0"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda"),
    (["--resume", "no/such/checkpoint.pth"], "--resume 'no/such/checkpoint.pth' is not a file"),
    (["--mask_ratio", "0"], "--mask_ratio must be in (0, 1)"),
    (["--num_views", "0"], "--num_views must be >= 1"),
    (["--epochs", "2", "--warmup_epochs", "5"], "--warmup_epochs must be in [0, --epochs 2], got 5.0; give a shorter"),
    (["--theta", "-1"], "--theta must be >= 0"),
    (["--ema_momentum", "1.5"], "--ema_momentum must be in [0, 1]"),
    (["--min_crop_scale", "0"], "--min_crop_scale must be in (0, 1]"),
])
def test_validate_args_names_the_flag(flags, message):
    args = main_pretrain.get_args_parser().parse_args(flags)
    with pytest.raises(SystemExit, match=re.escape(message)):
        as_script(main_pretrain.validate_args, args)


@pytest.mark.parametrize("images, world_size, batch, accum, message", [
    (16, 8, 4, 1, "--batch_size 4 x 8 processes needs at least"),
    (16, 1, 4, 5, "--accum_iter 5 needs 5 batches of 4 per process in an epoch; 16 images over 1 processes give 4"),
    (16, 2, 4, 3, "--accum_iter 3 needs"),
])
def test_dataset_too_small_for_the_step_is_an_early_error(images, world_size, batch, accum, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        as_script(engine_pretrain.check_dataset_size, images, batch, accum, world_size, "data/train")
    engine_pretrain.check_dataset_size(images, batch, 1, 1, "data/train")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multinode_c10d_rendezvous_on_loopback(data_root, tmp_path):
    """The rendezvous that multi-node runs use (PRETRAIN.md), with one node of two processes."""
    out = tmp_path / "c10d"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_id=dmjd_test"]
    proc = run(launcher + pretrain_cmd(data_root, out, "--epochs", "1")[1:])
    assert "world size 2" in proc.stdout and "x 8 images / 256" in proc.stdout
    log = read_log(out)
    assert len(log) == 1 and log[0]["train_steps"] == 2 and log[0]["train_images"] == 16


DEFAULT_WORKERS = str(main_pretrain.get_args_parser().get_default("num_workers"))


def test_sigterm_mid_epoch_saves_that_step_and_the_rerun_equals_an_uninterrupted_run(data_root, tmp_path):
    """Preemption costs at most one step: SIGTERM to the whole process group (loader workers included, at the default
    worker count) ends the run after its current step with a checkpoint of it (exit status 75), and the same command
    continues mid-epoch bit for bit as if never stopped."""
    args = ("--epochs", "2", "--seed", "5", "--num_workers", DEFAULT_WORKERS)
    run(pretrain_cmd(data_root, tmp_path / "straight", *args))

    out = tmp_path / "stopped"
    env = script_env()
    rest = stop_with_signal(pretrain_cmd(data_root, out, *args), env, ROOT, "Epoch [0] [2/4]", signal.SIGTERM)
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["resume_at"]["epoch"] == 0 and 2 <= ckpt["resume_at"]["iteration"] < 4, ckpt["resume_at"]
    assert "received SIGTERM: stopping after the current step" in rest and "exiting with status 75" in rest

    proc = run(pretrain_cmd(data_root, out, *args))
    assert f"continuing at epoch 0, iteration {ckpt['resume_at']['iteration']}" in proc.stdout
    a, b = load(tmp_path / "straight" / "checkpoint-last.pth"), load(out / "checkpoint-last.pth")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert read_log(tmp_path / "straight") == read_log(out)  # both epochs' losses and counts, the stopped one too


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The output folder of an uninterrupted run of LAUNCHED_ARGS on 1 or 2 processes (plain python, torchrun)."""
    runs = {}

    def get(nproc):
        if nproc not in runs:
            runs[nproc] = tmp_path_factory.mktemp(f"uninterrupted{nproc}")
            run(pretrain_cmd(data_root, runs[nproc], *LAUNCHED_ARGS, torchrun=nproc == 2))
        return runs[nproc]
    return get


LAUNCHED_ARGS = ("--epochs", "2", "--seed", "3", "--batch_size", "2")


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_launcher_returns_the_requeue_status_when_the_job_is_signalled_and_the_rerun_is_exact(data_root, tmp_path,
                                                                                                  nproc, uninterrupted):
    """PRETRAIN.md's SLURM setup: `python -m training.launch` (torchrun's flags) under a SIGTERM to the whole job
    (launcher, training processes and loader workers; on one process, SIGUSR1 to the launcher alone, which passes it
    on): the stop checkpoint is written, the launcher exits 75, and the same command continues to the weights and
    log of an uninterrupted run."""
    launch = [sys.executable, "-m", "training.launch", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launch + pretrain_cmd(data_root, tmp_path, *LAUNCHED_ARGS, "--num_workers", "2")[1:]
    sig = signal.SIGTERM if nproc == 2 else signal.SIGUSR1
    rest = stop_with_signal(cmd, script_env(), ROOT, "Epoch [0] [2/", sig, group=nproc == 2)
    assert "exiting with status 75 (requeue)" in rest and "training.launch: the training processes stopped" in rest
    assert f"training.launch: received {sig.name}; passing it on" in rest
    ckpt = load(tmp_path / "checkpoint-last.pth")
    assert ckpt["resume_at"]["epoch"] == 0 and ckpt["resume_at"]["iteration"] >= 2, ckpt["resume_at"]

    proc = run(cmd)
    assert f"continuing at epoch 0, iteration {ckpt['resume_at']['iteration']}" in proc.stdout
    straight = uninterrupted(nproc)
    a, b = load(straight / "checkpoint-last.pth"), load(tmp_path / "checkpoint-last.pth")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert read_log(straight) == read_log(tmp_path)  # the stopped epoch's record too, summed over the processes


def test_torchrun_killed_by_sigusr1_leaves_no_rank_training_on(data_root, tmp_path):
    """Plain torchrun dies of SIGUSR1 (it has no handler for it); its training processes then get SIGTERM from the
    system (they asked for it at start) and stop with a checkpoint instead of training on as orphans."""
    out = tmp_path / "orphans"
    proc = subprocess.Popen(pretrain_cmd(data_root, out, "--epochs", "3", "--batch_size", "2", torchrun=True),
                            cwd=ROOT, env=script_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("Epoch [0] [2/"):
                os.kill(proc.pid, signal.SIGUSR1)  # the launcher alone
                break
        assert proc.wait(timeout=60) == -signal.SIGUSR1
        rest = proc.stdout.read()  # the training processes' output, until they exit (they share the pipe)
        assert "received SIGTERM: stopping after the current step" in rest, rest
        assert "exiting with status 75 (requeue)" in rest, rest
        ckpt, between = load(out / "checkpoint-last.pth"), re.search(r"stopping before epoch (\d+)", rest)
        # a stop checkpoint mid-epoch or, when the signal came as the epoch ended, the saved epoch before the stop
        assert "resume_at" in ckpt or (between and ckpt["epoch"] == int(between.group(1)) - 1), rest
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_stopped_rank_fails_the_run_within_the_timeout_naming_the_rank_and_the_collective(data_root, tmp_path):
    out = tmp_path / "hung"
    env = script_env()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(launcher + pretrain_cmd(data_root, out, "--epochs", "1", "--batch_size", "2",
                                                    "--dist_timeout", "0.1")[1:],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    stopped = None
    for line in proc.stdout:
        if line.startswith("Epoch [0] [1/4]") and stopped is None:
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
            stopped = int(workers.split()[-1])  # one of the two training processes
            os.kill(stopped, signal.SIGSTOP)
            start = time.time()
            break
    try:
        found = None
        for line in proc.stdout:  # the other process's error, before the launcher tears both down
            found = found or re.search(r"error: rank \d of 2: (.*) timed out after --dist_timeout 0.1 minutes", line)
            if found:
                break
        assert time.time() - start < 60  # 6 s of --dist_timeout, not the 30 minutes of before
        # the collective the survivor waits in: where SIGSTOP froze the other rank decides which of a step's it is (the
        # gradient all-reduce, the stop agreement, or at a step that prints its line the non-finite check)
        assert found and found.group(1).startswith(("DDP's gradient all-reduce of step",
                                                    "the agreement on stopping (once per optimizer step)",
                                                    "the non-finite check")), found
        reporting = int(re.search(r"error: rank (\d)", found.group(0)).group(1))
        assert f"rank {1 - reporting} did not arrive" in line, line  # the other one: the rank that stopped
    finally:
        os.kill(stopped, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher, and whatever it left
        except ProcessLookupError:
            pass


# The run with its disk full where the case says: the save's writes (torch.save), TensorBoard's close, log.txt's line.
FULL_DISK = """
import errno, runpy, sys
import torch
from torch.utils.tensorboard import SummaryWriter
import training.output as output
import training.run as run

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

def full_log(log, record):
    raise output.no_space_error(log, "the line is not written; the next start repairs the log")

case = sys.argv.pop(1).split(",")
sys.argv = sys.argv[1:]  # the script's own command line
if "save" in case:
    torch.save = full
if "tensorboard" in case:
    SummaryWriter.close = lambda self: full()
if "log" in case:
    output.append_line = run.append_line = full_log
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("case, named", [("save,tensorboard", "checkpoint-last.pth; the previous file is kept"),
                                         ("log,tensorboard", "log.txt; the line is not written")])
def test_a_full_disk_ends_the_run_with_the_error_named_and_never_hangs_with_loader_workers(data_root, tmp_path, case,
                                                                                          named):
    """With loader workers (which ignore SIGTERM, so that a job's stop does not kill them): a failing save, log line
    and TensorBoard close, together, end the process naming the first error, within the timeout (before: a save and
    a close failing together hung forever at exit, multiprocessing waiting on the workers)."""
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    cmd = pretrain_cmd(data_root, tmp_path / "run", "--epochs", "1", "--num_workers", "2")
    proc = run([cmd[0], str(tmp_path / "full_disk.py"), case, *cmd[1:]], check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^error: no space left on the device of .* while writing .*" + re.escape(named), proc.stderr,
                     re.M), proc.stderr
    assert "Traceback" not in proc.stderr
