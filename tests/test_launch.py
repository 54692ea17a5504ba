"""training.launch: torchrun with the requeue status (the end-to-end runs are in test_pretrain.py)."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from training.launch import child_pids, exit_status


def failures(*codes):
    return {rank: SimpleNamespace(exitcode=code) for rank, code in enumerate(codes)}


def test_the_exit_status_is_the_requeue_status_when_any_process_stopped_with_a_checkpoint():
    assert exit_status(None) == 0
    assert exit_status(failures(75, 75)) == 75
    # a process exits with 75 only after the stop checkpoint is saved: one that torch's agent killed while it was
    # tearing down afterwards does not undo it
    assert exit_status(failures(-15, 75)) == 75
    assert exit_status(failures(1)) == 1 and exit_status(failures(-15, -15)) == 1


def test_child_pids_finds_the_processes_this_one_started():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.time() + 10
        while child.pid not in child_pids(os.getpid()) and time.time() < deadline:
            time.sleep(0.05)
        assert child.pid in child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_a_stop_signal_while_the_launcher_starts_exits_75_with_nothing_started(tmp_path):
    """SIGTERM while torch loads (before the agent starts any training process): a requeue, not a killed job."""
    import signal
    from helpers import ROOT
    launcher = subprocess.Popen([sys.executable, "-m", "training.launch", "--standalone", "--nproc_per_node=2",
                                 "main_pretrain.py", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # the interpreter has taken the signals (training.signals, its first lines); torch is loading
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 75, out
    assert "nothing was trained or saved; exiting with status 75 (requeue)" in out or "before the training " \
        "processes started" in out, out
    assert not (tmp_path / "out").exists()
