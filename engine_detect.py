"""Object detection and instance segmentation on a pre-trained encoder: the config, the flags' checks, the data, and
the task of the training loop (training.loop): Mask R-CNN's losses, and COCO's box and mask AP.

The recipe is iteration-based (detectron2's, as ConvMAE's DET trains): `--iters` optimizer steps of large-scale
jittered crops drawn from an endless seeded stream of the training images (training.data.stream_loader), evaluated
and checkpointed every `--eval_interval` of them and at the last; the lr is a cosine over the iterations with
detectron2's multiplicative linear warmup (`DetectConfig.lr_at`).
"""
import argparse
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from models_maskrcnn import LOSS_NAMES, create_mask_rcnn, detection_loss
from training.config import TrainConfig
from training.data import eval_loader, stream_loader
from training.distributed import broadcast_from_main, launch_world_size, note_collective
from training.errors import RunError, flag_error
from training.flags import check_run_flags, detection_parser, detection_split_paths
from training.loop import Schedule, Task, evaluate_checkpoint, fit
from training.meters import Progress
from training.run import Run
from training.transfer import check_transfer_flags, dense_options, scaled_lr, simple_pyramid
from training.step import autocast_context
from util.coco import CocoDetection, detection_collate
from util.det_metrics import (coco_evaluate, coco_ground_truth, coco_records, gather_records, scores_for_log,
                              write_results)
from util.det_transforms import DetEvalTransform, DetTrainTransform
from util.misc import resolve_amp, resolve_device

RESULTS_FILE = "coco_results.json"
NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
NO_DECAY_NAMES = ("pos_embed", "relative_position_bias_table", "rel_pos")  # as the recipe's optimizer overrides


@dataclass(frozen=True)
class DetectConfig(TrainConfig):
    """main_detect.py's flags, resolved."""
    iters: int
    warmup_length: float
    warmup_factor: float
    eval_interval: int
    save_freq: int
    keep_last: int
    drop_path: float
    fpn_channels: int
    rois_per_image: int
    rel_pos_bias: bool
    layer_scale: Optional[float]
    simple_pyramid: bool  # resolved: on for a plain ViT unless given
    window_size: int
    global_blocks: list
    betas: list
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    scale_range: list
    flip_prob: float
    eval: bool
    eval_batch_size: int
    finetune: str
    checkpoint_key: str

    def lr_at(self, iteration: float) -> float:
        """The lr after `iteration` optimizer steps: a half-cosine from --lr to --min_lr over --iters, multiplied
        during the first --warmup_length of them by a factor rising linearly from --warmup_factor to 1 (detectron2's
        WarmupParamScheduler on a CosineParamScheduler)."""
        t = min(max(iteration / self.iters, 0.0), 1.0)
        lr = self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        if t < self.warmup_length:
            alpha = t / self.warmup_length
            lr *= self.warmup_factor * (1.0 - alpha) + alpha
        return lr

    @property
    def schedule(self) -> Schedule:
        """--iters optimizer steps in rounds of --eval_interval (the last one shorter when they do not divide)."""
        return Schedule(self.iters, self.eval_interval, self.accum_iter, unit="iteration")

    def split_paths(self, split: str):
        """(image folder, annotation file) of "train" or "val": the flags', else COCO 2017's under --data_path."""
        return detection_split_paths(self, split)


def validate_args(args) -> argparse.Namespace:
    """The checks of main_detect.py's flags (training.flags.detection_parser): fails before any work, naming the
    flag; returns `args` unchanged."""
    check_run_flags(detection_parser(), args)  # each flag's range, as declared
    if not args.scale_range[0] <= args.scale_range[1]:
        raise flag_error("--scale_range", f"must be LOW HIGH with LOW <= HIGH, got {args.scale_range}")
    check_transfer_flags(args, "detection")
    if args.global_blocks and not args.window_size:
        raise flag_error("--global_blocks", "names the blocks that do not attend in windows: it needs --window_size")
    return args


def resolve_config(args):
    """(config, lr line): the flags checked, with the lr (blr x total batch / 256 unless --lr) and the precision
    resolved for the launch's device and world size."""
    args = validate_args(args)
    device, world_size = resolve_device(args.device), launch_world_size()
    lr, line = scaled_lr(args, world_size)
    cfg = DetectConfig.from_args(args, detection_parser(), lr=lr, amp=resolve_amp(args.amp, device)[0],
                                 world_size=world_size, simple_pyramid=simple_pyramid(args))
    return cfg, line


