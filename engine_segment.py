"""Semantic segmentation on a pre-trained encoder: the config, the model, the data, and the task of the training
loop (training.loop): UperNet's losses, and evaluation (whole image or sliding window, optional multi-scale + flip).

The recipe is iteration-based (mmseg's IterBasedRunner): `--iters` optimizer steps, evaluated and checkpointed every
`--eval_interval` of them (a round of the loop), drawn from an endless seeded stream of the training set
(training.data.stream_loader): a run resumed anywhere continues with exactly the crops an uninterrupted one would have
seen, and the lr is a pure function of the iteration (`SegmentConfig.lr_at`, the loop's schedule).
"""
import argparse
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from timm.optim import param_groups_layer_decay

from models_upernet import UperNet, create_upernet, segmentation_loss
from training.config import TrainConfig
from training.data import eval_loader, stream_loader
from training.distributed import all_reduce_sum, launch_world_size
from training.errors import RunError, flag_error
from training.flags import check_run_flags
from training.loop import Schedule, evaluate_checkpoint, fit
from training.run import Run
from training.task import Evaluator, Task
from training.transfer import (check_simple_pyramid, check_transfer_flags, count_parameters, dense_options,
                               model_from_checkpoints, on_run_device, simple_pyramid)
from util.datasets import skip_bad_collate
from util.misc import resolve_amp, resolve_device
from util.schedules import poly_lr, scaled_lr
from util.seg_datasets import (FULL_LABEL_CHECK_LIMIT, LABEL_CHECK_SAMPLE, TRAINING_LABEL_CHECK_SAMPLE, LabelCheck,
                               SegEvalTransform, SegmentationFolder, SegTrainTransform, check_labels, class_names)
from util.seg_metrics import ConfusionMatrix, per_class_table, scores_for_log, segmentation_scores

PER_CLASS_TABLE = "per_class_iou.md"


@dataclass(frozen=True)
class SegmentConfig(TrainConfig):
    """main_segment.py's flags, resolved."""
    iters: int
    warmup_iters: int
    warmup_ratio: float
    poly_power: float
    eval_interval: int
    save_freq: int
    keep_last: int
    betas: list
    layer_decay: float
    drop_path: float
    out_indices: Optional[list]
    decoder_channels: int
    pool_scales: list
    head_dropout: float
    aux_in_index: int
    aux_channels: int
    aux_weight: float
    rel_pos_bias: bool
    layer_scale: Optional[float]
    simple_pyramid: bool  # resolved: on for a plain ViT unless given
    nb_classes: int
    reduce_zero_label: bool
    ignore_index: int
    img_scale: list
    ratio_range: list
    cat_max_ratio: float
    flip_prob: float
    photometric: bool
    eval_mode: str
    eval_crop_size: int  # resolved: --input_size unless given
    eval_stride: int  # resolved: two thirds of the window unless given
    aug_test: bool
    aug_test_ratios: list
    eval_batch_size: int
    eval: bool
    finetune: str
    checkpoint_key: str

    def lr_at(self, iteration: float) -> float:
        """The lr after `iteration` optimizer steps: mmseg's poly decay over --iters with its linear warmup."""
        return poly_lr(iteration, self.lr, self.iters, self.poly_power, self.min_lr, self.warmup_iters,
                       self.warmup_ratio)

    def schedules(self, round_steps: int) -> Dict[str, Callable[[float], float]]:
        return {"lr": self.lr_at}

    @property
    def schedule(self) -> Schedule:
        """--iters optimizer steps in rounds of --eval_interval."""
        return Schedule(self.iters, self.eval_interval, self.accum_iter, unit="iteration")

    @property
    def micro_batches_per_interval(self) -> int:
        return self.eval_interval * self.accum_iter

    @property
    def loss_names(self):
        return ("loss", "loss_decode", "loss_aux") if self.aux_weight > 0 else ("loss", "loss_decode")

    @property
    def test_ratios(self) -> List[float]:
        return list(self.aug_test_ratios) if self.aug_test else [1.0]

    def evaluation_line(self) -> str:
        how = (f"sliding window {self.eval_crop_size} x {self.eval_crop_size}, stride {self.eval_stride}"
               if self.eval_mode == "slide" else "whole image")
        scales = (f"scales {', '.join(f'{r:g}' for r in self.aug_test_ratios)} and flip" if self.aug_test
                  else "single scale")
        return f"{how}, {scales}, images resized to fit {tuple(self.img_scale)}"


