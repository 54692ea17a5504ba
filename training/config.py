"""The flags every training script shares, their checks, and the frozen config that a script's flags are resolved
into once: engines and the run skeleton read the config, never `args`."""
import argparse
import dataclasses
import os
import signal
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch

from util.misc import AMP_DTYPES
from util.schedules import cosine_lr


def add_run_flags(parser: argparse.ArgumentParser, data_help: str) -> argparse._ArgumentGroup:
    """Data, output, device, precision, seeding, resume, logging and loading flags (the same in every script)."""
    g = parser.add_argument_group("data and run")
    g.add_argument("--data_path", default="/datasets/imagenet", type=str, help=data_help)
    g.add_argument("--output_dir", default="./output_dir", type=str, help="checkpoints and log.txt")
    g.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (none: --output_dir)")
    g.add_argument("--device", default="auto", type=str, help="auto, cuda, cuda:<index> or cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--seed", default=0, type=int, help="seeds crops, augmentation, masks and shuffling")
    g.add_argument("--resume", default="", type=str, help="checkpoint to resume (none: output_dir's last one)")
    g.add_argument("--print_freq", default=20, type=int,
                   help="steps between log lines; the losses are read back from the device only then")
    g.add_argument("--skip_nonfinite", default=0, type=int,
                   help="skip up to N optimizer steps with a non-finite loss in the run, then stop (0: stop at the "
                        "first; N > 0 reads the loss back every step)")
    g.add_argument("--num_workers", default=10, type=int, help="data-loading processes")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pinned host memory for the batches (CUDA)")
    g.add_argument("--allow_flag_changes", default="", type=str,
                   help="flags that may differ from the resumed checkpoint's, comma-separated ('all': any); by default "
                        "a change to the run's schedule or model stops it")
    g.add_argument("--stop_signals", default="TERM,USR1", type=str,
                   help="signals after which the run saves a checkpoint of its current step and exits with status 75 "
                        "(requeue)")
    g.add_argument("--dist_timeout", default=10.0, type=float,
                   help="minutes a collective waits for the other processes before the run fails naming it")
    g.add_argument("--start_over", action="store_true",
                   help="start at epoch 0 when every checkpoint in --output_dir is damaged (they and log.txt are moved "
                        "into a subfolder); without it such a folder stops the run")
    return g


def flag_error(flag: str, why: str) -> SystemExit:
    return SystemExit(f"error: {flag} {why}")


