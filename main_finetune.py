"""Fine-tuning a pre-trained ConViT / ViT encoder for ImageNet classification.

    torchrun --nproc_per_node=8 main_finetune.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/imagenet --output_dir out/ft_convit_b

Defaults are the released ConViT-B recipe; see FINETUNE.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

import argparse  # noqa: E402

from training.errors import exits_like_a_script  # noqa: E402
from training.flags import (MUST_MATCH, add_classification_flags, add_initialisation_flags,  # noqa: E402
                            add_model_flags, add_optimizer_flags, add_run_flags, add_step_flags,
                            check_classification_data, check_run_flags, flag)


def get_args_parser():
    p = argparse.ArgumentParser("main_finetune.py", description="fine-tuning for image classification",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_flags(p, 128, "images per GPU (released: 1024 in all)")
    flag(p, "--epochs", default=100, type=int, help="50 for ConViT-L", check=">= 1", resume=MUST_MATCH)

    g = p.add_argument_group("model")
    add_model_flags(g, "convvit_base_patch16", "the classifier built on the pre-trained encoder", 224)
    flag(g, "--drop_path", default=0.1, type=float, help="stochastic depth rate", check="[0, 1)", resume=MUST_MATCH)
    flag(g, "--global_pool", action=argparse.BooleanOptionalAction, default=True,
            help="mean of the tokens then a fresh norm (fc_norm, default), or the pre-trained final norm then "
                 "the mean", resume=MUST_MATCH)

    g = p.add_argument_group("optimizer")
    add_optimizer_flags(g, blr=5e-4, blr_help="base lr: lr = blr x total batch / 256", weight_decay=0.05,
                        weight_decay_help="AdamW weight decay", min_lr=1e-6)
    flag(g, "--layer_decay", default=0.65, type=float, help="layer-wise lr decay (0.75 for ConViT-L; 1: none)",
            check="(0, 1]", resume=MUST_MATCH)
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

    add_initialisation_flags(p.add_argument_group("initialisation"),
                             "pre-trained checkpoint (ours, released, or encoder-only)")
    add_classification_flags(add_run_flags(p, data_help="ImageFolder root with train/ and val/"))
    return p


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_classification_data)(ARGS)

import engine_finetune  # noqa: E402
from training.run import Run  # noqa: E402


def validate_args(args):
    """The flags checked, before any work (the SLURM launcher's check too)."""
    return engine_finetune.validate_args(args, get_args_parser())


@exits_like_a_script
def main(args):
    cfg, lr_line = engine_finetune.resolve_config(args, get_args_parser())
    check_classification_data(args)  # before the run's header and output folder
    with Run(cfg) as run:
        print(lr_line)
        return engine_finetune.run_finetuning(run, cfg)


if __name__ == "__main__":
    main(ARGS)
