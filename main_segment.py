"""Semantic segmentation: UperNet on a pre-trained ConViT / ViT encoder, trained and evaluated on ADE20K (or any
dataset in its layout). Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_segment.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/ADEChallengeData2016 --output_dir out/seg_convit_b

Defaults are ConvMAE-B's ADE20K recipe (upernet_convmae_base_512_slide_160k_ade20k); see SEGMENT.md.
"""
import argparse

from training.flags import add_run_flags, check_data_path, check_run_flags, flag_error


# mmseg's multi-scale test ratios (MultiScaleFlipAug's img_ratios in its ADE20K configs)
AUG_TEST_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
# Keys of the encoder that --finetune's checkpoints do not hold: the stride-32 level is new in segmentation.
NEW_ENCODER_KEYS = ("head.", "fc_norm.", "downsample32.")


def get_args_parser():
    p = argparse.ArgumentParser("semantic segmentation with UperNet",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch_size", default=2, type=int, help="images per GPU (the recipe: 2 x 8 GPUs = 16)")
    p.add_argument("--accum_iter", default=1, type=int, help="micro-batches per optimizer step (iteration)")

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

    g = p.add_argument_group("optimizer (AdamW)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (none: blr x total batch / 256)")
    g.add_argument("--blr", default=1.6e-3, type=float,
                   help="base lr: lr = blr x total batch / 256 (the recipe: 1e-4 at 16 images per step)")
    g.add_argument("--min_lr", default=0.0, type=float, help="lr at the end of the poly decay")
    g.add_argument("--betas", default=[0.9, 0.999], type=float, nargs=2, help="AdamW betas")
    g.add_argument("--weight_decay", default=0.05, type=float, help="none on biases, norms and pos_embed")
    g.add_argument("--layer_decay", default=0.75, type=float, help="layer-wise lr decay")
    g.add_argument("--clip_grad", default=None, type=float, help="max gradient norm (none: no clipping)")

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

    g = p.add_argument_group("initialisation")
    g.add_argument("--finetune", default="", help="pre-trained checkpoint (ours, released, or an encoder export)")
    g.add_argument("--checkpoint_key", default="model", choices=["model", "teacher"],
                   help="take the student encoder, or the EMA teacher's")
    add_run_flags(p, data_help="dataset root holding images/{training,validation} and annotations/{...}")
    p.set_defaults(data_path="/datasets/ADEChallengeData2016")
    return p


def check_data(args) -> None:
    """Segmentation reads images and annotations of both splits (of the validation split alone with --eval)."""
    splits = ["validation"] if args.eval else ["training", "validation"]
    check_data_path(args.data_path, [f"{kind}/{split}" for split in splits for kind in ("images", "annotations")],
                    "a dataset root in ADE20K's layout: images/ and annotations/, each with training/ and validation/")


if __name__ == "__main__":  # the flags first: --help and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    check_data(ARGS)

import models_convvit  # noqa: E402,F401  (registers the encoders with timm)
from engine_segment import (SegmentConfig, build_segmenter, count_parameters, encoder_of,  # noqa: E402
                            evaluate_checkpoint, segmentation_loaders, segmentation_optimizer, segmenter_layout,
                            train_and_evaluate)
from engine_finetune import check_pretrained_flag, encoder_layout, load_encoder  # noqa: E402
from models_convvit import check_classifier_name, conv_weights_channels_last  # noqa: E402
from training.distributed import launch_world_size  # noqa: E402
from training.run import Run, TrainState  # noqa: E402
from training.step import TrainStep  # noqa: E402
from training.sync_batchnorm import convert_sync_batchnorm  # noqa: E402
from util.misc import resolve_amp, resolve_device  # noqa: E402


def validate_args(args) -> argparse.Namespace:
    """Fails before any work, naming the flag; returns a copy of `args` with the run layer's epochs (evaluation
    intervals) and warmup in them (`args` itself is left as it is)."""
    for flag in ("iters", "eval_interval", "decoder_channels", "aux_channels", "nb_classes", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise flag_error(f"--{flag}", f"must be >= 1, got {getattr(args, flag)}")
    for flag in ("save_freq", "keep_last", "aux_weight", "min_lr"):
        if getattr(args, flag) < 0:
            raise flag_error(f"--{flag}", f"must be >= 0, got {getattr(args, flag)}")
    if args.iters % args.eval_interval:
        raise flag_error("--iters", f"{args.iters} must be a multiple of --eval_interval {args.eval_interval} (the "
                                    f"run evaluates and checkpoints at the end of each interval)")
    if not 0 <= args.warmup_iters <= args.iters:
        raise flag_error("--warmup_iters", f"must be in [0, --iters {args.iters}], got {args.warmup_iters}")
    if not 0 <= args.warmup_ratio <= 1:
        raise flag_error("--warmup_ratio", f"must be in [0, 1], got {args.warmup_ratio}")
    if not args.poly_power > 0:
        raise flag_error("--poly_power", f"must be > 0, got {args.poly_power}")
    if not 0 < args.layer_decay <= 1:
        raise flag_error("--layer_decay", f"must be in (0, 1], got {args.layer_decay}")
    if not all(0 <= b < 1 for b in args.betas):
        raise flag_error("--betas", f"must be in [0, 1), got {args.betas}")
    for flag in ("drop_path", "head_dropout"):
        if not 0 <= getattr(args, flag) < 1:
            raise flag_error(f"--{flag}", f"must be in [0, 1), got {getattr(args, flag)}")
    if min(args.pool_scales) < 1:
        raise flag_error("--pool_scales", f"must be >= 1, got {args.pool_scales}")
    if args.ignore_index < args.nb_classes:
        raise flag_error("--ignore_index", f"{args.ignore_index} is one of the {args.nb_classes} classes "
                                           f"(--nb_classes); it must be >= {args.nb_classes}")
    if min(args.img_scale) < 1:
        raise flag_error("--img_scale", f"must be positive, got {args.img_scale}")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise flag_error("--ratio_range", f"must be LOW HIGH with 0 < LOW <= HIGH, got {args.ratio_range}")
    if not 0 < args.cat_max_ratio <= 1:
        raise flag_error("--cat_max_ratio", f"must be in (0, 1], got {args.cat_max_ratio}")
    if not 0 <= args.flip_prob <= 1:
        raise flag_error("--flip_prob", f"must be in [0, 1], got {args.flip_prob}")
    if args.eval_crop_size is not None and args.eval_crop_size < 1:
        raise flag_error("--eval_crop_size", f"must be >= 1, got {args.eval_crop_size}")
    crop = args.eval_crop_size or args.input_size
    if args.eval_stride is not None and not 1 <= args.eval_stride <= crop:
        raise flag_error("--eval_stride", f"must be in [1, the window {crop}], got {args.eval_stride}")
    if min(args.aug_test_ratios) <= 0:
        raise flag_error("--aug_test_ratios", f"must be positive, got {args.aug_test_ratios}")
    check_pretrained_flag(args.finetune)
    if args.eval and not args.resume:
        raise flag_error("--eval", "needs --resume: the checkpoint of a segmentation run to evaluate")
    world_size = launch_world_size()
    if args.batch_size * world_size < 2:
        raise flag_error("--batch_size", f"{args.batch_size} x {world_size} processes gives BatchNorm one image per "
                                         f"step, and the PPM's 1 x 1 pooling one value per channel: use 2 or more "
                                         f"images per step (over all processes)")
    epochs = args.iters // args.eval_interval
    derived = argparse.Namespace(**{**vars(args), "epochs": epochs,
                                    "warmup_epochs": args.warmup_iters / args.eval_interval})
    check_run_flags(derived)
    check_classifier_name(args.model)
    return derived


def resolve_config(args):
    """(config, lr line): the flags checked, with the lr (blr x total batch / 256 unless --lr), the precision, the
    evaluation window and stride resolved for the launch's device and world size."""
    args = validate_args(args)
    device, world_size = resolve_device(args.device), launch_world_size()
    images_per_step = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * images_per_step / 256
    line = (f"lr = {lr:.4g} (given)" if args.lr is not None else
            f"lr = blr {args.blr:.3g} x {images_per_step} images / 256 = {lr:.4g}")
    crop = args.eval_crop_size or args.input_size
    stride = args.eval_stride or max(1, crop * 2 // 3)
    cfg = SegmentConfig.from_args(args, lr=lr, amp=resolve_amp(args.amp, device)[0], world_size=world_size,
                                  eval_crop_size=crop, eval_stride=stride)
    return cfg, line


def main(args):
    cfg, lr_line = resolve_config(args)
    check_data(args)  # before the run's header and output folder
    with Run(cfg, save_freq=cfg.save_freq or None, keep_last=cfg.keep_last) as run:
        print(lr_line)
        segment(run, cfg)


def segment(run: Run, cfg: SegmentConfig):
    if not cfg.eval:
        print(f"{cfg.iters} iterations of {cfg.images_per_step} images ({cfg.batch_size} per process x "
              f"{cfg.world_size} processes x accum {cfg.accum_iter}), warmup {cfg.warmup_iters}, poly power "
              f"{cfg.poly_power:g}; evaluation and checkpoint every {cfg.eval_interval} iterations")
    train_loader, val_loader, names = segmentation_loaders(run, cfg)

    # A checkpoint in MAE's / timm's ViT layout (with a class token) keeps its class token, as fine-tuning does.
    resume = run.resume_path(auto=not cfg.eval)
    layout = segmenter_layout(resume) if resume else encoder_layout(cfg.finetune, cfg.checkpoint_key)
    try:
        model = build_segmenter(cfg, **layout)
    except ValueError as err:  # sizes or levels the encoder cannot give
        raise SystemExit(f"error: {err} (check --model, --input_size, --out_indices and --aux_in_index)") from None
    if cfg.finetune and not resume:
        load_encoder(encoder_of(model), cfg.finetune, cfg.checkpoint_key, allowed_missing=NEW_ENCODER_KEYS)
    print(f"UperNet on {cfg.model}: {count_parameters(model):.2f} M parameters "
          f"({count_parameters(model.backbone):.2f} M encoder), feature strides "
          f"{list(model.backbone.feature_info.reduction())}, channels {model.in_channels}")
    model = model.to(run.device)
    if cfg.eval:
        return evaluate_checkpoint(run, cfg, conv_weights_channels_last(model), val_loader, names)

    if run.dist.distributed:  # statistics over the whole batch, as the recipe's SyncBN
        model = convert_sync_batchnorm(model, run.device)
    model = conv_weights_channels_last(model)
    trained = run.wrap(model)
    optimizer = segmentation_optimizer(model, cfg)
    step = TrainStep.for_run(trained, optimizer, cfg, run.rank, cfg.micro_batches_per_interval,
                             loss_names=cfg.loss_names)
    return train_and_evaluate(run, cfg, trained, TrainState(model, optimizer, step), (train_loader, val_loader),
                              names)


if __name__ == "__main__":
    main(ARGS)
