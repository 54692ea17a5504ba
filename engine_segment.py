"""Semantic segmentation on a pre-trained encoder: the config, the model, the data, one evaluation interval of
training iterations, evaluation (whole image or sliding window, optional multi-scale + flip), and the run's
intervals.

The recipe is iteration-based (mmseg's IterBasedRunner): `--iters` optimizer steps, evaluated and checkpointed every
`--eval_interval` of them. The run layer counts epochs, so an epoch of the run is one evaluation interval, drawn from
an endless seeded stream of the training set (training.data.stream_loader): a run resumed at an interval boundary
continues with exactly the crops an uninterrupted one would have seen, and the lr is a pure function of the
iteration (`SegmentConfig.lr_at`).
"""
import argparse
import json
import os
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from timm.optim import param_groups_layer_decay

from engine_finetune import check_pretrained_flag
from models_convvit import check_classifier_name
from models_upernet import UperNet, create_upernet, segmentation_loss
from training.config import TrainConfig
from training.data import eval_loader, stream_loader
from training.distributed import all_reduce_sum, launch_world_size
from training.flags import check_run_flags, flag_error
from training.meters import Progress, log_window
from training.run import Run, TrainState
from training.step import NonFiniteLossError, TrainStep, autocast_context
from util.checkpoint import load_checkpoint
from util.datasets import skip_bad_collate
from util.misc import resolve_amp, resolve_device
from util.schedules import poly_lr
from util.seg_datasets import SegEvalTransform, SegmentationFolder, SegTrainTransform, class_names
from util.seg_metrics import ConfusionMatrix, per_class_table, scores_for_log, segmentation_scores

PER_CLASS_TABLE = "per_class_iou.md"


