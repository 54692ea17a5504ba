"""Fine-tuning a pre-trained ConViT / ViT encoder for ImageNet classification.

    torchrun --nproc_per_node=8 main_finetune.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/imagenet --output_dir out/ft_convit_b

Defaults are the released ConViT-B recipe; see FINETUNE.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

import argparse  # noqa: E402

from training.errors import exits_like_a_script, flag_error  # noqa: E402
from training.flags import (MUST_MATCH, add_classification_flags, add_run_flags,  # noqa: E402
                            check_classification_data, check_run_flags, flag)


def get_args_parser():
    p = argparse.ArgumentParser("fine-tuning for image classification",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag(p, "--batch_size", default=128, type=int, help="images per GPU (released: 1024 in all)",
            check=">= 1", resume=MUST_MATCH)
    flag(p, "--epochs", default=100, type=int, help="50 for ConViT-L", check=">= 1", resume=MUST_MATCH)
    flag(p, "--accum_iter", default=1, type=int, help="micro-batches per optimizer step",
            check=">= 1", resume=MUST_MATCH)

    g = p.add_argument_group("model")
    flag(g, "--model", default="convvit_base_patch16", type=str,
            help="the classifier built on the pre-trained encoder", resume=MUST_MATCH)
    flag(g, "--input_size", default=224, type=int, help="crop size in pixels", check=">= 1", resume=MUST_MATCH)
    flag(g, "--drop_path", default=0.1, type=float, help="stochastic depth rate", check="[0, 1)", resume=MUST_MATCH)
    flag(g, "--global_pool", action=argparse.BooleanOptionalAction, default=True,
            help="mean of the tokens then a fresh norm (fc_norm, default), or the pre-trained final norm then "
                 "the mean", resume=MUST_MATCH)

    g = p.add_argument_group("optimizer")
    flag(g, "--clip_grad", default=None, type=float, help="max gradient norm (none: no clipping)",
            check="> 0", resume=MUST_MATCH)
    flag(g, "--weight_decay", default=0.05, type=float, help="AdamW weight decay", check=">= 0", resume=MUST_MATCH)
    flag(g, "--lr", default=None, type=float, help="absolute lr (none: blr x total batch / 256)",
            check="> 0", resume=MUST_MATCH)
    flag(g, "--blr", default=5e-4, type=float, help="base lr: lr = blr x total batch / 256",
            check="> 0", resume=MUST_MATCH)
    flag(g, "--layer_decay", default=0.65, type=float, help="layer-wise lr decay (0.75 for ConViT-L; 1: none)",
            check="(0, 1]", resume=MUST_MATCH)
    flag(g, "--min_lr", default=1e-6, type=float, help="lr at the end of the cosine", check=">= 0", resume=MUST_MATCH)
    flag(g, "--warmup_epochs", default=5, type=float, help="linear lr warmup, at most --epochs", check=">= 0",
            resume=MUST_MATCH)

    g = p.add_argument_group("augmentation")
    flag(g, "--color_jitter", default=None, type=float, help="only used without --aa", check=">= 0",
            resume=MUST_MATCH)
    flag(g, "--aa", default="rand-m9-mstd0.5-inc1", type=str, help="timm auto-augment policy ('': none)",
            resume=MUST_MATCH)
    flag(g, "--smoothing", default=0.1, type=float, help="label smoothing", check="[0, 1)", resume=MUST_MATCH)
    flag(g, "--reprob", default=0.25, type=float, help="random erasing probability", check="[0, 1]",
            resume=MUST_MATCH)
    flag(g, "--remode", default="pixel", choices=["pixel", "rand", "const"], help="random erasing fill",
            resume=MUST_MATCH)
    flag(g, "--recount", default=1, type=int, help="random erasing regions per image", check=">= 1",
            resume=MUST_MATCH)
    flag(g, "--mixup", default=0.8, type=float, help="mixup alpha (0 = off)", check=">= 0", resume=MUST_MATCH)
    flag(g, "--cutmix", default=1.0, type=float, help="cutmix alpha (0 = off)", check=">= 0", resume=MUST_MATCH)
    flag(g, "--cutmix_minmax", default=None, type=float, nargs=2, metavar=("MIN", "MAX"),
            help="cutmix box size bounds as fractions of the image's sides (overrides --cutmix)", check="[0, 1]",
            resume=MUST_MATCH)
    flag(g, "--mixup_prob", default=1.0, type=float, help="probability of mixup or cutmix per batch",
            check="[0, 1]", resume=MUST_MATCH)
    flag(g, "--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix instead of mixup",
            check="[0, 1]", resume=MUST_MATCH)
    flag(g, "--mixup_mode", default="batch", choices=["batch", "pair", "elem"],
            help="one mixing per batch, pair of images or image", resume=MUST_MATCH)

    g = p.add_argument_group("initialisation")
    flag(g, "--finetune", default="", help="pre-trained checkpoint (ours, released, or encoder-only)",
            resume="only the first start loads it: a resumed run's weights come from its checkpoint")
    flag(g, "--checkpoint_key", default="model", choices=["model", "teacher"],
            help="take the student encoder, or the EMA teacher's", resume="only the first start reads --finetune")
    add_classification_flags(add_run_flags(p, data_help="ImageFolder root with train/ and val/"))
    return p


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_classification_data)(ARGS)

from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import param_groups_layer_decay  # noqa: E402

import models_convvit  # noqa: E402,F401  (registers the classifiers with timm)
from dmjd_encoders.pretrained import architecture_kwargs, encoder_layout, load_encoder  # noqa: E402
from engine_finetune import (ClassificationConfig, ClassificationTask, check_classification_flags,  # noqa: E402
                             classification_loaders, resolve_classification, run_classification)
from models_convvit import conv_weights_channels_last  # noqa: E402
from training.run import Run  # noqa: E402
from util.transforms import eval_transform, finetune_transform  # noqa: E402


@dataclass(frozen=True)
class FinetuneConfig(ClassificationConfig):
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


def validate_args(args) -> argparse.Namespace:
    """Fails before any work, naming the flag; returns `args` unchanged."""
    check_classification_flags(get_args_parser(), args)
    if args.cutmix_minmax is not None and args.cutmix_minmax[0] > args.cutmix_minmax[1]:
        raise flag_error("--cutmix_minmax", f"must be MIN MAX with MIN <= MAX, got {args.cutmix_minmax}")
    try:  # timm parses the policy only when it builds the transform, inside the run
        finetune_transform(args.input_size, args.aa)
    except (AssertionError, KeyError, ValueError) as err:
        raise flag_error("--aa", f"{args.aa!r} is not an auto-augment policy of timm ({err}); e.g. "
                                 f"rand-m9-mstd0.5-inc1, or '' for none") from None
    return args


@exits_like_a_script
def main(args):
    cfg, lr_line = resolve_classification(FinetuneConfig, get_args_parser(), validate_args(args))
    check_classification_data(args)  # before the run's header and output folder
    with Run(cfg) as run:
        print(lr_line)
        return finetune(run, cfg)


def finetune(run: Run, cfg: FinetuneConfig):
    train_tf = finetune_transform(cfg.input_size, cfg.aa, cfg.reprob, cfg.remode, cfg.recount, cfg.color_jitter)
    train_loader, val_loader, classes = classification_loaders(run, cfg, train_tf, eval_transform(cfg.input_size))

    # A checkpoint in MAE's / timm's ViT layout (with a class token) is fine-tuned with its class token, as MAE does.
    resume = run.resume_path(auto=not cfg.eval)
    layout = architecture_kwargs(resume) if resume else encoder_layout(cfg.finetune, cfg.checkpoint_key)
    model = timm.create_model(cfg.model, img_size=cfg.input_size, num_classes=cfg.nb_classes,
                              drop_path_rate=cfg.drop_path, fc_norm=cfg.global_pool, **layout)
    if cfg.finetune:
        load_encoder(model, cfg.finetune, cfg.checkpoint_key)
    model = conv_weights_channels_last(model.to(run.device))
    mixup_fn = None if cfg.eval else mixup_of(cfg)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    def optimizer(model):
        groups = param_groups_layer_decay(model, cfg.weight_decay, model.no_weight_decay(), layer_decay=cfg.layer_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=run.device.type == "cuda")

    task = ClassificationTask(model, cfg, run.device, criterion, optimizer, mixup_fn, classes=classes)
    return run_classification(run, cfg, task, (train_loader, val_loader))


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


if __name__ == "__main__":
    main(ARGS)
