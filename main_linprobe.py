"""Linear probing of a frozen pre-trained encoder: the release's features (the mean of the last block's tokens through
a LayerNorm without affine), BatchNorm without affine and a linear classifier, trained with LARS.

    torchrun --nproc_per_node=8 main_linprobe.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/imagenet --output_dir out/lin_convit_b

Defaults are the released ConViT-B recipe; see FINETUNE.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

import argparse  # noqa: E402

from training.errors import exits_like_a_script, flag_error  # noqa: E402
from training.flags import (MUST_MATCH, PROBE_FEATURES, add_classification_flags, add_run_flags,  # noqa: E402
                            check_classification_data, check_run_flags, flag)


def get_args_parser():
    p = argparse.ArgumentParser("linear probing", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag(p, "--batch_size", default=512, type=int, help="images per GPU (released: 4096 in all)",
            check=">= 1", resume=MUST_MATCH)
    flag(p, "--epochs", default=90, type=int, help="90 for ConViT-B, 50 for ConViT-L", check=">= 1", resume=MUST_MATCH)
    flag(p, "--accum_iter", default=1, type=int, help="micro-batches per optimizer step",
            check=">= 1", resume=MUST_MATCH)
    flag(p, "--model", default="convvit_base_patch16", type=str, help="the classifier whose encoder is probed",
            resume=MUST_MATCH)
    flag(p, "--input_size", default=224, type=int, help="crop size in pixels", check=">= 1", resume=MUST_MATCH)
    flag(p, "--min_crop_scale", default=0.08, type=float, help="RandomResizedCrop's smallest area fraction",
            check="(0, 1]", resume=MUST_MATCH)
    flag(p, "--weight_decay", default=0.0, type=float, help="LARS weight decay", check=">= 0", resume=MUST_MATCH)
    flag(p, "--lr", default=None, type=float, help="absolute lr (none: blr x total batch / 256)",
            check="> 0", resume=MUST_MATCH)
    flag(p, "--blr", default=0.1, type=float, help="0.1 for ConViT-B, 0.05 for ConViT-L",
            check="> 0", resume=MUST_MATCH)
    flag(p, "--min_lr", default=0.0, type=float, help="lr at the end of the cosine", check=">= 0", resume=MUST_MATCH)
    flag(p, "--warmup_epochs", default=10, type=float, help="linear lr warmup, at most --epochs", check=">= 0",
            resume=MUST_MATCH)
    flag(p, "--finetune", default="", help="pre-trained checkpoint (ours, released, or encoder-only)",
            resume="only the first start loads it: a resumed run's weights come from its checkpoint")
    flag(p, "--checkpoint_key", default="model", choices=["model", "teacher"],
            help="probe the student encoder, or the EMA teacher's", resume="only the first start reads --finetune")
    flag(p, "--probe_features", default=None, choices=PROBE_FEATURES,
            help="pool_then_fresh_norm: the release's (mean of the last block's tokens, then a LayerNorm "
                 "without affine; the default); final_norm_then_pool: the mean of the final norm's tokens, as "
                 "probes trained before this flag existed. A resumed probe keeps its own (none: the default, or "
                 "the resumed probe's)",
            resume="a resumed probe keeps the features it was trained on; a conflicting flag stops the run before the "
                   "checkpoint is loaded (resumed_probe_features)")
    add_classification_flags(add_run_flags(p, data_help="ImageFolder root with train/ and val/"))
    p.set_defaults(clip_grad=None)
    return p


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_classification_data)(ARGS)

from dataclasses import dataclass  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
from timm.optim import Lars  # noqa: E402

import models_convvit  # noqa: E402,F401  (registers the encoders with timm)
from dmjd_encoders.pretrained import FRESH_KEYS, architecture_kwargs, encoder_layout, load_encoder  # noqa: E402
from engine_finetune import (ClassificationConfig, ClassificationTask, check_classification_flags,  # noqa: E402
                             classification_loaders, resolve_classification, run_classification)
from models_convvit import LinearProbe, conv_weights_channels_last  # noqa: E402
from training.output import check_checkpoint_script, newest_checkpoint  # noqa: E402
from training.run import Run  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402
from util.transforms import eval_transform, linprobe_transform  # noqa: E402


@dataclass(frozen=True)
class LinprobeConfig(ClassificationConfig):
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


def validate_args(args) -> argparse.Namespace:
    """Fails before any work, naming the flag; returns `args` unchanged."""
    check_classification_flags(get_args_parser(), args)
    return args


@exits_like_a_script
def main(args):
    args = validate_args(args)
    check_classification_data(args)  # before the run's header and output folder
    resume = newest_checkpoint(args.resume, None if args.eval else args.output_dir)  # the run's own choice
    cfg, lr_line = resolve_classification(LinprobeConfig, get_args_parser(), args,
                                          probe_features=resumed_probe_features(args, resume))
    with Run(cfg) as run:
        print(lr_line)
        return probe(run, cfg)


def probe(run: Run, cfg: LinprobeConfig):
    train_loader, val_loader, classes = classification_loaders(
        run, cfg, linprobe_transform(cfg.input_size, cfg.min_crop_scale), eval_transform(cfg.input_size))
    # A checkpoint in MAE's / timm's ViT layout (with a class token) is probed with its class token, as MAE does.
    resume = run.resume_path(auto=not cfg.eval)
    layout = architecture_kwargs(resume) if resume else encoder_layout(cfg.finetune, cfg.checkpoint_key)
    encoder = timm.create_model(cfg.model, img_size=cfg.input_size, **layout)
    if cfg.finetune:
        load_encoder(encoder, cfg.finetune, cfg.checkpoint_key, allowed_missing=FRESH_KEYS["probe"])
    elif not cfg.eval:
        print("warning: no --finetune checkpoint: probing a randomly initialised encoder")
    model = conv_weights_channels_last(LinearProbe(encoder, cfg.nb_classes, cfg.probe_features).to(run.device))
    if not cfg.eval:
        print(f"trainable parameters: {[n for n, p in model.named_parameters() if p.requires_grad]}")

    def optimizer(model):
        return Lars(lars_param_groups(model.head, cfg.weight_decay), lr=cfg.lr, momentum=0.9)

    task = ClassificationTask(model, cfg, run.device, torch.nn.CrossEntropyLoss(), optimizer, classes=classes)
    return run_classification(run, cfg, task, (train_loader, val_loader))


if __name__ == "__main__":
    main(ARGS)