# -- model and data ---------------------------------------------------------------------------------------------------
def build_detector(cfg: DetectConfig, num_classes: int, **layout) -> torch.nn.Module:
    """Mask R-CNN on --model's multi-scale features for `num_classes` classes; `layout`: build arguments a
    checkpoint's encoder needs (dmjd_encoders.pretrained.architecture_kwargs)."""
    dense = dict(dense_options(cfg), window_size=cfg.window_size, global_blocks=tuple(cfg.global_blocks))
    return create_mask_rcnn(cfg.model, num_classes, cfg.input_size, cfg.fpn_channels, cfg.rois_per_image,
                            img_size=cfg.input_size, dynamic_img_size=True, drop_path_rate=cfg.drop_path, **dense,
                            **layout)


def detection_optimizer(model: torch.nn.Module, cfg: DetectConfig) -> torch.optim.AdamW:
    """AdamW (--lr, --betas, --weight_decay) without weight decay on norm layers, position embeddings and
    relative-position tables (detectron2's get_default_optimizer_params with the recipe's overrides; biases decay)."""
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            skip = isinstance(module, NORM_TYPES) or any(key in full for key in NO_DECAY_NAMES)
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def detection_folder(cfg: DetectConfig, split: str, transform, train: bool) -> CocoDetection:
    images, annotations = cfg.split_paths(split)
    try:
        dataset = CocoDetection(images, annotations, transform, train=train, with_masks=train)
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err)) from None
    if dataset.invalid_annotations:
        print(f"{annotations}: {len(dataset.invalid_annotations)} invalid annotations skipped (named in the "
              f"warnings above)")
    return dataset


def detection_loaders(run: Run, cfg: DetectConfig):
    """(training loader or None with --eval, validation loader, the validation set). Training draws --eval_interval
    x --accum_iter batches per round from an endless seeded stream; validation is sharded without padding."""
    pin = cfg.pin_mem and run.device.type == "cuda"
    val_set = detection_folder(cfg, "val", DetEvalTransform(cfg.input_size), train=False)
    val = eval_loader(val_set, cfg.eval_batch_size, run.dist, True, cfg.num_workers, pin, detection_collate)
    if cfg.eval:
        print(f"validation: {len(val_set)} images, {len(val_set.class_names)} classes")
        return None, val, val_set
    transform = DetTrainTransform(cfg.input_size, tuple(cfg.scale_range), cfg.flip_prob)
    train_set = detection_folder(cfg, "train", transform, train=True)
    if train_set.class_names != val_set.class_names:
        raise RunError(f"the training and validation annotation files name other classes: {train_set.class_names} "
                       f"and {val_set.class_names}")
    if len(train_set) < run.world_size:
        raise RunError(f"{run.world_size} processes need at least one training image with instances each; "
                       f"{cfg.split_paths('train')[1]} has {len(train_set)}")
    print(f"training: {len(train_set)} images with instances, validation: {len(val_set)} images, "
          f"{len(val_set.class_names)} classes")
    train = stream_loader(train_set, cfg.batch_size, cfg.seed, run.dist, cfg.num_workers, pin,
                          cfg.eval_interval * cfg.accum_iter, detection_collate)
    return train, val, val_set


