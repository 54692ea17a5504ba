"""SLURM launch through submitit: flags, distributed environment, and requeue from the real last checkpoint."""
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch
from PIL import Image

import main_pretrain
from training.submitit_launch import Trainer, distributed_env, executor_parameters, launch, parse_args


def test_launcher_and_training_flags_are_split():
    opts, args = parse_args(main_pretrain, "test", [
        "--nodes", "2", "--ngpus", "4", "--partition", "learn", "--use_volta32", "--comment", "icml",
        "--job_dir", "/shared/jobs/%j", "--batch_size", "32", "--num_views", "3", "--mask_ratio", "0.3"])
    assert (opts.nodes, opts.ngpus, opts.partition, opts.comment) == (2, 4, "learn", "icml")
    assert args.batch_size == 32 and args.num_views == 3 and args.output_dir == "/shared/jobs/%j"  # as MAE
    assert args.pred_ratio == pytest.approx(0.9)  # validated (and completed) at submission
    params = executor_parameters(opts, args)
    assert params["nodes"] == 2 and params["tasks_per_node"] == params["gpus_per_node"] == 4
    assert params["slurm_partition"] == "learn" and params["slurm_constraint"] == "volta32gb"
    assert params["slurm_comment"] == "icml"

    opts, args = parse_args(main_pretrain, "test", ["--output_dir", "/shared/out/run1", "--device", "cpu"])
    assert opts.job_dir == os.path.join("/shared/out/run1", "submitit")
    assert executor_parameters(opts, args)["gpus_per_node"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "8"], "give --output_dir"),
    (["--output_dir", "o", "--mask_ratio", "1.5"], "--mask_ratio"),
    (["--output_dir", "o", "--ngpus", "0"], "--ngpus"),
])
def test_bad_flags_fail_at_submission(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(main_pretrain, "test", argv)


def test_distributed_env_follows_the_job():
    job_env = SimpleNamespace(job_id="4242", global_rank=5, local_rank=1, num_tasks=16, hostnames=["node7", "node8"])
    env = distributed_env(job_env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == \
        {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "node7"}
    assert 20000 <= int(env["MASTER_PORT"]) < 40000
    assert distributed_env(SimpleNamespace(**{**vars(job_env), "global_rank": 0}))["MASTER_PORT"] == env["MASTER_PORT"]


def test_checkpoint_resubmits_with_the_real_last_checkpoint(tmp_path):
    args = main_pretrain.get_args_parser().parse_args(["--output_dir", str(tmp_path), "--resume", ""])
    trainer = Trainer("main_pretrain", args)
    assert trainer.checkpoint().function.args.resume == ""  # nothing saved yet: starts over (or auto-resumes)

    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    resubmitted = delayed.function
    assert isinstance(resubmitted, Trainer) and resubmitted.module_name == "main_pretrain"
    assert resubmitted.args.resume == str(tmp_path / "checkpoint-last.pth") and args.resume == ""


def test_finetune_launcher_uses_the_same_convention(tmp_path):
    import main_finetune
    pre = tmp_path / "pre.pth"
    with pytest.raises(SystemExit, match="--finetune .*pre.pth' is neither a checkpoint file"):  # before queueing
        parse_args(main_finetune, "test", ["--job_dir", str(tmp_path), "--finetune", str(pre)])
    pre.write_bytes(b"")
    opts, args = parse_args(main_finetune, "test", ["--job_dir", str(tmp_path), "--finetune", str(pre),
                                                    "--nodes", "4"])
    assert opts.nodes == 4 and args.finetune == str(pre) and args.output_dir == str(tmp_path)
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    resubmitted = Trainer("main_finetune", args).checkpoint().function
    assert resubmitted.module_name == "main_finetune"
    assert resubmitted.args.resume == str(tmp_path / "checkpoint-last.pth")


def _children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux /proc children to find the job's task")
def test_preempted_local_job_is_requeued_and_resumes(tmp_path, monkeypatch):
    data = tmp_path / "data" / "train" / "a"
    data.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (72, 72), (30 * i, 100, 200 - 20 * i)).save(data / f"{i}.png")
    out = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # launch() prepends the repository
    job = launch("main_pretrain", "test", [
        "--cluster", "local", "--ngpus", "1", "--timeout", "60", "--job_dir", str(tmp_path / "jobs"),
        "--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64", "--batch_size", "4", "--epochs", "10",
        "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu", "--print_freq", "1",
        "--data_path", str(tmp_path / "data"), "--output_dir", str(out)])
    last = out / "checkpoint-last.pth"
    deadline = time.time() + 120
    while not last.exists() and job.state == "RUNNING" and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), job.stderr()
    (task,) = _children(job._process.pid)
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before preemption or the time limit (as job._interrupt would)
    job.result()

    stdout = job.stdout()
    assert f"requeuing main_pretrain: resume from {last}" in stdout
    assert f"resumed from {last}: continuing at epoch" in stdout
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 9


def test_any_script_of_the_checkout_launches_by_its_file_name(monkeypatch):
    """`python -m training.submitit_launch [launcher flags] main_<task>.py [its flags]` (main_transfer.py's SLURM
    launcher): the launcher's flags before the script, the script's after it."""
    from training import submitit_launch
    launched = []
    monkeypatch.setattr(submitit_launch, "launch", lambda *args: launched.append(args))
    submitit_launch.main(["--ngpus", "2", "--job_dir", "jobs", "main_segment.py", "--iters", "3"])
    assert launched == [("main_segment", "Submitit for main_segment.py", ["--ngpus", "2", "--job_dir", "jobs",
                                                                          "--iters", "3"])]
    for argv in (["--ngpus", "2"], ["no_such_script.py"], ["tests/test_submitit.py"]):
        with pytest.raises(SystemExit, match="give a training script of the repository's root"):
            submitit_launch.main(argv)
