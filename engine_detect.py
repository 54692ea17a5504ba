"""Object detection and instance segmentation on a pre-trained encoder: the config, the flags' checks and the recipes
they resolve, the data, and the task of the training loop (training.loop): Mask R-CNN's losses, and COCO's box and
mask AP.

The recipe is iteration-based (detectron2's, as ConvMAE's DET and ViTDet train): `--iters` optimizer steps of
large-scale jittered crops drawn from an endless seeded stream of the training images (training.data.stream_loader),
evaluated and checkpointed every `--eval_interval` of them and at the last. `--recipe` names the schedule and the
optimizer (DETECTION_RECIPES: ConvMAE-B's 25-epoch cosine for a ConViT, ViTDet's 100-epoch step
schedule with layer-wise lr decay for a ViT); the backbone follows the model's family (models_maskrcnn). Every value
a flag leaves to the recipe or the model is resolved once here and printed at the start.
"""
import argparse
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from timm.models import group_parameters

from dmjd_encoders.dense import detection_attention
from dmjd_encoders.models_convvit import (check_classifier_name, is_plain_vit, matcher_without_tail,
                                          transformer_depth)
from dmjd_encoders.pretrained import saved_args
from models_maskrcnn import LOSS_NAMES, create_mask_rcnn, detection_loss
from training.config import TrainConfig
from training.data import eval_loader, stream_loader
from training.distributed import broadcast_from_main, gather_shards, launch_world_size, on_main_process
from training.errors import RunError, flag_error
from training.flags import check_run_flags
from training.loop import Schedule, evaluate_checkpoint, fit
from training.run import Run
from training.task import Evaluator, Task
from training.transfer import check_transfer_flags, count_parameters, model_from_checkpoints, on_run_device
from util.coco import CocoDetection, detection_collate
from util.det_metrics import coco_evaluate, coco_ground_truth, coco_records, scores_for_log, write_results
from util.det_transforms import DetEvalTransform, DetTrainTransform
from util.layouts import detection_split_paths
from util.misc import resolve_amp, resolve_device
from util.schedules import detectron_lr, scaled_lr

# The detection recipes (main_detect.py --recipe) and the flags they set where the flag is not given. ConvMAE-B's
# 25-epoch COCO config (DET/configs/convmae/convmae_base_mask_rcnn_FPN_25ep.py: 368,750 / 4 iterations of 32 images,
# evaluated every 3,688; lr 8e-5, cosine) for a ConViT; ViTDet's 100-epoch config (detectron2 projects/ViTDet/configs/
# COCO/mask_rcnn_vitdet_b_100ep.py: 184,375 iterations of 64 images, lr 1e-4 x0.1 at 163,889 and 177,546, 250 warmup
# iterations, layer-wise lr decay 0.7; eval_period 5,000 of detectron2's common train config) for a ViT.
# "per GPU" batch sizes are for one 8-GPU node.
DETECTION_RECIPES = {
    "convmae": dict(iters=92187, eval_interval=3688, batch_size=4, accum_iter=1, blr=6.4e-4, lr_schedule="cosine",
                    lr_steps=None, warmup_length=0.005, layer_decay=1.0, drop_path=0.1),
    # 64 images per step as 1 image x 8 GPUs x 8 accumulated micro-batches (ViTDet: 1 image on each of 64 GPUs; about
    # 11 GB each for ViT-B at 1024 px, 21 GB for ViT-L; LayerNorm throughout, so accumulating changes nothing)
    "vitdet": dict(iters=184375, eval_interval=5000, batch_size=1, accum_iter=8, blr=4e-4, lr_schedule="step",
                   lr_steps=[163889 / 184375, 177546 / 184375], warmup_length=250 / 184375, layer_decay=0.7,
                   drop_path=0.1),
}
# ViTDet's larger ViTs (mask_rcnn_vitdet_l_100ep.py, _h_75ep.py): by the transformer's depth
VITDET_BY_DEPTH = {24: dict(layer_decay=0.8, drop_path=0.4), 32: dict(layer_decay=0.9, drop_path=0.5)}
RESULTS_FILE = "coco_results.json"
NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
# parameters without weight decay besides the norms', as each recipe's optimizer overrides say (biases decay)
NO_DECAY_NAMES = {"convmae": ("pos_embed", "relative_position_bias_table"), "vitdet": ("pos_embed",)}
# A checkpoint of main_detect.py has --rois_per_image among its flags; one of the detector before it followed ConvMAE's
# DET and ViTDet (torchvision's losses, boxes and geometry, ConViT's conv stride-32 level, an FPN on the ViT's
# pyramid) lacks --recipe.
DETECTION_FLAG, DETECTOR_FLAG = "rois_per_image", "recipe"