# -- the task ---------------------------------------------------------------------------------------------------------
class DetectTask(Task):
    """Detection as the loop sees it: Mask R-CNN (its BatchNorms made of the run's processes), AdamW, the RPN and
    RoI heads' losses, and COCO's box and mask AP (the best checkpoint: the best box AP, `best_bbox_AP`). Batches are
    `(images, targets, num_bad)` lists of uint8 images and torchvision targets (util.coco.detection_collate); a
    batch with no readable image trains as one blank image without instances, of weight 0. After each evaluation
    the main process writes the COCO results JSON to --output_dir. A checkpoint keeps the class names it was trained
    on (`classes`)."""
    loss_names = LOSS_NAMES
    best = "bbox_AP"

    def __init__(self, model: torch.nn.Module, cfg: DetectConfig, device: torch.device, val_set: CocoDetection):
        self.model, self.trained, self.cfg, self.device, self.val_set = model, model, cfg, device, val_set
        self.ground_truth = coco_ground_truth(val_set.coco_data)

    def optimizer(self) -> torch.optim.AdamW:
        return detection_optimizer(self.model, self.cfg)

    def placeholder(self):
        size = self.cfg.input_size
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                 "masks": torch.zeros(0, size, size, dtype=torch.uint8)}
        return [torch.zeros(3, size, size, dtype=torch.uint8)], [empty]

    def model_input(self, images) -> list:
        """uint8 [3, H, W] images as the model takes them: float in [0, 1] on the device."""
        return [image.to(self.device, non_blocking=True).float().div_(255) for image in images]

    def prepare(self, images, targets):
        images = self.model_input(images)
        keys = ("boxes", "labels", "masks")
        targets = [{k: t[k].to(self.device, non_blocking=True) for k in keys} for t in targets]
        return images, targets, len(images)

    def loss(self, images, targets):
        return detection_loss(self.trained(images, targets))

    def evaluate_batches(self, loader, progress: Progress) -> Dict[str, object]:
        records, image_ids = [], []
        for it, (images, targets, _) in progress.track(loader):
            if images is not None:  # None: no readable image in the batch (each was named in a warning)
                progress.count(len(images))
                with autocast_context(self.device, self.cfg.amp_dtype):
                    outputs = self.model(self.model_input(images))
                records += coco_records(outputs, targets, self.val_set.category_ids)
                image_ids += [int(t["image_id"]) for t in targets]
            if progress.due(it):
                progress.line(it)
        note_collective("the gathering of the evaluation's detections")
        records, image_ids = gather_records(records, image_ids)
        scores = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_results(records, os.path.join(self.cfg.output_dir, RESULTS_FILE))
            scores = scores_for_log(coco_evaluate(self.ground_truth, records, image_ids=image_ids))
            scores.update(images=len(image_ids), detections=len(records))
        # every process takes the same best-checkpoint decision
        return broadcast_from_main(scores, "the sending of the main process's COCO scores")

    def report(self, scores: Dict[str, object]) -> str:
        def shown(prefix):
            parts = [f"{name} {_percent(scores[f'{prefix}_{name}'])}" for name in ("AP", "AP50", "AP75")]
            sizes = "/".join(_percent(scores[f"{prefix}_AP{s}"]) for s in "sml")
            return "  ".join(parts) + f"  APs/m/l {sizes}"
        return (f"box {shown('bbox')};  mask {shown('segm')} on {scores['images']} images "
                f"({scores['detections']} detections)")

    def log_scores(self, writer, scores: Dict[str, object], x: int) -> None:
        for name, value in scores.items():
            if value is not None and name not in ("images", "detections"):
                writer.add_scalar(f"test/{name}", value, x)

    def extra_state(self) -> dict:
        return {"classes": list(self.val_set.class_names)}

    def load_extra_state(self, checkpoint: dict, path: str) -> None:
        saved = checkpoint.get("classes")
        if saved is not None and list(saved) != list(self.val_set.class_names):
            raise RunError(f"{path} was trained on other classes ({len(saved)}: {saved[:5]}...) than the annotation "
                           f"files name ({len(self.val_set.class_names)}: {self.val_set.class_names[:5]}...)")


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The timm encoder inside Mask R-CNN's backbone (what --finetune's weights load into)."""
    return model.backbone.body.model if hasattr(model.backbone.body, "model") else model.backbone.body


def run_detection(run: Run, cfg: DetectConfig, task: DetectTask, loaders) -> Dict[str, object]:
    """--eval of --resume, or the run's intervals (training.loop.fit). Returns the last evaluation."""
    train_loader, val_loader = loaders
    if cfg.eval:
        scores = evaluate_checkpoint(run, task, val_loader, cfg.resume)
        print(task.report(scores))
        return scores
    print(f"evaluation every {cfg.eval_interval} iterations and at the last, COCO's box and mask AP; results in "
          f"{os.path.join(cfg.output_dir, RESULTS_FILE)}")
    return fit(run, task, cfg, train_loader, val_loader, cfg.schedule, lr_at=cfg.lr_at)
