"""Fine-tuning a pre-trained encoder for image classification: the config, the flags' checks, the classifier built
from the checkpoint, its criterion, mixup / cutmix and layer-wise lr decay, and the run (training.classification
trains and evaluates it)."""
import argparse
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

from dmjd_encoders.models_convvit import conv_weights_channels_last
from dmjd_encoders.pretrained import FRESH_KEYS
from training.classification import (ClassificationConfig, ClassificationTask, check_classification_flags,
                                     classification_loaders, resolve_classification, run_classification)
from training.errors import flag_error
from training.run import Run
from training.transfer import model_from_checkpoints
from util.transforms import eval_transform, finetune_transform


@dataclass(frozen=True)
class FinetuneConfig(ClassificationConfig):
    """main_finetune.py's flags, resolved."""
    drop_path: float
    global_pool: bool
    layer_decay: float
    color_jitter: Optional[float]
    aa: str
    smoothing: float
    reprob: float
    remode: str
    recount: int
    mixup: float
    cutmix: float
    cutmix_minmax: Optional[list]
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str


def validate_args(args, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fails before any work, naming the flag; returns `args` unchanged."""
    check_classification_flags(parser, args)
    if args.cutmix_minmax is not None and args.cutmix_minmax[0] > args.cutmix_minmax[1]:
        raise flag_error("--cutmix_minmax", f"must be MIN MAX with MIN <= MAX, got {args.cutmix_minmax}")
    try:  # timm parses the policy only when it builds the transform, inside the run
        finetune_transform(args.input_size, args.aa)
    except (AssertionError, KeyError, ValueError) as err:
        raise flag_error("--aa", f"{args.aa!r} is not an auto-augment policy of timm ({err}); e.g. "
                                 f"rand-m9-mstd0.5-inc1, or '' for none") from None
    return args


def resolve_config(args, parser: argparse.ArgumentParser) -> Tuple[FinetuneConfig, str]:
    """(config, lr line): the flags checked, the lr and precision resolved (training.classification)."""
    return resolve_classification(FinetuneConfig, parser, validate_args(args, parser))


def mixup_of(cfg: FinetuneConfig) -> Optional[Mixup]:
    """timm's Mixup / CutMix as the flags set it (None when both are off)."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        return None
    if cfg.batch_size % 2:
        raise flag_error("--batch_size", f"{cfg.batch_size} must be even for mixup / cutmix")
    print("mixup / cutmix on: soft-target cross-entropy")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=cfg.nb_classes)


def criterion_of(cfg: FinetuneConfig, mixup: Optional[Mixup]) -> torch.nn.Module:
    """Soft-target cross-entropy with mixup / cutmix, else label smoothing's, else plain cross-entropy."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_classifier(cfg: FinetuneConfig, **layout) -> torch.nn.Module:
    """--model with a classifier of --nb_classes, pooling then fc_norm with --global_pool (MAE's fine-tuning);
    `layout`: build arguments a checkpoint's encoder needs (a checkpoint in MAE's / timm's ViT layout is fine-tuned
    with its class token, as MAE does)."""
    return timm.create_model(cfg.model, img_size=cfg.input_size, num_classes=cfg.nb_classes,
                             drop_path_rate=cfg.drop_path, fc_norm=cfg.global_pool, **layout)


class FinetuneTask(ClassificationTask):
    """Fine-tuning as the loop sees it (training.classification.ClassificationTask): the whole classifier under
    layer-wise lr decay (--layer_decay; no weight decay on norms, biases, position embeddings and tokens), with
    mixup / cutmix and its soft-target criterion, or label smoothing."""

    def __init__(self, model: torch.nn.Module, cfg: FinetuneConfig, device: torch.device, classes: Sequence[str]):
        mixup = None if cfg.eval else mixup_of(cfg)
        super().__init__(model, cfg, device, classes, criterion_of(cfg, mixup), mixup)

    def optimizer(self) -> torch.optim.AdamW:
        cfg = self.cfg
        groups = param_groups_layer_decay(self.model, cfg.weight_decay, self.model.no_weight_decay(),
                                          layer_decay=cfg.layer_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=self.device.type == "cuda")


def run_finetuning(run: Run, cfg: FinetuneConfig):
    """The loaders, the classifier from --finetune's encoder (or the checkpoint resumed), its task; then --eval of
    --resume, or the epochs of fine-tuning."""
    train_tf = finetune_transform(cfg.input_size, cfg.aa, cfg.reprob, cfg.remode, cfg.recount, cfg.color_jitter)
    train_loader, val_loader, classes = classification_loaders(run, cfg, train_tf, eval_transform(cfg.input_size))
    model = model_from_checkpoints(run, cfg, lambda **layout: build_classifier(cfg, **layout), lambda m: m,
                                   "--model and --input_size", fresh=FRESH_KEYS["classifier"])
    task = FinetuneTask(conv_weights_channels_last(model.to(run.device)), cfg, run.device, classes)
    return run_classification(run, cfg, task, (train_loader, val_loader))