@dataclass(frozen=True)
class DetectConfig(TrainConfig):
    """main_detect.py's flags, resolved (the recipe's values where a flag was not given)."""
    recipe: str
    iters: int
    lr_schedule: str
    lr_steps: Optional[list]
    warmup_length: float
    warmup_factor: float
    eval_interval: int
    save_freq: int
    keep_last: int
    drop_path: float
    layer_decay: float
    fpn_channels: int
    rois_per_image: int
    window_size: int
    global_blocks: list
    rel_pos: str
    pos_embed: str
    layer_scale: Optional[float]
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
        """The lr after `iteration` optimizer steps: detectron2's cosine (to --min_lr) or step schedule over --iters,
        multiplied during the first --warmup_length of them by a factor rising linearly from --warmup_factor to 1
        (util.schedules.detectron_lr)."""
        return detectron_lr(iteration / self.iters, self.lr, self.lr_schedule, self.min_lr, self.lr_steps or (),
                            self.warmup_length, self.warmup_factor)

    def schedules(self, round_steps: int) -> Dict[str, Callable[[float], float]]:
        return {"lr": self.lr_at}

    @property
    def schedule(self) -> Schedule:
        """--iters optimizer steps in rounds of --eval_interval (the last one shorter when they do not divide)."""
        return Schedule(self.iters, self.eval_interval, self.accum_iter, unit="iteration")

    def split_paths(self, split: str):
        """(image folder, annotation file) of "train" or "val": the flags', else COCO 2017's under --data_path."""
        return detection_split_paths(self, split)

    def encoder_options(self) -> dict:
        """The encoder's build options (dmjd_encoders.dense) for its detection backbone."""
        return dict(window_size=self.window_size, global_blocks=tuple(self.global_blocks),
                    rel_pos_bias=self.rel_pos != "none",
                    rel_pos_layout="per_block" if self.rel_pos == "none" else self.rel_pos,
                    layer_scale=self.layer_scale, learnable_pos_embed=self.pos_embed == "learned",
                    drop_path_rate=self.drop_path)

    def describe(self) -> str:
        """The resolved recipe and backbone, as the run prints them."""
        vitdet = is_plain_vit(self.model)
        if self.lr_schedule == "step":
            schedule = "step lr, x0.1 at " + " and ".join(str(round(s * self.iters)) for s in self.lr_steps or ())
        else:
            schedule = f"cosine lr to {self.min_lr:g}"
        windows = (f"{self.window_size} x {self.window_size} windows, global blocks "
                   f"{' '.join(map(str, self.global_blocks)) or 'none'}" if self.window_size else "global attention")
        return (f"recipe {self.recipe}: {self.iters} iterations, {schedule}, warmup over "
                f"{round(self.warmup_length * self.iters)} from x{self.warmup_factor:g}, layer-wise lr decay "
                f"{self.layer_decay:g}, drop path {self.drop_path:g}"
                f"\nbackbone ({'ViTDet' if vitdet else 'ConvMAE DET'}): {windows}; relative positions {self.rel_pos}; "
                f"position embedding {self.pos_embed}; " +
                ("simple pyramid without FPN, LayerNorm heads" if vitdet else
                 "stride-32 level by max pooling, FPN and heads with BatchNorm"))


def recipe_values(args) -> Dict[str, object]:
    """The flags left to the recipe or to the model (None), resolved: --recipe by the model's family (convmae for a
    ConViT, vitdet for a ViT), each flag of DETECTION_RECIPES from it (ViTDet's larger models by their depth), the
    attention's windows and global blocks, relative positions and position embedding by the model's family and
    depth (dmjd_encoders.dense.detection_attention)."""
    check_classifier_name(args.model)
    vitdet, depth = is_plain_vit(args.model), transformer_depth(args.model)
    recipe = args.recipe or ("vitdet" if vitdet else "convmae")
    defaults = dict(DETECTION_RECIPES[recipe])
    if recipe == "vitdet":
        defaults.update(next((v for d, v in sorted(VITDET_BY_DEPTH.items(), reverse=True) if depth >= d), {}))
    window, global_blocks = detection_attention(vitdet, depth)
    window = window if args.window_size is None else args.window_size
    defaults.update(window_size=window, global_blocks=list(global_blocks) if window else [],
                    rel_pos="decomposed" if vitdet else "shared", pos_embed="learned" if vitdet else "frozen")
    resolved = {name: value if getattr(args, name) is None else getattr(args, name) for name, value in defaults.items()}
    resolved["recipe"] = recipe
    return resolved