def check_run_flags(args) -> None:
    """The checks every training script makes before any work; each failure names its flag. Reads, never writes."""
    for flag in ("batch_size", "accum_iter", "epochs", "input_size", "print_freq"):
        if getattr(args, flag) < 1:
            raise flag_error(f"--{flag}", f"must be >= 1, got {getattr(args, flag)}")
    for flag in ("skip_nonfinite", "num_workers", "weight_decay", "min_lr"):
        if getattr(args, flag) < 0:
            raise flag_error(f"--{flag}", f"must be >= 0, got {getattr(args, flag)}")
    for flag in ("blr", "lr", "clip_grad"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            raise flag_error(f"--{flag}", f"must be > 0, got {getattr(args, flag)}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise flag_error("--device", f"must be auto, cpu, cuda or cuda:<index>, got {args.device!r}")
    if args.resume and not os.path.isfile(args.resume):
        raise flag_error("--resume", f"{args.resume!r} is not a file")
    if not args.dist_timeout > 0:
        raise flag_error("--dist_timeout", f"must be > 0 minutes, got {args.dist_timeout}")
    for name in (n.strip() for n in args.stop_signals.split(",")):
        if name in ("KILL", "STOP") or not isinstance(getattr(signal, "SIG" + name, None), signal.Signals):
            raise flag_error("--stop_signals", f"{name!r} is not a signal that can be caught (e.g. TERM,USR1)")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise flag_error("--warmup_epochs", f"must be in [0, --epochs {args.epochs}], got {args.warmup_epochs}; "
                                            f"give a shorter warmup for a short run")


@dataclass(frozen=True)
class TrainConfig:
    """What every training run is: its flags with every default resolved (lr, precision, world size).

    Scripts subclass it with their own flags and build it once with `from_args`; it is saved in checkpoints as
    `args` (`flags()`), so that a checkpoint says exactly how it was trained.
    """
    model: str
    input_size: int
    batch_size: int
    epochs: int
    accum_iter: int
    lr: float  # resolved from --blr unless given
    blr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    clip_grad: Optional[float]
    skip_nonfinite: int
    data_path: str
    output_dir: str
    log_dir: Optional[str]
    device: str
    amp: str  # resolved: "bf16", "fp16" or "none"
    seed: int
    resume: str
    print_freq: int
    num_workers: int
    pin_mem: bool
    allow_flag_changes: str
    stop_signals: str
    dist_timeout: float
    start_over: bool
    world_size: int  # processes in the run

    # Every flag is one of two kinds (docs/RELIABILITY.md lists them; tests/test_config.py keeps every script's flags
    # classified). RESUME_MUST_MATCH: the flags that define what the run computes (model, optimisation, schedule,
    # data order and augmentation, method): a resumed run must have the checkpoint's values, or name the flag in
    # --allow_flag_changes. RESUME_MAY_CHANGE: the flags that say where and how the run executes or reports, not what
    # it computes, each with the reason it may change on resume.
    RESUME_MUST_MATCH: ClassVar[Tuple[str, ...]] = (
        "model", "input_size", "batch_size", "world_size", "accum_iter", "epochs", "lr", "blr", "min_lr",
        "warmup_epochs", "weight_decay", "clip_grad", "seed")
    RESUME_MAY_CHANGE: ClassVar[Dict[str, str]] = {
        "data_path": "the same data may be read from another place (its content is not compared)",
        "output_dir": "where the run writes, not what it computes",
        "log_dir": "where TensorBoard's events go",
        "device": "where the run executes (e.g. resuming a GPU run's checkpoint on another node)",
        "amp": "the arithmetic's precision, not the method (e.g. fp16 on GPUs without bf16)",
        "resume": "which file to continue from (the newest good one of it and the folder wins)",
        "print_freq": "how often losses are read back and printed; the steps are the same",
        "skip_nonfinite": "the failure policy: raising it gets a run past a known bad step",
        "num_workers": "samples are seeded by (seed, epoch, index): the same crops with any number of workers",
        "pin_mem": "host memory for the batches; the same values",
        "allow_flag_changes": "names the changes allowed in this start",
        "stop_signals": "how the scheduler stops the run",
        "dist_timeout": "how long a collective waits before the run fails",
        "start_over": "only read when the folder has no loadable checkpoint",
    }

    @classmethod
    def from_args(cls, args, **resolved):
        """The config of `args`: every field from the flag of the same name, except those given as `resolved`."""
        names = {f.name for f in dataclasses.fields(cls)}  # ClassVars are not fields
        unknown = set(resolved) - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        return cls(**{name: resolved[name] if name in resolved else getattr(args, name) for name in names})

    @property
    def trains(self) -> bool:
        """False for a run that only evaluates (--eval): it resumes nothing from its output folder."""
        return not getattr(self, "eval", False)

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES[self.amp]

    @property
    def images_per_step(self) -> int:
        """Unique images per optimizer step, over all processes."""
        return self.batch_size * self.accum_iter * self.world_size

    def lr_at(self, progress: float) -> float:
        """Linear warmup to --lr over --warmup_epochs, then a half-cosine to --min_lr at --epochs."""
        return cosine_lr(progress, self.lr, self.min_lr, self.warmup_epochs, self.epochs)

    def flags(self) -> dict:
        """The config as a plain dict of flag names to values (what checkpoints keep as `args`)."""
        return dataclasses.asdict(self)
