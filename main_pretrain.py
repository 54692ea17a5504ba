"""DMJD pre-training. Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_pretrain.py --data_path /path/to/imagenet --output_dir out/dmjd_convit_b

Defaults are the released ConViT-B recipe; see PRETRAIN.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

import argparse  # noqa: E402

from training.errors import exits_like_a_script  # noqa: E402
from training.flags import (MUST_MATCH, add_model_flags, add_optimizer_flags, add_run_flags,  # noqa: E402
                            add_step_flags, check_data_path, check_run_flags, flag)

RELEASED_MODEL = "dmjd_convit_base_patch16_dec8_hog"  # the released recipe's (models_dmjd.DEFAULT_MODEL)


def get_args_parser():
    p = argparse.ArgumentParser("main_pretrain.py", description="DMJD pre-training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_flags(p, 64, "images per GPU (each gives --num_views views)",
                   "gradient accumulation steps per optimizer step")
    flag(p, "--epochs", default=400, type=int, help="pre-training epochs", check=">= 1", resume=MUST_MATCH)

    g = p.add_argument_group("model and method")
    add_model_flags(g, RELEASED_MODEL, "a registered dmjd_* model", 224)
    flag(g, "--num_views", default=2, type=int, help="disjointly masked views per image (1 = MaskFeat/ConvMAE)",
            check=">= 1", resume=MUST_MATCH)
    flag(g, "--mask_ratio", default=0.6, type=float, help="corruption rate: fraction masked in one view",
            check="(0, 1)", resume=MUST_MATCH)
    flag(g, "--pred_ratio", default=None, type=float,
            help="prediction rate: fraction masked in at least one view, at least --mask_ratio (none: min(1, views x "
                 "mask_ratio))", check="(0, 1]", resume=MUST_MATCH)
    flag(g, "--mask_type", default="block", choices=["block", "rand"],
            help="block: units of --block_size x --block_size patches (SimMIM); rand: single patches",
            resume=MUST_MATCH)
    flag(g, "--block_size", default=2, type=int, help="block masking unit, in patches", check=">= 1", resume=MUST_MATCH)
    flag(g, "--pred_type", default="hog", choices=["hog", "pixel"], help="target of the masked tokens",
            resume=MUST_MATCH)
    flag(g, "--vis_target", default="hog", choices=["hog", "ema"], help="target of the visible tokens",
            resume=MUST_MATCH)
    flag(g, "--theta", default=1.0, type=float, help="weight of the visible-distillation loss (0 = off)",
            check=">= 0", resume=MUST_MATCH)
    flag(g, "--ema_momentum", default=0.996, type=float, help="initial teacher momentum (cosine to 1)",
            check="[0, 1]", resume=MUST_MATCH)
    flag(g, "--min_crop_scale", default=0.5, type=float, help="RandomResizedCrop's smallest area fraction",
            check="(0, 1]", resume=MUST_MATCH)

    g = p.add_argument_group("optimizer")
    add_optimizer_flags(g, blr=6e-4, blr_help="base lr: lr = blr x images / 256 x pred / mask ratio",
                        weight_decay=0.05, weight_decay_help="AdamW weight decay (none on biases and norms)",
                        lr_help="absolute lr (none: the adaptive rule from --blr)",
                        clip_grad_help="max gradient norm (3.0 for ConViT-L)")
    flag(g, "--warmup_epochs", default=20, type=float, help="linear lr warmup, per iteration, at most --epochs",
            check=">= 0", resume=MUST_MATCH)

    g = add_run_flags(p, data_help="ImageFolder root holding train/")
    flag(g, "--compile", action="store_true", help="torch.compile the model (CUDA; first steps are slow)",
            resume="the same model, compiled or not")
    flag(g, "--channels_last", action=argparse.BooleanOptionalAction, default=None,
            help="NHWC memory for the conv stages and the input (none: on with CUDA, off on the CPU)",
            resume="the conv weights' memory layout, not their values")
    flag(g, "--save_freq", default=20, type=int, help="keep checkpoint-<epoch>.pth every N epochs",
            check=">= 1", resume="which periodic checkpoints are kept")
    flag(g, "--keep_last", default=0, type=int, help="periodic checkpoints kept (0 = all)",
            check=">= 0", resume="how many periodic checkpoints are kept")
    flag(g, "--vis_freq", default=20, type=int,
            help="TensorBoard picture of masks and predictions every N epochs (0 = never)",
            check=">= 0", resume="how often TensorBoard gets a picture")
    return p


def check_data(args) -> None:
    """Pre-training reads `train/` of --data_path."""
    check_data_path(args.data_path, ["train"], "an ImageFolder root: train/ with one folder of images per class")


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_data)(ARGS)

import engine_pretrain  # noqa: E402
from training.run import Run  # noqa: E402


def validate_args(args):
    """The flags checked, before any work, the prediction rate made explicit (the SLURM launcher's check too)."""
    return engine_pretrain.validate_args(args, get_args_parser())


@exits_like_a_script
def main(args):
    cfg, lr_line = engine_pretrain.resolve_config(args, get_args_parser())
    check_data(args)  # before the run's header and output folder
    with Run(cfg, save_freq=cfg.save_freq, keep_last=cfg.keep_last) as run:
        print(lr_line)
        engine_pretrain.run_pretraining(run, cfg)


if __name__ == "__main__":
    main(ARGS)