# -- model and data ---------------------------------------------------------------------------------------------------
def validate_args(args, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The checks of main_segment.py's flags (`parser`, the script's): fails before any work, naming the flag;
    returns `args` unchanged."""
    check_run_flags(parser, args)  # each flag's range, as declared
    if args.iters % args.eval_interval:
        raise flag_error("--iters", f"{args.iters} must be a multiple of --eval_interval {args.eval_interval} (the "
                                    f"run evaluates and checkpoints at the end of each interval)")
    if not 0 <= args.warmup_iters <= args.iters:
        raise flag_error("--warmup_iters", f"must be in [0, --iters {args.iters}], got {args.warmup_iters}")
    if args.ignore_index < args.nb_classes:
        raise flag_error("--ignore_index", f"{args.ignore_index} is one of the {args.nb_classes} classes "
                                           f"(--nb_classes); it must be >= {args.nb_classes}")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise flag_error("--ratio_range", f"must be LOW HIGH with 0 < LOW <= HIGH, got {args.ratio_range}")
    crop = args.eval_crop_size or args.input_size
    if args.eval_stride is not None and not 1 <= args.eval_stride <= crop:
        raise flag_error("--eval_stride", f"must be in [1, the window {crop}], got {args.eval_stride}")
    if min(args.aug_test_ratios) <= 0:
        raise flag_error("--aug_test_ratios", f"must be positive, got {args.aug_test_ratios}")
    check_transfer_flags(args, "segmentation", few_images=", and the PPM's 1 x 1 pooling one value per channel")
    check_simple_pyramid(args)
    return args


def resolve_config(args, parser: argparse.ArgumentParser) -> Tuple["SegmentConfig", str]:
    """(config, lr line): the flags checked, with the lr (blr x total batch / 256 unless --lr), the precision, the
    evaluation window and stride resolved for the launch's device and world size."""
    args = validate_args(args, parser)
    device, world_size = resolve_device(args.device), launch_world_size()
    lr, line = scaled_lr(args.blr, args.batch_size * args.accum_iter * world_size, args.lr)
    crop = args.eval_crop_size or args.input_size
    stride = args.eval_stride or max(1, crop * 2 // 3)
    cfg = SegmentConfig.from_args(args, parser, lr=lr, amp=resolve_amp(args.amp, device)[0],
                                  world_size=world_size, eval_crop_size=crop, eval_stride=stride,
                                  simple_pyramid=simple_pyramid(args))
    return cfg, line


def build_segmenter(cfg: SegmentConfig, **layout) -> UperNet:
    """UperNet on --model's multi-scale features (timm features_only, any input size that is a multiple of the
    stride), as the flags say; `layout`: build arguments a checkpoint's encoder needs (architecture_kwargs). The
    encoder's dense options (dmjd_encoders.dense): --rel_pos_bias, --layer_scale, --simple_pyramid (plain ViTs)."""
    return create_upernet(cfg.model, cfg.nb_classes, out_indices=cfg.out_indices, channels=cfg.decoder_channels,
                          aux_in_index=cfg.aux_in_index if cfg.aux_weight > 0 else None,
                          aux_channels=cfg.aux_channels, pool_scales=cfg.pool_scales, dropout=cfg.head_dropout,
                          img_size=cfg.input_size, dynamic_img_size=True, drop_path_rate=cfg.drop_path,
                          **dense_options(cfg), **layout)


def segmentation_optimizer(model: UperNet, cfg: SegmentConfig) -> torch.optim.AdamW:
    """AdamW (--lr, --betas, --weight_decay) over ConvMAE's layer-wise lr decay groups (UperNet.group_matcher, scale
    --layer_decay ** (num_layers - 1 - layer)), without weight decay on 1-D parameters and pos_embed."""
    groups = param_groups_layer_decay(model, cfg.weight_decay, model.no_weight_decay(), layer_decay=cfg.layer_decay)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def train_transform(cfg: SegmentConfig) -> SegTrainTransform:
    return SegTrainTransform((cfg.input_size, cfg.input_size), tuple(cfg.img_scale), tuple(cfg.ratio_range),
                             cfg.cat_max_ratio, cfg.flip_prob, cfg.photometric, cfg.ignore_index)


def segmentation_folder(cfg: SegmentConfig, split: str, transform) -> SegmentationFolder:
    try:
        return SegmentationFolder(cfg.data_path, split, cfg.nb_classes, transform, cfg.reduce_zero_label,
                                  cfg.ignore_index)
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err)) from None