def validate_args(args, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The checks of main_detect.py's flags (`parser`, the script's): fails before any work, naming the flag.
    Returns the flags with what they left to the recipe and the model resolved (`recipe_values`)."""
    check_run_flags(parser, args)  # each flag's range, as declared
    args = argparse.Namespace(**{**vars(args), **recipe_values(args)})
    if not args.scale_range[0] <= args.scale_range[1]:
        raise flag_error("--scale_range", f"must be LOW HIGH with LOW <= HIGH, got {args.scale_range}")
    check_transfer_flags(args, "detection", batchnorm=not is_plain_vit(args.model))  # ViTDet's: LayerNorm only
    if args.global_blocks and not args.window_size:
        raise flag_error("--global_blocks", "names the blocks that do not attend in windows: it needs --window_size")
    depth = transformer_depth(args.model)
    if any(b >= depth for b in args.global_blocks):
        raise flag_error("--global_blocks", f"{args.global_blocks}: --model {args.model} has transformer blocks 0 to "
                                            f"{depth - 1}")
    if args.lr_schedule == "step" and not args.lr_steps:
        raise flag_error("--lr_steps", "--lr_schedule step needs the fractions of --iters where the lr drops")
    if args.lr_steps and sorted(args.lr_steps) != list(args.lr_steps):
        raise flag_error("--lr_steps", f"must be increasing, got {args.lr_steps}")
    return args


def resolve_config(args, parser: argparse.ArgumentParser) -> Tuple["DetectConfig", str]:
    """(config, lr line): the flags checked and resolved, with the lr (blr x total batch / 256 unless --lr) and the
    precision resolved for the launch's device and world size."""
    args = validate_args(args, parser)
    device, world_size = resolve_device(args.device), launch_world_size()
    lr, line = scaled_lr(args.blr, args.batch_size * args.accum_iter * world_size, args.lr)
    cfg = DetectConfig.from_args(args, parser, lr=lr, amp=resolve_amp(args.amp, device)[0],
                                 world_size=world_size)
    return cfg, line


# -- model and data ---------------------------------------------------------------------------------------------------
def build_detector(cfg: DetectConfig, num_classes: int, **layout) -> torch.nn.Module:
    """Mask R-CNN on --model's multi-scale features for `num_classes` classes (models_maskrcnn: ConvMAE's DET for a
    ConViT, ViTDet's for a ViT); `layout`: build arguments a checkpoint's encoder needs
    (dmjd_encoders.pretrained.architecture_kwargs)."""
    return create_mask_rcnn(cfg.model, num_classes, cfg.input_size, cfg.fpn_channels, cfg.rois_per_image,
                            img_size=cfg.input_size, **cfg.encoder_options(), **layout)


def check_detection_checkpoint(path: str) -> None:
    """A checkpoint of the detector before it followed ConvMAE's DET and ViTDet (2026-12) cannot be resumed or
    evaluated: its weights and losses are another model's. Says so, rather than a failed load."""
    args = saved_args(path) or {}
    if DETECTION_FLAG in args and DETECTOR_FLAG not in args:
        raise RunError(f"{path} was saved by an earlier main_detect.py, whose Mask R-CNN differs from this one (boxes "
                       f"decoded in the autocast dtype, test images padded per batch, torchvision's losses, a conv "
                       f"stride-32 level for ConViT, an FPN on ViT's pyramid): it can be neither resumed nor evaluated "
                       f"here. Start a new run in another --output_dir, or evaluate it with the checkout that trained "
                       f"it")