@dataclass(frozen=True)
class SegmentConfig(TrainConfig):
    """main_segment.py's flags, resolved. `epochs` counts evaluation intervals (--iters / --eval_interval) and
    `warmup_epochs` is --warmup_iters in intervals: what the run layer counts in."""
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

    RESUME_MUST_MATCH: ClassVar[Tuple[str, ...]] = TrainConfig.RESUME_MUST_MATCH + (
        "iters", "warmup_iters", "eval_interval", "nb_classes", "reduce_zero_label", "layer_decay", "drop_path",
        "decoder_channels", "aux_weight", "warmup_ratio", "poly_power", "betas", "out_indices", "pool_scales",
        "head_dropout", "aux_in_index", "aux_channels", "ignore_index", "img_scale", "ratio_range", "cat_max_ratio",
        "flip_prob", "photometric",
        # the best checkpoint is chosen by comparing the intervals' scores: they must be measured the same way
        "eval_mode", "eval_crop_size", "eval_stride", "aug_test", "aug_test_ratios")
    RESUME_MAY_CHANGE: ClassVar[Dict[str, str]] = {
        **TrainConfig.RESUME_MAY_CHANGE,
        "save_freq": "which periodic checkpoints are kept",
        "keep_last": "how many periodic checkpoints are kept",
        "eval_batch_size": "the same scores in batches of any size",
        "eval": "an evaluation loads the weights only, and may change anything",
        "finetune": "only the first start loads it: a resumed run's weights come from its checkpoint",
        "checkpoint_key": "only the first start reads --finetune",
    }

    def lr_at(self, progress: float) -> float:
        """The lr at `progress` intervals: mmseg's poly decay over --iters with its linear warmup."""
        return poly_lr(progress * self.eval_interval, self.lr, self.iters, self.poly_power, self.min_lr,
                       self.warmup_iters, self.warmup_ratio)

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
def validate_args(args) -> argparse.Namespace:
    """The checks of main_segment.py's flags (training.flags.segmentation_parser): fails before any work, naming the
    flag; returns a copy of `args` with the run layer's epochs (evaluation intervals) and warmup in them (`args`
    itself is left as it is)."""
    for flag in ("iters", "eval_interval", "decoder_channels", "aux_channels", "nb_classes", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise flag_error(f"--{flag}", f"must be >= 1, got {getattr(args, flag)}")
    for flag in ("save_freq", "keep_last", "aux_weight", "min_lr"):
        if getattr(args, flag) < 0:
            raise flag_error(f"--{flag}", f"must be >= 0, got {getattr(args, flag)}")
    if args.iters % args.eval_interval:
        raise flag_error("--iters", f"{args.iters} must be a multiple of --eval_interval {args.eval_interval} (the "
                                    f"run evaluates and checkpoints at the end of each interval)")
    if not 0 <= args.warmup_iters <= args.iters:
        raise flag_error("--warmup_iters", f"must be in [0, --iters {args.iters}], got {args.warmup_iters}")
    if not 0 <= args.warmup_ratio <= 1:
        raise flag_error("--warmup_ratio", f"must be in [0, 1], got {args.warmup_ratio}")
    if not args.poly_power > 0:
        raise flag_error("--poly_power", f"must be > 0, got {args.poly_power}")
    if not 0 < args.layer_decay <= 1:
        raise flag_error("--layer_decay", f"must be in (0, 1], got {args.layer_decay}")
    if not all(0 <= b < 1 for b in args.betas):
        raise flag_error("--betas", f"must be in [0, 1), got {args.betas}")
    for flag in ("drop_path", "head_dropout"):
        if not 0 <= getattr(args, flag) < 1:
            raise flag_error(f"--{flag}", f"must be in [0, 1), got {getattr(args, flag)}")
    if min(args.pool_scales) < 1:
        raise flag_error("--pool_scales", f"must be >= 1, got {args.pool_scales}")
    if args.ignore_index < args.nb_classes:
        raise flag_error("--ignore_index", f"{args.ignore_index} is one of the {args.nb_classes} classes "
                                           f"(--nb_classes); it must be >= {args.nb_classes}")
    if min(args.img_scale) < 1:
        raise flag_error("--img_scale", f"must be positive, got {args.img_scale}")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise flag_error("--ratio_range", f"must be LOW HIGH with 0 < LOW <= HIGH, got {args.ratio_range}")
    if not 0 < args.cat_max_ratio <= 1:
        raise flag_error("--cat_max_ratio", f"must be in (0, 1], got {args.cat_max_ratio}")
    if not 0 <= args.flip_prob <= 1:
        raise flag_error("--flip_prob", f"must be in [0, 1], got {args.flip_prob}")
    if args.eval_crop_size is not None and args.eval_crop_size < 1:
        raise flag_error("--eval_crop_size", f"must be >= 1, got {args.eval_crop_size}")
    crop = args.eval_crop_size or args.input_size
    if args.eval_stride is not None and not 1 <= args.eval_stride <= crop:
        raise flag_error("--eval_stride", f"must be in [1, the window {crop}], got {args.eval_stride}")
    if min(args.aug_test_ratios) <= 0:
        raise flag_error("--aug_test_ratios", f"must be positive, got {args.aug_test_ratios}")
    check_pretrained_flag(args.finetune)
    if args.eval and not args.resume:
        raise flag_error("--eval", "needs --resume: the checkpoint of a segmentation run to evaluate")
    world_size = launch_world_size()
    if args.batch_size * world_size < 2:
        raise flag_error("--batch_size", f"{args.batch_size} x {world_size} processes gives BatchNorm one image per "
                                         f"step, and the PPM's 1 x 1 pooling one value per channel: use 2 or more "
                                         f"images per step (over all processes)")
    epochs = args.iters // args.eval_interval
    derived = argparse.Namespace(**{**vars(args), "epochs": epochs,
                                    "warmup_epochs": args.warmup_iters / args.eval_interval})
    check_run_flags(derived)
    check_classifier_name(args.model)
    return derived


def resolve_config(args):
    """(config, lr line): the flags checked, with the lr (blr x total batch / 256 unless --lr), the precision, the
    evaluation window and stride resolved for the launch's device and world size."""
    args = validate_args(args)
    device, world_size = resolve_device(args.device), launch_world_size()
    images_per_step = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * images_per_step / 256
    line = (f"lr = {lr:.4g} (given)" if args.lr is not None else
            f"lr = blr {args.blr:.3g} x {images_per_step} images / 256 = {lr:.4g}")
    crop = args.eval_crop_size or args.input_size
    stride = args.eval_stride or max(1, crop * 2 // 3)
    cfg = SegmentConfig.from_args(args, lr=lr, amp=resolve_amp(args.amp, device)[0], world_size=world_size,
                                  eval_crop_size=crop, eval_stride=stride)
    return cfg, line


def build_segmenter(cfg: SegmentConfig, **layout) -> UperNet:
    """UperNet on --model's multi-scale features (timm features_only, any input size that is a multiple of the
    stride), as the flags say; `layout`: build arguments a checkpoint's encoder needs (architecture_kwargs)."""
    return create_upernet(cfg.model, cfg.nb_classes, out_indices=cfg.out_indices, channels=cfg.decoder_channels,
                          aux_in_index=cfg.aux_in_index if cfg.aux_weight > 0 else None,
                          aux_channels=cfg.aux_channels, pool_scales=cfg.pool_scales, dropout=cfg.head_dropout,
                          img_size=cfg.input_size, dynamic_img_size=True, drop_path_rate=cfg.drop_path, **layout)


def segmenter_layout(checkpoint: str) -> dict:
    """The encoder build arguments a segmentation checkpoint's weights need (util.checkpoint.architecture_kwargs for
    a UperNet's): `class_token=True` when its encoder has MAE's / timm's ViT class token. Reads only the keys."""
    keys = load_checkpoint(checkpoint, mmap=True)["model"]
    return {"class_token": True} if "backbone.model.cls_token" in keys else {}


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
        raise SystemExit(f"error: {err}") from None


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


def segmentation_loaders(run: Run, cfg: SegmentConfig):
    """(training loader or None with --eval, validation loader, class names). Training draws --eval_interval x
    --accum_iter batches per epoch of the run from an endless seeded stream; validation is sharded over the
    processes without padding."""
    pin = cfg.pin_mem and run.device.type == "cuda"
    val_set = segmentation_folder(cfg, "validation", SegEvalTransform(tuple(cfg.img_scale)))
    try:
        names = class_names(cfg.data_path, cfg.nb_classes)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    val = eval_loader(val_set, cfg.eval_batch_size, run.dist, True, cfg.num_workers, pin,
                      EvalCollate(cfg.eval_batch_size))
    if cfg.eval:
        print(f"validation: {len(val_set)} images in {cfg.data_path}")
        return None, val, names
    train_set = segmentation_folder(cfg, "training", train_transform(cfg))
    if len(train_set) < run.world_size:
        raise SystemExit(f"error: {run.world_size} processes need at least one training image each; "
                         f"{cfg.data_path}/images/training has {len(train_set)}")
    print(f"training: {len(train_set)} images, validation: {len(val_set)} images, {cfg.nb_classes} classes")
    print(f"training crops: {train_set.transform}")
    train = stream_loader(train_set, cfg.batch_size, cfg.seed, run.dist, cfg.num_workers, pin,
                          cfg.micro_batches_per_interval, skip_bad_collate)
    return train, val, names


# -- training ---------------------------------------------------------------------------------------------------------
def full_batch(images, labels, batch_size: int, crop_size: int, ignore_index: int):
    """(images, labels, weight, readable) of a training batch that lost `batch_size - readable` samples to bad files:
    topped up with blank crops whose pixels are all ignored. Every step then keeps its shape, as DDP and the
    synchronised BatchNorm need on every process (and the PPM's 1 x 1 pooling needs two or more values), and the
    blank crops add nothing to the loss; a batch with no readable sample has weight 0 (engine_pretrain's rule)."""
    readable = 0 if images is None else len(images)
    missing = batch_size - readable
    if missing == 0:
        return images, labels, 1.0, readable
    blank_images = torch.zeros(missing, 3, crop_size, crop_size)
    blank_labels = torch.full((missing, crop_size, crop_size), ignore_index, dtype=torch.int64)
    if images is not None:
        blank_images, blank_labels = torch.cat([images, blank_images]), torch.cat([labels, blank_labels])
    return blank_images, blank_labels, float(readable > 0), readable


def train_one_interval(model: torch.nn.Module, step: TrainStep, loader, interval: int, cfg: SegmentConfig,
                       progress: Progress, writer=None) -> Dict[str, float]:
    """Trains the micro-batches of one evaluation interval that `progress` tracks (its names: cfg.loss_names) on
    `(images, labels, num_bad)` batches; returns the interval's mean losses, lr and counts over all ranks."""
    model.train()
    per_interval = cfg.micro_batches_per_interval
    for it, (images, labels, num_bad) in progress.track(loader):
        images, labels, weight, readable = full_batch(images, labels, cfg.batch_size, cfg.input_size,
                                                      cfg.ignore_index)
        progress.count(readable, bad_images=num_bad, empty_batches=int(weight == 0))
        images = images.to(step.device, non_blocking=True)
        labels = labels.to(step.device, non_blocking=True)

        def forward():
            logits, aux = model(images)
            losses = segmentation_loss(logits, labels, aux, cfg.aux_weight, cfg.ignore_index)
            return losses["loss"], {k: v.detach() for k, v in losses.items() if k != "loss"}

        losses = step(forward, interval + it / per_interval, interval * per_interval + it, weight)
        if losses is not None:
            progress.losses.add(*losses)
        if progress.due(it):
            log_window(step, progress, it, interval, writer)
    stats = {"bad_images": 0, "empty_batches": 0, **progress.totals()}
    stats["lr"] = step.lr
    summary = "  ".join(f"{n} {stats[n]:.4f}" for n in cfg.loss_names) + f"  {stats['images']} images"
    if stats["bad_images"]:
        summary += (f", {stats['bad_images']} unreadable pairs skipped ({stats['empty_batches']} batches had none "
                    f"readable)")
    print(f"{progress.header} {'stopped' if progress.stopped else 'done'}: {summary}; {progress.summary()}", flush=True)
    return stats


# -- evaluation -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: UperNet, loader, device: torch.device, cfg: SegmentConfig) -> Dict[str, object]:
    """Scores of every validation image the loader gives this process, summed over the processes (each image once:
    the loader shards without padding): segmentation_scores' aAcc, mIoU, mAcc, per-class IoU / Acc, and the counts
    of images evaluated and of unreadable pairs skipped."""
    model.eval()
    matrix = ConfusionMatrix(cfg.nb_classes, device, cfg.ignore_index)
    counts = torch.zeros(2, dtype=torch.float64)  # images evaluated, pairs skipped
    progress = Progress("Test", len(loader), cfg.print_freq, device)
    for it, (images, labels, num_bad) in progress.track(loader):
        counts[1] += num_bad
        if images is not None:  # None: no readable pair in the batch (each was named in a warning)
            progress.count(len(images))
            counts[0] += len(images)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(device, cfg.amp_dtype):
                probs = model.predict(images, labels.shape[-2:], cfg.eval_mode, cfg.eval_crop_size,
                                      cfg.eval_stride, cfg.test_ratios, cfg.aug_test)
            matrix.update(probs.argmax(1), labels)
        if progress.due(it):
            progress.line(it)
    matrix.all_reduce()
    images, bad = all_reduce_sum(counts.to(device)).tolist()
    if images == 0:
        raise SystemExit(f"error: no validation image could be read ({int(bad)} pairs failed, see the warnings "
                         f"above); check --data_path {cfg.data_path}")
    scores = segmentation_scores(matrix.matrix)
    scores.update(images=int(images), bad_images=int(bad))
    return scores


def report(scores: Dict[str, object]) -> str:
    line = (f"mIoU {scores['mIoU']:.2f}  mAcc {scores['mAcc']:.2f}  aAcc {scores['aAcc']:.2f} on "
            f"{scores['images']} images")
    if scores["bad_images"]:
        line += f" ({scores['bad_images']} unreadable pairs skipped)"
    return line


def score_record(scores: Dict[str, object], names: Sequence[str]) -> dict:
    """The log.txt entries of an evaluation: test_aAcc, test_mIoU, test_mAcc, test_IoU {class: IoU or null}, and the
    counts."""
    record = {f"test_{k}": v for k, v in scores_for_log(scores, names).items()}
    record.update(test_images=scores["images"], test_bad_images=scores["bad_images"])
    return record


def write_per_class_table(cfg: SegmentConfig, scores: Dict[str, object], names: Sequence[str], title: str) -> str:
    """Writes the per-class table (markdown) to --output_dir/per_class_iou.md, replacing the previous one."""
    path = os.path.join(cfg.output_dir, PER_CLASS_TABLE)
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{cfg.evaluation_line()}\n\n{per_class_table(scores, names)}\n")
    return path


def evaluate_checkpoint(run: Run, cfg: SegmentConfig, model: UperNet, val_loader, names) -> Dict[str, object]:
    """--eval: the weights of --resume on the validation set; the scores go to log.txt and the per-class table."""
    run.resume(None, model, auto=False)
    print(f"evaluation: {cfg.evaluation_line()}")
    scores = evaluate(model, val_loader, run.device, cfg)
    print(report(scores))
    if run.is_main:
        path = write_per_class_table(cfg, scores, names, f"{cfg.resume}")
        with open(os.path.join(cfg.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps({"eval": cfg.resume, **score_record(scores, names)}) + "\n")
        print(f"per-class IoU: {path}")
    return scores


def train_and_evaluate(run: Run, cfg: SegmentConfig, model: torch.nn.Module, state: TrainState, loaders,
                       names: Sequence[str]) -> Dict[str, object]:
    """The intervals of a run: train --eval_interval iterations, evaluate, keep checkpoint-last.pth and
    checkpoint-best.pth (best mIoU), log.txt, TensorBoard and the per-class table. `model` is what trains (DDP
    when distributed); `state.model` is the UperNet itself. Returns the last evaluation."""
    train_loader, val_loader = loaders
    start = run.resume(state)
    best = run.saved.get("best_mIoU")
    per_interval = cfg.micro_batches_per_interval
    print(f"evaluation every {cfg.eval_interval} iterations: {cfg.evaluation_line()}")
    scores = {}
    for interval in run.epochs(start, train_loader):
        first, last = interval * cfg.eval_interval, (interval + 1) * cfg.eval_interval
        progress = run.progress(interval, per_interval, cfg.loss_names, header=f"Iterations {first}-{last}")
        try:
            train_stats = train_one_interval(model, state.step, train_loader, interval, cfg, progress, run.writer)
        except NonFiniteLossError as err:
            raise SystemExit(f"error: {err}") from None
        run.stop_if_requested(state, interval, progress, best_mIoU=best)
        if train_stats["images"] == 0:  # every rank agrees: the counts are summed over ranks
            raise SystemExit(f"error: no training image of iterations {first}-{last} could be read "
                             f"({train_stats['bad_images']} pairs failed, see the warnings above); check --data_path "
                             f"{cfg.data_path}")
        scores = evaluate(state.model, val_loader, run.device, cfg)
        is_best = best is None or scores["mIoU"] > best
        best = scores["mIoU"] if is_best else best
        print(f"iteration {last}: {report(scores)}; best mIoU {best:.2f}")
        if run.writer is not None:
            for k in ("mIoU", "mAcc", "aAcc"):
                run.writer.add_scalar(f"test/{k}", scores[k], (interval + 1) * 1000)  # the training scalars' axis
            for name, iou in scores_for_log(scores, names)["IoU"].items():
                if iou is not None:  # a class that the validation images never show has no IoU
                    run.writer.add_scalar(f"test_IoU/{name}", iou, (interval + 1) * 1000)
        if run.is_main:
            write_per_class_table(cfg, scores, names, f"iteration {last}")
        record = {"iteration": last, **{f"train_{k}": v for k, v in train_stats.items()},
                  **score_record(scores, names), "best_mIoU": best}
        run.end_epoch(state, interval, record, best=is_best, best_mIoU=best)
    if best is not None:
        print(f"best mIoU {best:.2f}; per-class IoU of the last evaluation: "
              f"{os.path.join(cfg.output_dir, PER_CLASS_TABLE)}")
    return scores


def encoder_of(model: UperNet) -> torch.nn.Module:
    """The timm encoder inside the UperNet's features_only backbone (what --finetune's weights load into)."""
    encoder = getattr(model.backbone, "model", None)
    if encoder is None:
        raise TypeError(f"the backbone is a {type(model.backbone).__name__}, not a timm features_only wrapper")
    return encoder


def count_parameters(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6

