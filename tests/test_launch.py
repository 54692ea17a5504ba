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