def layer_scales(model: torch.nn.Module, layer_decay: float) -> Dict[str, float]:
    """{parameter name: lr scale} of the encoder inside Mask R-CNN: layer-wise lr decay by its own layer groups
    (timm's group_matcher: position embedding and patch embeddings 0, block i i + 1, what follows the blocks, e.g.
    the simple pyramid, last), `layer_decay ** (last - layer)`, as detectron2's get_vit_lr_decay_rate for ViTDet
    (0.7 ** 13 for ViT-B's embeddings, 0.7 for its block 11); the pyramid, FPN and heads have 1."""
    if layer_decay == 1.0:
        return {}
    encoder = encoder_of(model)
    prefix = next(name for name, module in model.named_modules() if module is encoder) + "."
    matcher, _ = matcher_without_tail(encoder.group_matcher(coarse=False))  # the tail: matched by none, last
    layers = group_parameters(encoder, matcher, reverse=True)
    last = max(layers.values())
    return {prefix + name: layer_decay ** (last - layer) for name, layer in layers.items()}


def detection_optimizer(model: torch.nn.Module, cfg: DetectConfig) -> torch.optim.AdamW:
    """AdamW (--lr, --betas, --weight_decay) without weight decay on norm layers and the recipe's names (position
    embeddings; ConvMAE's relative-position tables), biases decaying (detectron2's get_default_optimizer_params with
    the recipe's overrides), and with --layer_decay's lr scales on the encoder (`layer_scales`)."""
    scales, skip_names = layer_scales(model, cfg.layer_decay), NO_DECAY_NAMES[cfg.recipe]
    groups, seen = {}, set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            skip = isinstance(module, NORM_TYPES) or any(key in full for key in skip_names)
            key = (scales.get(full, 1.0), 0.0 if skip else cfg.weight_decay)
            groups.setdefault(key, []).append(param)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW([{"params": params, "lr_scale": scale, "weight_decay": decay}
                              for (scale, decay), params in groups.items()],
                             lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


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


def checked_validation_set(cfg: DetectConfig) -> CocoDetection:
    """The validation set, checked before the first step: an annotation file without images, or whose images are all
    missing or unreadable, stops the run; unreadable ones are named and counted (evaluation skips them, and COCO's
    AP counts only the images evaluated)."""
    val_set = detection_folder(cfg, "val", DetEvalTransform(cfg.input_size), train=False)
    images, annotations = cfg.split_paths("val")
    if len(val_set) == 0:
        raise RunError(f"{annotations} lists no image: there is nothing to evaluate (check --val_json / --data_path)")
    bad = val_set.check_images()
    for path, reason in bad[:10]:
        print(f"validation image {path}: {reason}")
    if len(bad) == len(val_set):
        raise RunError(f"none of the {len(val_set)} validation images of {annotations} can be read in {images} (e.g. "
                       f"{bad[0][0]}: {bad[0][1]}): there is nothing to evaluate")
    if bad:
        print(f"{len(bad)} of {len(val_set)} validation images cannot be read and will be skipped (the first "
              f"{min(len(bad), 10)} named above); COCO's AP counts the {len(val_set) - len(bad)} others")
    return val_set


def detection_loaders(run: Run, cfg: DetectConfig):
    """(training loader or None with --eval, validation loader, the validation set). Training draws --eval_interval
    x --accum_iter batches per round from an endless seeded stream; validation is sharded without padding."""
    pin = cfg.pin_mem and run.device.type == "cuda"
    val_set = checked_validation_set(cfg)
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
    RoI heads' losses, and COCO's box and mask AP (the best checkpoint: the best box AP, `best_bbox_AP`) against the
    validation annotations the dataset keeps. Batches are `(images, targets, num_bad)` lists of uint8 images and
    torchvision targets (util.coco.detection_collate); a batch with no readable image trains as one blank image
    without instances, of weight 0. After each evaluation the main process writes the COCO results JSON to
    --output_dir. A checkpoint keeps the class names it was trained on (`classes`)."""
    loss_names = LOSS_NAMES
    best = "bbox_AP"

    def __init__(self, model: torch.nn.Module, cfg: DetectConfig, device: torch.device, val_set: CocoDetection):
        self.model, self.cfg, self.device, self.val_set = model, cfg, device, val_set
        self.ground_truth = coco_ground_truth(val_set.ground_truth_data())
        self.last: Optional[CocoScores] = None  # the last evaluation, whose detections the results file keeps

    @property
    def evaluation_set(self) -> str:
        return self.cfg.split_paths("val")[1]

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

    def predict(self, images, targets):
        return self.model(self.model_input(images))

    def evaluator(self) -> "CocoScores":
        self.last = CocoScores(self.ground_truth, self.val_set.category_ids)
        return self.last

    def report(self, scores: Dict[str, object]) -> str:
        def shown(prefix):
            parts = [f"{name} {_percent(scores[f'{prefix}_{name}'])}" for name in ("AP", "AP50", "AP75")]
            sizes = "/".join(_percent(scores[f"{prefix}_AP{s}"]) for s in "sml")
            return "  ".join(parts) + f"  APs/m/l {sizes}"
        return (f"box {shown('bbox')};  mask {shown('segm')} on {scores['images']} images "
                f"({scores['detections']} detections)")

    def evaluated(self, scores: Dict[str, object], label: str) -> None:
        write_results(self.last.records, os.path.join(self.cfg.output_dir, RESULTS_FILE))

    def extra_state(self) -> dict:
        return {"classes": list(self.val_set.class_names)}

    def load_extra_state(self, checkpoint: dict, path: str) -> None:
        saved = checkpoint.get("classes")
        if saved is not None and list(saved) != list(self.val_set.class_names):
            raise RunError(f"{path} was trained on other classes ({len(saved)}: {saved[:5]}...) than the annotation "
                           f"files name ({len(self.val_set.class_names)}: {self.val_set.class_names[:5]}...)")


class CocoScores(Evaluator):
    """COCO's box and mask AP of the detections (boxes and masks in fp32, in the images' own coordinates) against
    the ground truth: each process's detections are gathered on the main process (`records`, COCO results), which
    runs COCOeval and sends the scores to every process, so that all take the same best-checkpoint decision."""

    def __init__(self, ground_truth, category_ids: Sequence[int]):
        self.ground_truth, self.category_ids = ground_truth, category_ids
        self.records: List[dict] = []
        self.image_ids: List[int] = []

    def update(self, outputs, targets) -> None:
        self.records += coco_records(outputs, targets, self.category_ids)  # fp32, outside autocast
        self.image_ids += [int(t["image_id"]) for t in targets]

    def scores(self) -> Dict[str, object]:
        self.records, self.image_ids = gather_shards(self.records, self.image_ids,
                                                     "the gathering of the evaluation's detections")
        scores = None
        if on_main_process():
            scores = scores_for_log(coco_evaluate(self.ground_truth, self.records, image_ids=self.image_ids))
            scores.update(detections=len(self.records))
        return broadcast_from_main(scores, "the sending of the main process's COCO scores")


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The timm encoder inside Mask R-CNN's backbone (what --finetune's weights load into)."""
    return model.backbone.body.model if hasattr(model.backbone.body, "model") else model.backbone.body


