"""Linear probing of a pre-trained encoder: the config, the probe's features (the flag, or a resumed probe's own),
the frozen encoder from the checkpoint under BatchNorm and a linear classifier trained with LARS, and the run
(training.classification trains and evaluates it)."""
import argparse
from dataclasses import dataclass
from typing import Tuple

import timm
import torch
from timm.optim import Lars

from dmjd_encoders.checkpoint import load_checkpoint
from dmjd_encoders.models_convvit import PROBE_FEATURES, LinearProbe, conv_weights_channels_last
from dmjd_encoders.pretrained import FRESH_KEYS
from training.classification import (ClassificationConfig, ClassificationTask, check_classification_flags,
                                     classification_loaders, resolve_classification, run_classification)
from training.errors import flag_error
from training.output import check_checkpoint_script, newest_checkpoint
from training.run import Run
from training.transfer import model_from_checkpoints
from util.transforms import eval_transform, linprobe_transform


@dataclass(frozen=True)
class LinprobeConfig(ClassificationConfig):
    """main_linprobe.py's flags, resolved."""
    min_crop_scale: float
    probe_features: str  # resolved: the flag, or a resumed probe's own


def lars_param_groups(head: torch.nn.Module, weight_decay: float):
    """LARS adapts the weight matrices' steps; biases get plain momentum SGD and no weight decay (as MAE)."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    return [{"params": matrices, "weight_decay": weight_decay, "always_adapt": True},
            {"params": vectors, "weight_decay": 0.0, "always_adapt": False}]


def resumed_probe_features(args, resume) -> str:
    """--probe_features, or the features a resumed probe was trained on (final_norm_then_pool for probes saved
    before the flag existed); a conflict between the two stops the run, as does another script's checkpoint (whose
    saved flags say nothing of a probe's features)."""
    saved = None
    if resume:
        saved_args = load_checkpoint(resume, mmap=True).get("args") or {}
        check_checkpoint_script(resume, saved_args, vars(args), evaluating=args.eval)
        saved = saved_args.get("probe_features") or "final_norm_then_pool"
    if args.probe_features and saved and args.probe_features != saved:
        raise flag_error("--probe_features", f"{args.probe_features}, but {resume} was trained on {saved}")
    return args.probe_features or saved or PROBE_FEATURES[0]


def validate_args(args, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fails before any work, naming the flag; returns `args` unchanged."""
    check_classification_flags(parser, args)
    return args


def resolve_config(args, parser: argparse.ArgumentParser) -> Tuple[LinprobeConfig, str]:
    """(config, lr line): the flags checked, the lr and precision resolved (training.classification), and the
    probe's features: the flag's, or those of the probe the run resumes (the run's own choice of checkpoint)."""
    args = validate_args(args, parser)
    resume = newest_checkpoint(args.resume, None if args.eval else args.output_dir)
    return resolve_classification(LinprobeConfig, parser, args, probe_features=resumed_probe_features(args, resume))


def build_probe(cfg: LinprobeConfig, **layout) -> LinearProbe:
    """--model's encoder, frozen, under the probe (`layout`: build arguments a checkpoint's encoder needs; a
    checkpoint in MAE's / timm's ViT layout is probed with its class token, as MAE does)."""
    encoder = timm.create_model(cfg.model, img_size=cfg.input_size, **layout)
    return LinearProbe(encoder, cfg.nb_classes, cfg.probe_features)


class ProbeTask(ClassificationTask):
    """Linear probing as the loop sees it (training.classification.ClassificationTask): the frozen encoder under
    BatchNorm and a linear head, the head trained with LARS (momentum 0.9) and cross-entropy, as MAE."""

    def optimizer(self) -> Lars:
        return Lars(lars_param_groups(self.model.head, self.cfg.weight_decay), lr=self.cfg.lr, momentum=0.9)


def run_probing(run: Run, cfg: LinprobeConfig):
    """The loaders, the probe on --finetune's encoder (or the checkpoint resumed), its task; then --eval of
    --resume, or the epochs of probing."""
    train_loader, val_loader, classes = classification_loaders(
        run, cfg, linprobe_transform(cfg.input_size, cfg.min_crop_scale), eval_transform(cfg.input_size))
    if not (cfg.finetune or cfg.eval):
        print("warning: no --finetune checkpoint: probing a randomly initialised encoder")
    model = model_from_checkpoints(run, cfg, lambda **layout: build_probe(cfg, **layout), lambda m: m.encoder,
                                   "--model and --input_size", fresh=FRESH_KEYS["probe"])
    model = conv_weights_channels_last(model.to(run.device))
    if not cfg.eval:
        print(f"trainable parameters: {[n for n, p in model.named_parameters() if p.requires_grad]}")
    return run_classification(run, cfg, ProbeTask(model, cfg, run.device, classes), (train_loader, val_loader))
