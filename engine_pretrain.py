"""DMJD pre-training as a task of the training loop (training.loop), and the config it runs under."""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from timm.optim import param_groups_weight_decay

from models_dmjd import EMATeacher
from training.config import EpochConfig
from training.errors import RunError
from training.loop import Task
from util.checkpoint import load_state_dict_strict
from util.schedules import cosine_momentum
from util.visualization import make_figure

LOSS_NAMES = ("loss", "loss_mask", "loss_vis")


@dataclass(frozen=True)
class PretrainConfig(EpochConfig):
    """main_pretrain.py's flags, resolved: pred_ratio, lr, amp and channels_last are filled in."""
    num_views: int
    mask_ratio: float
    pred_ratio: float
    mask_type: str
    block_size: int
    pred_type: str
    vis_target: str
    theta: float
    ema_momentum: float
    min_crop_scale: float
    compile: bool
    channels_last: bool
    save_freq: int
    keep_last: int
    vis_freq: int

    def momentum_at(self, progress: float) -> float:
        """The EMA teacher's momentum: cosine from --ema_momentum to 1 over the run."""
        return cosine_momentum(progress, self.ema_momentum, self.epochs)


class PretrainTask(Task):
    """DMJD pre-training as the loop sees it: the student (the DMJD model), its EMA teacher (when the visible
    branch distils one) and the teacher's momentum schedule, updated after each optimizer step; the loss and its
    parts of both branches; no evaluation. A checkpoint keeps the teacher as its "teacher" entry (None without one).

    Batches are `(uint8 images, labels, num_bad)` from util.datasets.skip_bad_collate; a batch with no readable
    image trains as one black crop of weight 0 (out of the gradient and the losses).

    `momentum_at(steps)`: the teacher's momentum after that many optimizer steps. The benchmarks, which time the
    step alone, build the task without a config (`cfg` None) for its teacher and post-step hook."""
    loss_names = LOSS_NAMES

    def __init__(self, model: torch.nn.Module, cfg: Optional[PretrainConfig], device: torch.device,
                 momentum_at: Callable[[float], float], vis_images: Optional[torch.Tensor] = None):
        self.model, self.trained, self.cfg, self.device, self.momentum_at = model, model, cfg, device, momentum_at
        self.teacher = EMATeacher(model.encoder).to(device) if model.uses_teacher else None
        self.momentum = float("nan")
        self.vis_images = vis_images  # a picture of masks and predictions every --vis_freq epochs

    def optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups_weight_decay(self.model, self.cfg.weight_decay,
                                           no_weight_decay_list=self.model.no_weight_decay())
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95), fused=self.device.type == "cuda")

    def placeholder(self):
        size = self.cfg.input_size
        return torch.zeros(1, 3, size, size, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)

    def prepare(self, images, labels):
        images = images.to(self.device, non_blocking=True)  # uint8 to the device, normalised there
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, None, len(images)

    def loss(self, images, _):
        return self.trained(images, teacher=self.teacher)

    def after_step(self, steps: float) -> None:
        if self.teacher is not None:
            self.momentum = self.momentum_at(steps)
            self.teacher.update(self.model.encoder, self.momentum)

    def scalars(self) -> Dict[str, float]:
        return {"momentum": self.momentum} if self.teacher is not None else {}

    def end_round(self, epoch: int, writer) -> None:
        cfg = self.cfg
        if self.vis_images is not None and ((epoch + 1) % cfg.vis_freq == 0 or epoch + 1 == cfg.epochs):
            figure = make_figure(self.model, self.vis_images, min_glyph=0)
            writer.add_image("masks_and_predictions", figure, epoch, dataformats="HWC")

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def load_extra_state(self, checkpoint: dict, path: str) -> None:
        if self.teacher is None:
            return
        if checkpoint.get("teacher") is None:
            raise RunError(f"{path} has no EMA teacher; it was not trained with --vis_target ema")
        load_state_dict_strict(self.teacher, checkpoint["teacher"], "teacher")
