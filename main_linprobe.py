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

from training.errors import exits_like_a_script  # noqa: E402
from training.flags import (MUST_MATCH, add_classification_flags, add_initialisation_flags,  # noqa: E402
                            add_model_flags, add_optimizer_flags, add_run_flags, add_step_flags,
                            check_classification_data, check_run_flags, flag)

# the features a probe can take (dmjd_encoders.models_convvit.PROBE_FEATURES, here before torch is imported)
PROBE_FEATURES = ("pool_then_fresh_norm", "final_norm_then_pool")


def get_args_parser():
    p = argparse.ArgumentParser("main_linprobe.py", description="linear probing",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_flags(p, 512, "images per GPU (released: 4096 in all)")
    flag(p, "--epochs", default=90, type=int, help="90 for ConViT-B, 50 for ConViT-L", check=">= 1", resume=MUST_MATCH)
    add_model_flags(p, "convvit_base_patch16", "the classifier whose encoder is probed", 224)
    flag(p, "--min_crop_scale", default=0.08, type=float, help="RandomResizedCrop's smallest area fraction",
         check="(0, 1]", resume=MUST_MATCH)
    add_optimizer_flags(p, blr=0.1, blr_help="0.1 for ConViT-B, 0.05 for ConViT-L", weight_decay=0.0,
                        weight_decay_help="LARS weight decay", clip_grad_help=None)
    flag(p, "--warmup_epochs", default=10, type=float, help="linear lr warmup, at most --epochs", check=">= 0",
         resume=MUST_MATCH)
    add_initialisation_flags(p, "pre-trained checkpoint (ours, released, or encoder-only)",
                             "probe the student encoder, or the EMA teacher's")
    flag(p, "--probe_features", default=None, choices=PROBE_FEATURES,
         help="pool_then_fresh_norm: the release's (mean of the last block's tokens, then a LayerNorm "
              "without affine; the default); final_norm_then_pool: the mean of the final norm's tokens, as "
              "probes trained before this flag existed. A resumed probe keeps its own (none: the default, or "
              "the resumed probe's)",
         resume="a resumed probe keeps the features it was trained on; a conflicting flag stops the run before the "
                "checkpoint is loaded (engine_linprobe.resumed_probe_features)")
    add_classification_flags(add_run_flags(p, data_help="ImageFolder root with train/ and val/"))
    p.set_defaults(clip_grad=None)
    return p


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_classification_data)(ARGS)

import engine_linprobe  # noqa: E402
from training.run import Run  # noqa: E402


def validate_args(args):
    """The flags checked, before any work (the SLURM launcher's check too)."""
    return engine_linprobe.validate_args(args, get_args_parser())


@exits_like_a_script
def main(args):
    cfg, lr_line = engine_linprobe.resolve_config(args, get_args_parser())
    check_classification_data(args)  # before the run's header and output folder
    with Run(cfg) as run:
        print(lr_line)
        return engine_linprobe.run_probing(run, cfg)


if __name__ == "__main__":
    main(ARGS)
