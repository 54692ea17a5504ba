"""The frozen config that a script's flags (training.flags) are resolved into once: engines and the run skeleton read
the config, never `args`."""
import dataclasses
from dataclasses import dataclass
import functools
from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch

from training.flags import RESOLVED_MUST_MATCH, absent_values, must_match
from util.misc import AMP_DTYPES
from util.schedules import cosine_lr


@dataclass(frozen=True)
class TrainConfig:
    """What every training run is: its flags with every default resolved (lr, precision, world size).

    Scripts subclass it with a field per flag and build it once with `from_args(args, parser)`; it is saved in
    checkpoints as `args` (`flags()`), so that a checkpoint says exactly how it was trained. What a resumed run does
    with each flag is declared with the flag (training.flags.flag's `resume`); `must_match()` lists those that
    define the run, and the resolved fields that do (`world_size`).
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

    RESOLVED_MUST_MATCH: ClassVar[Tuple[str, ...]] = RESOLVED_MUST_MATCH  # fields that are no flag but define the run

    @classmethod
    def from_args(cls, args, parser, **resolved):
        """The config of `args`, parsed by `parser`: every field from the flag of the same name, except those given
        as `resolved`; the flags that must match on resume are `parser`'s (training.flags.must_match)."""
        names = {f.name for f in dataclasses.fields(cls)}  # ClassVars are not fields
        unknown = set(resolved) - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        cfg = cls(**{name: resolved[name] if name in resolved else getattr(args, name) for name in names})
        object.__setattr__(cfg, "_must_match", tuple(sorted(must_match(parser) + cls.RESOLVED_MUST_MATCH)))
        object.__setattr__(cfg, "_absent", absent_values(parser))
        return cfg

    def must_match(self) -> Tuple[str, ...]:
        """The names whose values a resumed run must share with its checkpoint (unless --allow_flag_changes)."""
        return self._must_match

    def absent_values(self) -> dict:
        """{name: the value a checkpoint saved before the flag existed ran with} (training.flags.flag's `absent`)."""
        return getattr(self, "_absent", {})  # a config made without from_args declares none

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

    def schedules(self, round_steps: int) -> Dict[str, Callable[[float], float]]:
        """The run's schedules as functions of the optimizer step (util.schedules), which the loop reads at each
        step: "lr", and whatever else the task takes after its steps (`round_steps`: optimizer steps per round)."""
        raise NotImplementedError


@dataclass(frozen=True)
class EpochConfig(TrainConfig):
    """A run counted in epochs of its data (pre-training, fine-tuning, probing), with MAE's lr schedule."""
    epochs: int
    warmup_epochs: float

    def schedules(self, round_steps: int) -> Dict[str, Callable[[float], float]]:
        """MAE's lr: linear warmup to --lr over --warmup_epochs, then a half-cosine to --min_lr at --epochs, in
        optimizer steps of `round_steps` per epoch."""
        return {"lr": functools.partial(cosine_lr, base_lr=self.lr, min_lr=self.min_lr,
                                        warmup=self.warmup_epochs * round_steps, total=self.epochs * round_steps)}
