"""The frozen config that a script's flags (training.flags) are resolved into once: engines and the run skeleton read
the config, never `args`."""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch

from util.misc import AMP_DTYPES
from util.schedules import cosine_lr


@dataclass(frozen=True)
class TrainConfig:
    """What every training run is: its flags with every default resolved (lr, precision, world size).

    Scripts subclass it with their own flags and build it once with `from_args`; it is saved in checkpoints as
    `args` (`flags()`), so that a checkpoint says exactly how it was trained.
    """
    model: str
    input_size: int
    batch_size: int
    accum_iter: int
    lr: float  # resolved from --blr unless given
    blr: float
    min_lr: float
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
        "model", "input_size", "batch_size", "world_size", "accum_iter", "lr", "blr", "min_lr", "weight_decay",
        "clip_grad", "seed")
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

    def flags(self) -> dict:
        """The config as a plain dict of flag names to values (what checkpoints keep as `args`)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EpochConfig(TrainConfig):
    """A run counted in epochs of its data (pre-training, fine-tuning, probing), with MAE's lr schedule."""
    epochs: int
    warmup_epochs: float

    RESUME_MUST_MATCH: ClassVar[Tuple[str, ...]] = TrainConfig.RESUME_MUST_MATCH + ("epochs", "warmup_epochs")

    def lr_at(self, progress: float) -> float:
        """Linear warmup to --lr over --warmup_epochs, then a half-cosine to --min_lr at --epochs (`progress` in
        epochs)."""
        return cosine_lr(progress, self.lr, self.min_lr, self.warmup_epochs, self.epochs)
