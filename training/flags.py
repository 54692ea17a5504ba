"""The flags every training script shares and their checks, importable without torch: a script parses its command
line and checks --data_path before it imports torch, so that --help, a malformed flag and a missing data folder answer
at once; every check here runs before the run prints its config or makes its output folder. main_segment.py's whole
parser is here too (`segmentation_parser`), as the segmentation benchmark builds its configs from the same recipe."""
import argparse
import os
import signal
from typing import Sequence

from training.errors import flag_error

# Defaults and choices that name models (kept here so that a parser needs no model code): the released pre-training
# recipe's model (models_dmjd), and the features a linear probe can take (models_convvit.LinearProbe).
DEFAULT_PRETRAIN_MODEL = "dmjd_convit_base_patch16_dec8_hog"
PROBE_FEATURES = ("pool_then_fresh_norm", "final_norm_then_pool")


def add_run_flags(parser: argparse.ArgumentParser, data_help: str) -> argparse._ArgumentGroup:
    """Data, output, device, precision, seeding, resume, logging and loading flags (the same in every script)."""
    g = parser.add_argument_group("data and run")
    g.add_argument("--data_path", default="/datasets/imagenet", type=str, help=data_help)
    g.add_argument("--output_dir", default="./output_dir", type=str, help="checkpoints and log.txt")
    g.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (none: --output_dir)")
    g.add_argument("--device", default="auto", type=str, help="auto, cuda, cuda:<index> or cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--seed", default=0, type=int, help="seeds crops, augmentation, masks and shuffling")
    g.add_argument("--resume", default="", type=str, help="checkpoint to resume (none: output_dir's last one)")
    g.add_argument("--print_freq", default=20, type=int,
                   help="steps between log lines; the losses are read back from the device only then")
    g.add_argument("--skip_nonfinite", default=0, type=int,
                   help="skip up to N optimizer steps with a non-finite loss in the run, then stop (0: stop at the "
                        "first; N > 0 reads the loss back every step)")
    g.add_argument("--num_workers", default=10, type=int, help="data-loading processes")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pinned host memory for the batches (CUDA)")
    g.add_argument("--allow_flag_changes", default="", type=str,
                   help="flags that may differ from the resumed checkpoint's, comma-separated ('all': any); by default "
                        "a change to the run's schedule or model stops it")
    g.add_argument("--stop_signals", default="TERM,USR1", type=str,
                   help="signals after which the run saves a checkpoint of its current step and exits with status 75 "
                        "(requeue)")
    g.add_argument("--dist_timeout", default=10.0, type=float,
                   help="minutes a collective waits for the other processes before the run fails naming it")
    g.add_argument("--start_over", action="store_true",
                   help="start at epoch 0 when every checkpoint in --output_dir is damaged (they and log.txt are moved "
                        "into a subfolder); without it such a folder stops the run")
    return g


def add_classification_flags(group: argparse._ArgumentGroup) -> None:
    """The flags fine-tuning and linear probing share: classes, evaluation only, sharded evaluation."""
    group.add_argument("--nb_classes", default=1000, type=int, help="size of the classifier")
    group.add_argument("--eval", action="store_true", help="only evaluate --resume (or --finetune) on val/")
    group.add_argument("--dist_eval", action=argparse.BooleanOptionalAction, default=True,
                       help="shard evaluation over processes (exact: no padding); off = every process evaluates all")


def check_classification_data(args) -> None:
    """Fine-tuning and probing read `train/` and `val/` of --data_path (`val/` alone with --eval)."""
    check_data_path(args.data_path, ["val"] if args.eval else ["train", "val"],
                    "an ImageFolder root: train/ and val/, each with one folder of images per class")


