"""The demo's models and its pre-training command, shared by demo.py and the transfer checks (benchmarks/
transfer_check.py runs the demo's pre-training stage when a check has no checkpoint of it). Commands run from the repository's root."""
import os
import sys
from typing import List

__all__ = ["ROOT", "DATA_DIR", "PRETRAIN_MODEL", "CLASSIFIER", "PRETRAIN_EPOCHS", "shown", "common_flags",
           "pretrain_command"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "data", "fashion_mnist")  # where the demo's ImageFolder goes
PRETRAIN_MODEL = "dmjd_convit_mini_patch8_hog"
CLASSIFIER = "convvit_mini_patch8"  # the classifier built on PRETRAIN_MODEL's encoder
PRETRAIN_EPOCHS = 2


def shown(path: str) -> str:
    """A path relative to the repository when it lies inside it: the printed commands run from there."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def common_flags(num_workers: int, device: str) -> List[str]:
    """The flags of every stage of the demo: 32 px inputs, its workers and device, a line every 50 steps."""
    return ["--input_size", "32", "--num_workers", str(num_workers), "--device", device, "--print_freq", "50"]


def pretrain_command(data: str, output_dir: str, epochs: int, num_workers: int, device: str) -> List[str]:
    """The demo's DMJD pre-training of PRETRAIN_MODEL on the ImageFolder `data`, into `output_dir`."""
    return [shown(sys.executable), "main_pretrain.py", "--model", PRETRAIN_MODEL, "--mask_type", "rand",
            "--batch_size", "128", "--epochs", str(epochs), "--warmup_epochs", "0.2", "--blr", "1.5e-3",
            "--min_crop_scale", "0.6", *common_flags(num_workers, device), "--data_path", shown(data),
            "--output_dir", shown(output_dir)]