def run_detection(run: Run, cfg: DetectConfig) -> Dict[str, object]:
    """The loaders (the validation set checked), Mask R-CNN on --finetune's encoder (or the checkpoint resumed) and
    its task; then --eval of --resume, or the run's intervals (`train_or_evaluate`)."""
    if not cfg.eval:
        print(f"{cfg.iters} iterations of {cfg.images_per_step} images ({cfg.batch_size} per process x "
              f"{cfg.world_size} processes x accum {cfg.accum_iter}); large-scale jitter {cfg.scale_range} at "
              f"{cfg.input_size} px")
    train_loader, val_loader, val_set = detection_loaders(run, cfg)
    model = model_from_checkpoints(run, cfg, partial(build_detector, cfg, len(val_set.class_names)), encoder_of,
                                   "--model and --input_size", patch_tokens_only=True,
                                   check_resumed=check_detection_checkpoint)
    print(f"Mask R-CNN on {cfg.model}: {count_parameters(model):.2f} M parameters "
          f"({count_parameters(model.backbone.body):.2f} M encoder), feature strides {model.backbone.strides}")
    task = DetectTask(on_run_device(model, run, cfg), cfg, run.device, val_set)
    return train_or_evaluate(run, cfg, task, (train_loader, val_loader))


def train_or_evaluate(run: Run, cfg: DetectConfig, task: DetectTask, loaders) -> Dict[str, object]:
    """--eval of --resume, or the run's intervals (training.loop.fit). Returns the last evaluation."""
    train_loader, val_loader = loaders
    if cfg.eval:
        return evaluate_checkpoint(run, task, val_loader, cfg.resume)
    print(f"evaluation every {cfg.eval_interval} iterations and at the last, COCO's box and mask AP; results in "
          f"{os.path.join(cfg.output_dir, RESULTS_FILE)}")
    return fit(run, task, cfg, train_loader, val_loader, cfg.schedule)
