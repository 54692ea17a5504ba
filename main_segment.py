"""Semantic segmentation: UperNet on a pre-trained ConViT / ViT encoder, trained and evaluated on ADE20K (or any
dataset in its layout). Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_segment.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/ADEChallengeData2016 --output_dir out/seg_convit_b

Defaults are ConvMAE-B's ADE20K recipe (upernet_convmae_base_512_slide_160k_ade20k); see SEGMENT.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

import argparse  # noqa: E402

from training.errors import exits_like_a_script  # noqa: E402
from training.flags import (MUST_MATCH, add_initialisation_flags, add_model_flags, add_optimizer_flags,  # noqa: E402
                            add_run_flags, add_step_flags, check_data_path, check_run_flags, flag, float_or_none)

# mmseg's multi-scale test ratios (MultiScaleFlipAug's img_ratios in its ADE20K configs)
AUG_TEST_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def get_args_parser() -> argparse.ArgumentParser:
    """The flags: ConvMAE-B's ADE20K recipe by default (the segmentation benchmarks build their configs from them
    too)."""
    p = argparse.ArgumentParser("main_segment.py", description="semantic segmentation with UperNet",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_flags(p, 2, "images per GPU (the recipe: 2 x 8 GPUs = 16)",
                   "micro-batches per optimizer step (iteration)")
    _add_schedule_flags(p)
    _add_model_flags(p)
    g = p.add_argument_group("optimizer (AdamW)")
    add_optimizer_flags(g, blr=1.6e-3, blr_help="base lr: lr = blr x total batch / 256 (the recipe: 1e-4 at 16 images "
                                                "per step)", weight_decay=0.05,
                        weight_decay_help="none on biases, norms and pos_embed",
                        min_lr_help="lr at the end of the poly decay")
    flag(g, "--betas", default=[0.9, 0.999], type=float, nargs=2, help="AdamW betas", check="[0, 1)", resume=MUST_MATCH)
    flag(g, "--layer_decay", default=0.75, type=float, help="layer-wise lr decay", check="(0, 1]", resume=MUST_MATCH)
    _add_data_flags(p)
    _add_evaluation_flags(p)
    add_initialisation_flags(p.add_argument_group("initialisation"),
                             "pre-trained checkpoint (ours, released, or an encoder export)")
    add_run_flags(p, data_help="dataset root holding images/{training,validation} and annotations/{...}")
    p.set_defaults(data_path="/datasets/ADEChallengeData2016")
    return p


def _add_schedule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule (in iterations, i.e. optimizer steps)")
    flag(g, "--iters", default=160000, type=int, help="training iterations", check=">= 1", resume=MUST_MATCH)
    flag(g, "--warmup_iters", default=1500, type=int, help="linear lr warmup, at most --iters", check=">= 0",
         resume=MUST_MATCH)
    flag(g, "--warmup_ratio", default=1e-6, type=float, help="the warmup starts at this fraction of the lr",
         check="[0, 1]", resume=MUST_MATCH)
    flag(g, "--poly_power", default=1.0, type=float,
         help="lr = (lr - min_lr) x (1 - iter / iters)^power + min_lr", check="> 0", resume=MUST_MATCH)
    flag(g, "--eval_interval", default=16000, type=int,
         help="evaluate and checkpoint every N iterations (--iters must be a multiple)",
         check=">= 1", resume=MUST_MATCH)
    flag(g, "--save_freq", default=0, type=int,
         help="also keep checkpoint-<k>.pth every N evaluation intervals (0: only last and best)",
         check=">= 0", resume="which periodic checkpoints are kept")
    flag(g, "--keep_last", default=0, type=int, help="periodic checkpoints kept (0 = all)",
         check=">= 0", resume="how many periodic checkpoints are kept")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_model_flags(g, "convvit_base_patch16", "the encoder (its multi-scale features)", 512,
                    "training crop size in pixels")
    flag(g, "--drop_path", default=0.2, type=float, help="stochastic depth rate of the encoder",
         check="[0, 1)", resume=MUST_MATCH)
    flag(g, "--out_indices", default=None, type=int, nargs="+",
         help="encoder feature levels the decoder takes (none: all four of ConViT, strides 4 to 32)",
         check=">= 0", resume=MUST_MATCH)
    flag(g, "--decoder_channels", default=768, type=int,
         help="UPerHead width (ConvMAE-B's config; mmseg's UperNet default is 512)", check=">= 1", resume=MUST_MATCH)
    flag(g, "--pool_scales", default=[1, 2, 3, 6], type=int, nargs="+", help="PPM pooling bins",
         check=">= 1", resume=MUST_MATCH)
    flag(g, "--head_dropout", default=0.1, type=float, help="dropout before both heads' classifiers",
         check="[0, 1)", resume=MUST_MATCH)
    flag(g, "--aux_in_index", default=2, type=int,
         help="feature level of the auxiliary FCN head (2: the stride-16 map)", check=">= 0", resume=MUST_MATCH)
    flag(g, "--aux_channels", default=256, type=int, help="auxiliary FCN head width", check=">= 1", resume=MUST_MATCH)
    flag(g, "--aux_weight", default=0.4, type=float, help="auxiliary loss weight (0: no auxiliary head)",
         check=">= 0", resume=MUST_MATCH)
    # The encoder's build options (dmjd_encoders.dense), ConvMAE's segmentation backbone by default. Checkpoints
    # saved before these flags had the options off (`absent`).
    flag(g, "--rel_pos_bias", action=argparse.BooleanOptionalAction, default=True,
         help="a learned relative position bias in every transformer block (ConvMAE's segmentation backbone)",
         resume=MUST_MATCH, absent=False)
    flag(g, "--layer_scale", default=1.0, type=float_or_none,
         help="layer scale's initial value on the blocks' attention and MLP branches (ConvMAE's init_values; "
              "none: no layer scale)", check="> 0", resume=MUST_MATCH, absent=None)
    flag(g, "--simple_pyramid", action=argparse.BooleanOptionalAction, default=None,
         help="ViTDet's simple feature pyramid (strides 4 to 32 from the last block) for a plain ViT (none: on for "
              "a ViT; a ConViT's own stages give its levels)", resume=MUST_MATCH, absent=False)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    flag(g, "--nb_classes", default=150, type=int, help="classes (after --reduce_zero_label)",
         check=">= 1", resume=MUST_MATCH)
    flag(g, "--reduce_zero_label", action=argparse.BooleanOptionalAction, default=True,
         help="annotation 0 is 'unlabelled' (ignored) and k is class k - 1 (ADE20K)", resume=MUST_MATCH)
    flag(g, "--ignore_index", default=255, type=int, help="label of pixels left out of loss and scores",
         check=">= 0", resume=MUST_MATCH)
    flag(g, "--img_scale", default=[2048, 512], type=int, nargs=2, metavar=("LONG", "SHORT"),
         help="images are resized to fit these long / short sides (keeping the aspect ratio), times a "
              "random ratio in training", check=">= 1", resume=MUST_MATCH)
    flag(g, "--ratio_range", default=[0.5, 2.0], type=float, nargs=2, metavar=("LOW", "HIGH"),
         help="random rescale ratio of --img_scale in training", check="> 0", resume=MUST_MATCH)
    flag(g, "--cat_max_ratio", default=0.75, type=float,
         help="redraw a crop (up to 10 times) while one class covers this share of it (1: never)",
         check="(0, 1]", resume=MUST_MATCH)
    flag(g, "--flip_prob", default=0.5, type=float, help="horizontal flip probability",
         check="[0, 1]", resume=MUST_MATCH)
    flag(g, "--photometric", action=argparse.BooleanOptionalAction, default=True,
         help="mmseg's photometric distortion (brightness, contrast, saturation, hue)", resume=MUST_MATCH)


def _add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    flag(g, "--eval", action="store_true", help="only evaluate --resume on the validation set",
         resume="an evaluation loads the weights only, and may change anything")
    flag(g, "--eval_mode", default="slide", choices=["slide", "whole"],
         help="sliding-window or whole-image inference", resume=MUST_MATCH)
    flag(g, "--eval_crop_size", default=None, type=int, help="sliding window (none: --input_size)",
         check=">= 1", resume=MUST_MATCH)
    flag(g, "--eval_stride", default=None, type=int,
         help="sliding-window stride (none: two thirds of the window, 341 at 512)", check=">= 1",
         resume=MUST_MATCH)
    flag(g, "--aug_test", action="store_true", help="multi-scale (--aug_test_ratios) and flip evaluation",
         resume=MUST_MATCH)
    flag(g, "--aug_test_ratios", default=AUG_TEST_RATIOS, type=float, nargs="+",
         help="test scales of --aug_test, relative to --img_scale", resume=MUST_MATCH)
    flag(g, "--eval_batch_size", default=1, type=int,
         help="validation images per batch (more than 1 needs images of one size)",
         check=">= 1", resume="the same scores in batches of any size")


def check_data(args) -> None:
    """Segmentation reads images and annotations of both splits (of the validation split alone with --eval)."""
    splits = ["validation"] if args.eval else ["training", "validation"]
    check_data_path(args.data_path, [f"{kind}/{split}" for split in splits for kind in ("images", "annotations")],
                    "a dataset root in ADE20K's layout: images/ and annotations/, each with training/ and validation/")


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_data)(ARGS)

import engine_segment  # noqa: E402
from training.run import Run  # noqa: E402


def validate_args(args):
    """The flags checked, before any work (the SLURM launcher's check too)."""
    return engine_segment.validate_args(args, get_args_parser())


@exits_like_a_script
def main(args):
    cfg, lr_line = engine_segment.resolve_config(args, get_args_parser())
    check_data(args)  # before the run's header and output folder
    with Run(cfg, save_freq=cfg.save_freq or None, keep_last=cfg.keep_last) as run:
        print(lr_line)
        return engine_segment.run_segmentation(run, cfg)


if __name__ == "__main__":
    main(ARGS)
