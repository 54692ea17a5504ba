"""Checkpoints as plain dicts of tensors and primitives, written atomically and read with weights_only=True."""
import glob
import os
import re
from typing import Optional

import torch


def save_checkpoint(state: dict, path: str) -> None:
    """Writes to a temporary file in the same folder, then renames: a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def periodic_checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{epoch}.pth")


def last_checkpoint_path(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoint-last.pth")


def prune_periodic_checkpoints(output_dir: str, keep_last: int) -> None:
    """Keeps the `keep_last` newest `checkpoint-<epoch>.pth` files (0 keeps them all)."""
    if keep_last <= 0:
        return
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    for _, path in sorted(found)[:-keep_last]:
        os.remove(path)


def find_resume(resume: str, output_dir: Optional[str]) -> Optional[str]:
    """`--resume PATH` wins; otherwise a `checkpoint-last.pth` in the output folder resumes automatically."""
    if resume:
        return resume
    if output_dir and os.path.isfile(last_checkpoint_path(output_dir)):
        return last_checkpoint_path(output_dir)
    return None


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, what: str = "model") -> None:
    """Loads every key or fails with the list of missing, unexpected and mismatched keys."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape)
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:10]) + (f" ... (+{len(keys) - 10})" if len(keys) > 10 else "") or "none"
        raise RuntimeError(f"the checkpoint's {what} does not match this architecture: missing keys: {show(missing)}; "
                           f"unexpected keys: {show(unexpected)}; shape mismatches: {show(mismatched)}")
    module.load_state_dict(state_dict)
