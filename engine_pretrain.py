"""DMJD pre-training: the config its flags resolve into, their checks, the data and the model, and the task of the
training loop (training.loop)."""
import argparse
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import timm
import torch
from timm.optim import param_groups_weight_decay

from dmjd_encoders.models_convvit import check_model_name, encoder_stride
from models_dmjd import EMATeacher, create_from_flags, reachable_pred_ratio
from training.config import EpochConfig
from training.data import train_loader
from training.distributed import launch_world_size
from training.errors import RunError, flag_error
from training.flags import check_epoch_flags, check_input_size, check_run_flags
from training.loop import Schedule, fit
from training.run import Run
from training.task import Task
from util.datasets import build_pretrain_dataset, sample_images, skip_bad_collate
from util.misc import resolve_amp, resolve_device
from dmjd_encoders.checkpoint import load_state_dict_strict
from util.schedules import cosine_momentum, scaled_lr
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

    def schedules(self, round_steps: int) -> Dict[str, Callable[[float], float]]:
        """MAE's lr (EpochConfig), and with an EMA teacher its momentum: cosine from --ema_momentum to 1 over the
        run."""
        schedules = super().schedules(round_steps)
        if self.theta > 0 and self.vis_target == "ema":  # the model's uses_teacher
            schedules["momentum"] = functools.partial(cosine_momentum, start=self.ema_momentum,
                                                      total=self.epochs * round_steps)
        return schedules


class PretrainTask(Task):
    """DMJD pre-training as the loop sees it: the student (the DMJD model) and its EMA teacher (when the visible
    branch distils one), updated after each optimizer step with the config's "momentum" schedule as the loop reads
    it; the loss and its parts of both branches; no evaluation. A checkpoint keeps the teacher as its "teacher" entry
    (None without one).

    Batches are `(uint8 images, labels, num_bad)` from util.datasets.skip_bad_collate; a batch with no readable
    image trains as one black crop of weight 0 (out of the gradient and the losses).

    The benchmarks, which time the step alone, build the task without a config (`cfg` None) for its teacher and
    post-step hook."""
    loss_names = LOSS_NAMES

    def __init__(self, model: torch.nn.Module, cfg: Optional[PretrainConfig], device: torch.device,
                 vis_images: Optional[torch.Tensor] = None):
        self.model, self.cfg, self.device = model, cfg, device
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
        loss, parts = self.trained(images, teacher=self.teacher)
        return {"loss": loss, **parts}

    def after_step(self, scheduled: Dict[str, float]) -> None:
        """The teacher follows the student: t <- m t + (1 - m) s, m the "momentum" schedule at this step."""
        if self.teacher is not None:
            self.momentum = scheduled["momentum"]
            self.teacher.update(self.model.encoder, self.momentum)

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


def validate_args(args, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fails before any work, naming the flag; returns a copy of `args` with the prediction rate made explicit
    (`args` itself is left as it is)."""
    check_run_flags(parser, args)  # each flag's range, as declared
    check_epoch_flags(args)
    reachable = reachable_pred_ratio(args.num_views, args.mask_ratio)
    pred_ratio = reachable if args.pred_ratio is None else args.pred_ratio
    if not args.mask_ratio <= pred_ratio <= 1:
        raise flag_error("--pred_ratio", f"must be in [--mask_ratio, 1], got {pred_ratio}")
    if pred_ratio > reachable + 1e-6:
        raise flag_error("--pred_ratio", f"{pred_ratio} cannot be reached by {args.num_views} view(s) of mask_ratio "
                                         f"{args.mask_ratio} (at most {reachable:.3g}); add views or lower it")
    check_model_name(args.model, timm.list_models("dmjd_*"), "a DMJD model")
    check_input_size(args.input_size, args.model, encoder_stride(args.model))
    return argparse.Namespace(**{**vars(args), "pred_ratio": pred_ratio})


def resolve_config(args, parser: argparse.ArgumentParser) -> Tuple[PretrainConfig, str]:
    """The run's config: the flags checked, and the prediction rate, lr, precision and memory format resolved for
    the launch's device and world size; and a line that says how the lr was chosen."""
    args = validate_args(args, parser)
    device, world_size = resolve_device(args.device), launch_world_size()
    pred_ratio = args.pred_ratio
    images_per_step = args.batch_size * args.accum_iter * world_size
    lr, lr_line = scaled_lr(args.blr, images_per_step, args.lr, pred_ratio, args.mask_ratio)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    cfg = PretrainConfig.from_args(args, parser, pred_ratio=pred_ratio, lr=lr,
                                   amp=resolve_amp(args.amp, device)[0], channels_last=channels_last,
                                   world_size=world_size)
    return cfg, lr_line


def check_dataset_size(num_images: int, batch_size: int, accum_iter: int, world_size: int, folder: str) -> None:
    """An epoch must hold at least one optimizer step on every process (drop_last batches)."""
    per_step = batch_size * world_size
    if num_images < per_step:
        raise RunError(f"--batch_size {batch_size} x {world_size} processes needs at least that many images; "
                       f"{folder} has {num_images}")
    batches = num_images // per_step
    if batches < accum_iter:
        raise RunError(f"--accum_iter {accum_iter} needs {accum_iter} batches of {batch_size} per process in an "
                       f"epoch; {num_images} images over {world_size} processes give {batches}")


def build_model(cfg: PretrainConfig):
    try:
        return create_from_flags(cfg.flags())
    except ValueError as err:  # shapes that do not fit the model: name them before any work
        raise RunError(f"{err} (check --input_size, --block_size, --mask_ratio)") from None


def run_pretraining(run: Run, cfg: PretrainConfig) -> None:
    """The data, the model and its task, then the run's epochs (training.loop.fit)."""
    print(f"{cfg.batch_size} images x {cfg.num_views} views per process, accum {cfg.accum_iter}, "
          f"{cfg.images_per_step} unique images per optimizer step")
    try:
        dataset = build_pretrain_dataset(cfg.data_path, cfg.input_size, cfg.min_crop_scale)
    except FileNotFoundError as err:
        raise RunError(str(err)) from None
    check_dataset_size(len(dataset), cfg.batch_size, cfg.accum_iter, cfg.world_size, f"{cfg.data_path}/train")
    print(f"dataset: {len(dataset)} images in {cfg.data_path}/train")
    loader = train_loader(dataset, cfg.batch_size, cfg.seed, run.dist, cfg.num_workers,
                          cfg.pin_mem and run.device.type == "cuda", skip_bad_collate)
    schedule = Schedule.of_epochs(cfg.epochs, len(loader), cfg.accum_iter)

    model = build_model(cfg).to(run.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights only; the teacher copies the format
    vis_images = None
    if run.is_main and cfg.vis_freq > 0:
        vis_images = sample_images(cfg.data_path, "train", cfg.input_size, 4).to(run.device)
    task = PretrainTask(model, cfg, run.device, vis_images)
    print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
          f"({sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f} M encoder)")
    if cfg.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay as they are
    fit(run, task, cfg, loader, None, schedule)
