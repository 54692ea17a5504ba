"""What the documentation promises about the repository: the outputs of its commands stay out of git."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
OUTPUT_FLAGS = r"--(?:output_dir|output|out|root)"


def documented_outputs():
    """Relative paths that documented commands write (absolute ones are the user's own folders)."""
    found = set()
    for doc in DOCS:
        for path in re.findall(OUTPUT_FLAGS + r"[ =]([\w./-]+)", doc.read_text()):
            if not path.startswith(("/", "docs/", "$")):
                found.add(path.rstrip("."))
    return sorted(found)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_outputs_of_documented_commands_are_ignored_by_git():
    outputs = documented_outputs()
    assert "vis.png" in outputs and "out/dmjd_convit_b" in outputs  # the scan finds the README's commands
    for path in outputs:
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert result.returncode == 0, f"{path} (written by a documented command) is not git-ignored"


def test_pretrain_md_asks_slurm_for_a_stop_signal_to_every_step_and_requeues_on_the_launchers_status():
    """The batch script of PRETRAIN.md, "Preemption and requeueing without submitit": the signal it asks for is one
    the run stops on, sent to the job's steps (not `B:`, the batch shell alone), the launcher is the one the tests
    signal (tests/test_pretrain.py) with flags torchrun's parser takes, and the status it requeues on is the run's."""
    import shlex

    from torch.distributed.run import get_args_parser

    import main_pretrain
    from training.errors import REQUEUE_EXIT_CODE
    text = (ROOT / "PRETRAIN.md").read_text()
    script = re.search(r"### Preemption and requeueing without submitit.*?```bash\n(.*?)```", text, re.S).group(1)
    signal_name = re.search(r"#SBATCH .*--signal=(\S+)@\d+", script).group(1)
    assert not signal_name.startswith("B:")
    assert signal_name in main_pretrain.get_args_parser().get_default("stop_signals").split(",")
    srun = shlex.split(re.search(r"^srun (.*?)(?<!\\)$", script.replace("\\\n", " "), re.M).group(1))
    assert srun[:3] == ["python", "-m", "training.launch"]
    launched = get_args_parser().parse_args(srun[3:])
    assert launched.training_script == "main_pretrain.py"
    main_pretrain.get_args_parser().parse_args(launched.training_script_args)
    assert f"[ $status -eq {REQUEUE_EXIT_CODE} ] && scontrol requeue" in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="runs the batch script with bash")
def test_pretrain_mds_batch_script_requeues_a_job_stopped_while_it_starts(tmp_path):
    """The batch script run as SLURM would (srun starting its command, scontrol recording the requeue), on a tiny
    folder, stopped with its signal while the training processes start (importing torch, building the model): the
    run exits with 75 having written nothing, and the script requeues the job."""
    import os
    import signal
    import sys
    import time

    from helpers import write_image_folder
    from training.launch import child_pids
    text = (ROOT / "PRETRAIN.md").read_text()
    script = re.search(r"### Preemption and requeueing without submitit.*?```bash\n(.*?)```", text, re.S).group(1)
    signal_name = re.search(r"#SBATCH .*--signal=(\S+)@\d+", script).group(1)
    data, out = write_image_folder(tmp_path / "data", {"train": 4}), tmp_path / "out"
    script = (script.replace("/path/to/imagenet", str(data)).replace("/shared/out/dmjd_convit_b", str(out))
              .replace("--nproc_per_node=8", "--nproc_per_node=2").replace("python ", f"{sys.executable} "))
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (shims / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.txt"}\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    job = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, step = time.time() + 60, []
    while time.time() < deadline and len(step) < 3:  # until the launcher has started its two training processes
        step = [(launcher, child_pids(launcher)) for launcher in child_pids(job.pid)]
        step = [pid for launcher, workers in step if len(workers) == 2 for pid in [launcher, *workers]]
        time.sleep(0.05)
    for pid in step:  # SLURM's --signal without B: every process of the job's steps, not the batch shell
        os.kill(pid, getattr(signal, "SIG" + signal_name))
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 75, output
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert not out.exists() or not any(out.iterdir()), output  # nothing written