def check_run_flags(args) -> None:
    """The checks every training script makes before any work; each failure names its flag. Reads, never writes."""
    for flag in ("batch_size", "accum_iter", "input_size", "print_freq"):
        if getattr(args, flag) < 1:
            raise flag_error(f"--{flag}", f"must be >= 1, got {getattr(args, flag)}")
    for flag in ("skip_nonfinite", "num_workers", "weight_decay", "min_lr"):
        if getattr(args, flag) < 0:
            raise flag_error(f"--{flag}", f"must be >= 0, got {getattr(args, flag)}")
    for flag in ("blr", "lr", "clip_grad"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            raise flag_error(f"--{flag}", f"must be > 0, got {getattr(args, flag)}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise flag_error("--device", f"must be auto, cpu, cuda or cuda:<index>, got {args.device!r}")
    if args.resume and not os.path.isfile(args.resume):
        raise flag_error("--resume", f"{args.resume!r} is not a file")
    if not args.dist_timeout > 0:
        raise flag_error("--dist_timeout", f"must be > 0 minutes, got {args.dist_timeout}")
    for name in (n.strip() for n in args.stop_signals.split(",")):
        if name in ("KILL", "STOP") or not isinstance(getattr(signal, "SIG" + name, None), signal.Signals):
            raise flag_error("--stop_signals", f"{name!r} is not a signal that can be caught (e.g. TERM,USR1)")


def check_epoch_flags(args) -> None:
    """--epochs and --warmup_epochs of a run counted in epochs."""
    if args.epochs < 1:
        raise flag_error("--epochs", f"must be >= 1, got {args.epochs}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise flag_error("--warmup_epochs", f"must be in [0, --epochs {args.epochs}], got {args.warmup_epochs}; "
                                            f"give a shorter warmup for a short run")


def check_data_path(data_path: str, folders: Sequence[str], layout: str) -> None:
    """--data_path must hold the folders the script reads (`layout` says what they hold); checked before any work."""
    if not os.path.isdir(data_path):
        raise flag_error("--data_path", f"{data_path!r} is not a folder: expected {layout}")
    for folder in folders:
        if not os.path.isdir(os.path.join(data_path, folder)):
            raise flag_error("--data_path", f"{data_path!r} has no '{folder}/' folder: expected {layout}")


# mmseg's multi-scale test ratios (MultiScaleFlipAug's img_ratios in its ADE20K configs)
AUG_TEST_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def segmentation_parser() -> argparse.ArgumentParser:
    """main_segment.py's flags: ConvMAE-B's ADE20K recipe by default (the segmentation benchmark builds its configs
    from them too)."""
    p = argparse.ArgumentParser("semantic segmentation with UperNet",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch_size", default=2, type=int, help="images per GPU (the recipe: 2 x 8 GPUs = 16)")
    p.add_argument("--accum_iter", default=1, type=int, help="micro-batches per optimizer step (iteration)")
    _add_segmentation_schedule_flags(p)
    _add_segmentation_model_flags(p)
    _add_segmentation_optimizer_flags(p)
    _add_segmentation_data_flags(p)
    _add_segmentation_evaluation_flags(p)
    _add_segmentation_initialisation_flags(p)
    add_run_flags(p, data_help="dataset root holding images/{training,validation} and annotations/{...}")
    p.set_defaults(data_path="/datasets/ADEChallengeData2016")
    return p


def _add_segmentation_schedule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule (in iterations, i.e. optimizer steps)")
    g.add_argument("--iters", default=160000, type=int, help="training iterations")
    g.add_argument("--warmup_iters", default=1500, type=int, help="linear lr warmup")
    g.add_argument("--warmup_ratio", default=1e-6, type=float, help="the warmup starts at this fraction of the lr")
    g.add_argument("--poly_power", default=1.0, type=float,
                   help="lr = (lr - min_lr) x (1 - iter / iters)^power + min_lr")
    g.add_argument("--eval_interval", default=16000, type=int,
                   help="evaluate and checkpoint every N iterations (--iters must be a multiple)")
    g.add_argument("--save_freq", default=0, type=int,
                   help="also keep checkpoint-<k>.pth every N evaluation intervals (0: only last and best)")
    g.add_argument("--keep_last", default=0, type=int, help="periodic checkpoints kept (0 = all)")


def _add_segmentation_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="convvit_base_patch16", type=str, help="the encoder (its multi-scale features)")
    g.add_argument("--input_size", default=512, type=int, help="training crop size in pixels")
    g.add_argument("--drop_path", default=0.2, type=float, help="stochastic depth rate of the encoder")
    g.add_argument("--out_indices", default=None, type=int, nargs="+",
                   help="encoder feature levels the decoder takes (none: all four of ConViT, strides 4 to 32)")
    g.add_argument("--decoder_channels", default=768, type=int,
                   help="UPerHead width (ConvMAE-B's config; mmseg's UperNet default is 512)")
    g.add_argument("--pool_scales", default=[1, 2, 3, 6], type=int, nargs="+", help="PPM pooling bins")
    g.add_argument("--head_dropout", default=0.1, type=float, help="dropout before both heads' classifiers")
    g.add_argument("--aux_in_index", default=2, type=int,
                   help="feature level of the auxiliary FCN head (2: the stride-16 map)")
    g.add_argument("--aux_channels", default=256, type=int, help="auxiliary FCN head width")
    g.add_argument("--aux_weight", default=0.4, type=float, help="auxiliary loss weight (0: no auxiliary head)")


def _add_segmentation_optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer (AdamW)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (none: blr x total batch / 256)")
    g.add_argument("--blr", default=1.6e-3, type=float,
                   help="base lr: lr = blr x total batch / 256 (the recipe: 1e-4 at 16 images per step)")
    g.add_argument("--min_lr", default=0.0, type=float, help="lr at the end of the poly decay")
    g.add_argument("--betas", default=[0.9, 0.999], type=float, nargs=2, help="AdamW betas")
    g.add_argument("--weight_decay", default=0.05, type=float, help="none on biases, norms and pos_embed")
    g.add_argument("--layer_decay", default=0.75, type=float, help="layer-wise lr decay")
    g.add_argument("--clip_grad", default=None, type=float, help="max gradient norm (none: no clipping)")


def _add_segmentation_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--nb_classes", default=150, type=int, help="classes (after --reduce_zero_label)")
    g.add_argument("--reduce_zero_label", action=argparse.BooleanOptionalAction, default=True,
                   help="annotation 0 is 'unlabelled' (ignored) and k is class k - 1 (ADE20K)")
    g.add_argument("--ignore_index", default=255, type=int, help="label of pixels left out of loss and scores")
    g.add_argument("--img_scale", default=[2048, 512], type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="images are resized to fit these long / short sides (keeping the aspect ratio), times a "
                        "random ratio in training")
    g.add_argument("--ratio_range", default=[0.5, 2.0], type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="random rescale ratio of --img_scale in training")
    g.add_argument("--cat_max_ratio", default=0.75, type=float,
                   help="redraw a crop (up to 10 times) while one class covers this share of it (1: never)")
    g.add_argument("--flip_prob", default=0.5, type=float, help="horizontal flip probability")
    g.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True,
                   help="mmseg's photometric distortion (brightness, contrast, saturation, hue)")


def _add_segmentation_evaluation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume on the validation set")
    g.add_argument("--eval_mode", default="slide", choices=["slide", "whole"],
                   help="sliding-window or whole-image inference")
    g.add_argument("--eval_crop_size", default=None, type=int, help="sliding window (none: --input_size)")
    g.add_argument("--eval_stride", default=None, type=int,
                   help="sliding-window stride (none: two thirds of the window, 341 at 512)")
    g.add_argument("--aug_test", action="store_true", help="multi-scale (--aug_test_ratios) and flip evaluation")
    g.add_argument("--aug_test_ratios", default=AUG_TEST_RATIOS, type=float, nargs="+",
                   help="test scales of --aug_test, relative to --img_scale")
    g.add_argument("--eval_batch_size", default=1, type=int,
                   help="validation images per batch (more than 1 needs images of one size)")


def _add_segmentation_initialisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("initialisation")
    g.add_argument("--finetune", default="", help="pre-trained checkpoint (ours, released, or an encoder export)")
    g.add_argument("--checkpoint_key", default="model", choices=["model", "teacher"],
                   help="take the student encoder, or the EMA teacher's")