class EvalCollate:
    """skip_bad_collate for evaluation, with an error that names --eval_batch_size when the images of a batch
    differ in size (ADE20K's do: evaluate them one at a time)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, batch):
        good = [sample for sample in batch if sample is not None]
        for what, sizes in (("images", {tuple(x.shape[-2:]) for x, _ in good}),
                            ("annotations", {tuple(y.shape) for _, y in good})):
            if len(sizes) > 1:
                raise ValueError(f"--eval_batch_size {self.batch_size} needs validation {what} of one size, got "
                                 f"{sorted(sizes)}; use --eval_batch_size 1")
        return skip_bad_collate(batch)


def checked_labels(dataset: SegmentationFolder, full_up_to: int, sample_size: int) -> LabelCheck:
    """util.seg_datasets.check_labels of `dataset`, its errors (a label outside the classes, a colour annotation)
    as RunErrors naming the file."""
    try:
        return check_labels(dataset, full_up_to, sample_size)
    except ValueError as err:
        raise RunError(str(err)) from None


def checked_validation_set(cfg: SegmentConfig) -> SegmentationFolder:
    """The validation set, checked before the first step (every process reads the same files and stops alike): every
    annotation's labels in [0, --nb_classes) after --reduce_zero_label, or --ignore_index, and not every pixel
    ignored, in full up to FULL_LABEL_CHECK_LIMIT annotations, else on a fixed random sample; which of the two is
    printed. A wrong label stops the run naming the file, the value and the flags; annotations that are all
    ignored, or none of which can be read, stop it naming the folder: an evaluation of them would be no score."""
    val_set = segmentation_folder(cfg, "validation", SegEvalTransform(tuple(cfg.img_scale)))
    check = checked_labels(val_set, FULL_LABEL_CHECK_LIMIT, LABEL_CHECK_SAMPLE)
    folder, read = val_set.annotation_folder, check.checked - check.unreadable
    if read == 0:
        raise RunError(f"{folder}: none of the annotations of {check.describe()} can be read (see the warnings "
                       f"above): there is nothing to evaluate")
    if check.labelled_pixels == 0:
        ignored = f"{cfg.ignore_index}, or 0 by --reduce_zero_label" if cfg.reduce_zero_label else cfg.ignore_index
        raise RunError(f"{folder}: every pixel of the annotations of {check.describe()} is ignored (label {ignored}): "
                       f"there is no pixel to score; check --reduce_zero_label and --ignore_index {cfg.ignore_index}")
    line = f"checked the labels of {check.describe()}"
    if check.checked < check.total:
        line += f" (a fixed random sample: all are read up to {FULL_LABEL_CHECK_LIMIT})"
    if check.unreadable:
        line += f"; {check.unreadable} annotations cannot be read (named above): evaluation skips their pairs"
    print(line)
    return val_set


def segmentation_loaders(run: Run, cfg: SegmentConfig):
    """(training loader or None with --eval, validation loader, class names). The validation set is checked before
    the first step (checked_validation_set), and a sample of the training labels. Training draws --eval_interval x
    --accum_iter batches per epoch of the run from an endless seeded stream; validation is sharded over the
    processes without padding."""
    pin = cfg.pin_mem and run.device.type == "cuda"
    val_set = checked_validation_set(cfg)
    try:
        names = class_names(cfg.data_path, cfg.nb_classes)
    except ValueError as err:
        raise RunError(str(err)) from None
    val = eval_loader(val_set, cfg.eval_batch_size, run.dist, True, cfg.num_workers, pin,
                      EvalCollate(cfg.eval_batch_size))
    if cfg.eval:
        print(f"validation: {len(val_set)} images in {cfg.data_path}")
        return None, val, names
    train_set = segmentation_folder(cfg, "training", train_transform(cfg))
    if len(train_set) < run.world_size:
        raise RunError(f"{run.world_size} processes need at least one training image each; "
                       f"{cfg.data_path}/images/training has {len(train_set)}")
    check = checked_labels(train_set, TRAINING_LABEL_CHECK_SAMPLE, TRAINING_LABEL_CHECK_SAMPLE)
    print(f"checked the label range of {check.describe()} (the loader checks each one as it reads it)")
    print(f"training: {len(train_set)} images, validation: {len(val_set)} images, {cfg.nb_classes} classes")
    print(f"training crops: {train_set.transform}")
    train = stream_loader(train_set, cfg.batch_size, cfg.seed, run.dist, cfg.num_workers, pin,
                          cfg.micro_batches_per_interval, skip_bad_collate)
    return train, val, names


# -- the task --------------------------------------------------------------------------------------------------------
def full_batch(images, labels, batch_size: int, crop_size: int, ignore_index: int):
    """(images, labels) of a training batch that lost samples to bad files, topped up to `batch_size` with blank
    crops whose pixels are all ignored. Every step then keeps its shape, as DDP and the synchronised BatchNorm need on
    every process (and the PPM's 1 x 1 pooling needs two or more values), and the blank crops add nothing to the
    loss."""
    missing = batch_size - len(images)
    if missing == 0:
        return images, labels
    blank_images = torch.zeros(missing, 3, crop_size, crop_size)
    blank_labels = torch.full((missing, crop_size, crop_size), ignore_index, dtype=torch.int64)
    return torch.cat([images, blank_images]), torch.cat([labels, blank_labels])


class SegmentTask(Task):
    """Segmentation as the loop sees it: UperNet (its SyncBN made of the run's processes), layer-decayed AdamW,
    the decode and auxiliary losses, and mIoU evaluation (the best checkpoint: the best mIoU, `best_mIoU`). After
    each evaluation the main process rewrites the per-class table. Batches are `(images, labels, num_bad)`; a batch
    with no readable pair trains as blank crops of weight 0."""
    best = "mIoU"
    samples = "pairs"

    def __init__(self, model: UperNet, cfg: SegmentConfig, device: torch.device, names: Sequence[str]):
        self.model, self.cfg, self.device, self.names = model, cfg, device, names
        self.loss_names = cfg.loss_names
        self.last: Optional[ConfusionScores] = None  # the last evaluation, for its per-class table

    @property
    def evaluation_set(self) -> str:
        return os.path.join(self.cfg.data_path, "images", "validation")

    def optimizer(self) -> torch.optim.AdamW:
        return segmentation_optimizer(self.model, self.cfg)

    def placeholder(self):
        size = self.cfg.input_size
        return torch.zeros(0, 3, size, size), torch.zeros(0, size, size, dtype=torch.int64)

    def prepare(self, images, labels):
        readable = len(images)
        images, labels = full_batch(images, labels, self.cfg.batch_size, self.cfg.input_size, self.cfg.ignore_index)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), readable

    def loss(self, images, labels):
        logits, aux = self.trained(images)
        losses = segmentation_loss(logits, labels, aux, self.cfg.aux_weight, self.cfg.ignore_index)
        return {k: v if k == "loss" else v.detach() for k, v in losses.items()}

    def round_stats(self, stats: Dict[str, float]) -> Dict[str, float]:
        return {k: v for k, v in stats.items() if k not in ("steps", "nonfinite_skipped")}

    def predict(self, images, labels):
        """Class probabilities at the labels' size (whole image or sliding window, optional scales and flip)."""
        cfg = self.cfg
        return self.model.predict(images.to(self.device, non_blocking=True), labels.shape[-2:], cfg.eval_mode,
                                  cfg.eval_crop_size, cfg.eval_stride, cfg.test_ratios, cfg.aug_test)

    def evaluator(self) -> "ConfusionScores":
        self.last = ConfusionScores(self.cfg, self.device, self.names)
        return self.last

    def report(self, scores: Dict[str, object]) -> str:
        return report(scores)

    def evaluated(self, scores: Dict[str, object], label: str) -> None:
        write_per_class_table(self.cfg, self.last.full, self.names, label)


class ConfusionScores(Evaluator):
    """The confusion matrix of the predicted classes against the labels (--ignore_index left out), summed over the
    processes; scores: aAcc, mIoU, mAcc and the IoU of each class by name (None where a class never occurs in
    prediction or label), with `full` (segmentation_scores: per-class Acc and pixels too) for the per-class table.
    No labelled pixel among the images evaluated (an empty matrix) raises RunError naming the folder on every process
    alike."""

    def __init__(self, cfg: SegmentConfig, device: torch.device, names: Sequence[str]):
        self.cfg, self.names = cfg, names
        self.matrix = ConfusionMatrix(cfg.nb_classes, device, cfg.ignore_index)
        self.images = torch.zeros(1, dtype=torch.float64)
        self.full: Optional[Dict[str, object]] = None

    def update(self, probs, labels) -> None:
        self.matrix.update(probs.argmax(1), labels.to(probs.device, non_blocking=True))
        self.images += len(labels)

    def scores(self) -> Dict[str, object]:
        cfg = self.cfg
        self.matrix.matrix = all_reduce_sum(self.matrix.matrix, what="the confusion matrix")
        images = int(all_reduce_sum(self.images.to(self.matrix.matrix.device), what="the evaluation's image count"))
        if int(self.matrix.matrix.sum()) == 0:  # summed over the processes: all stop alike
            raise RunError(f"the confusion matrix is empty: every pixel of the {images} validation images "
                           f"evaluated is ignored ({os.path.join(cfg.data_path, 'annotations', 'validation')}, "
                           f"--ignore_index {cfg.ignore_index}): there is no score to report")
        self.full = segmentation_scores(self.matrix.matrix)
        return scores_for_log(self.full, self.names)


def report(scores: Dict[str, object]) -> str:
    line = (f"mIoU {scores['mIoU']:.2f}  mAcc {scores['mAcc']:.2f}  aAcc {scores['aAcc']:.2f} on "
            f"{scores['images']} images")
    if scores["bad_images"]:
        line += f" ({scores['bad_images']} unreadable pairs skipped)"
    return line


def write_per_class_table(cfg: SegmentConfig, scores: Dict[str, object], names: Sequence[str], title: str) -> str:
    """Writes the per-class table (markdown) to --output_dir/per_class_iou.md, replacing the previous one."""
    path = os.path.join(cfg.output_dir, PER_CLASS_TABLE)
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{cfg.evaluation_line()}\n\n{per_class_table(scores, names)}\n")
    return path


def run_segmentation(run: Run, cfg: SegmentConfig) -> Dict[str, object]:
    """The loaders, UperNet on --finetune's encoder (or the checkpoint resumed) and its task; then --eval of --resume,
    or the run's intervals (`train_or_evaluate`)."""
    if not cfg.eval:
        print(f"{cfg.iters} iterations of {cfg.images_per_step} images ({cfg.batch_size} per process x "
              f"{cfg.world_size} processes x accum {cfg.accum_iter}), warmup {cfg.warmup_iters}, poly power "
              f"{cfg.poly_power:g}; evaluation and checkpoint every {cfg.eval_interval} iterations")
    train_loader, val_loader, names = segmentation_loaders(run, cfg)
    model = model_from_checkpoints(run, cfg, partial(build_segmenter, cfg), encoder_of,
                                   "--model, --input_size, --out_indices and --aux_in_index")
    print(f"UperNet on {cfg.model}: {count_parameters(model):.2f} M parameters "
          f"({count_parameters(model.backbone):.2f} M encoder), feature strides "
          f"{list(model.backbone.feature_info.reduction())}, channels {model.in_channels}")
    task = SegmentTask(on_run_device(model, run, cfg), cfg, run.device, names)
    return train_or_evaluate(run, cfg, task, (train_loader, val_loader))


def train_or_evaluate(run: Run, cfg: SegmentConfig, task: SegmentTask, loaders) -> Dict[str, object]:
    """--eval of --resume, or the run's intervals (training.loop.fit): train --eval_interval iterations, evaluate,
    keep checkpoint-last.pth and checkpoint-best.pth (best mIoU), log.txt, TensorBoard (x: the iteration) and the
    per-class table. Returns the last evaluation."""
    train_loader, val_loader = loaders
    if cfg.eval:
        print(f"evaluation: {cfg.evaluation_line()}")
        scores = evaluate_checkpoint(run, task, val_loader, cfg.resume)
        if run.is_main:
            print(f"per-class IoU: {os.path.join(cfg.output_dir, PER_CLASS_TABLE)}")
        return scores
    print(f"evaluation every {cfg.eval_interval} iterations: {cfg.evaluation_line()}")
    scores = fit(run, task, cfg, train_loader, val_loader, cfg.schedule)
    print(f"per-class IoU of the last evaluation: {os.path.join(cfg.output_dir, PER_CLASS_TABLE)}")
    return scores


def encoder_of(model: UperNet) -> torch.nn.Module:
    """The timm encoder inside the UperNet's features_only backbone (what --finetune's weights load into)."""
    encoder = getattr(model.backbone, "model", None)
    if encoder is None:
        raise TypeError(f"the backbone is a {type(model.backbone).__name__}, not a timm features_only wrapper")
    return encoder

