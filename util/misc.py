"""Small run-time helpers: the device and autocast precision of a run, seeding, the encoder package's log lines
among the scripts' prints, and one optimizer step from accumulated gradients. The process group and its collectives
are in training.distributed."""
import logging
import random

import numpy as np
import torch



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_amp(name: str, device: torch.device):
    """`--amp` -> (name, autocast dtype or None); "auto" is bf16 on CUDA and none (fp32) on CPU."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "none"
    return name, AMP_DTYPES[name]


class _PrintHandler(logging.Handler):
    """Writes each record through print(), as the scripts write their own lines: on the main rank only once
    `training.distributed._print_on_main_only` has run, and to the sys.stdout of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), flush=True)
        except Exception:  # logging's contract: a failing handler reports itself and never raises
            self.handleError(record)


def print_library_notes(level: int = logging.INFO) -> None:
    """Prints what the encoder package logs (its load notes: a resampled position embedding, the weights that start
    fresh) among the scripts' own lines, as it printed before it logged. Calling it again changes nothing."""
    logger = logging.getLogger("dmjd_encoders")
    if not any(isinstance(h, _PrintHandler) for h in logger.handlers):
        logger.addHandler(_PrintHandler())
    logger.setLevel(level)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def apply_gradients(optimizer: torch.optim.Optimizer, scaler, parameters, clip_grad=None) -> None:
    """One optimizer step from accumulated gradients: unscale (fp16), clip, step, update the scaler, zero."""
    if scaler is not None:
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
