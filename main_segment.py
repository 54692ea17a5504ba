"""Semantic segmentation: UperNet on a pre-trained ConViT / ViT encoder, trained and evaluated on ADE20K (or any
dataset in its layout). Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_segment.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/ADEChallengeData2016 --output_dir out/seg_convit_b

Defaults are ConvMAE-B's ADE20K recipe (upernet_convmae_base_512_slide_160k_ade20k); see SEGMENT.md.
"""
from training.flags import check_data_path
from training.flags import segmentation_parser as get_args_parser  # the script's parser, by the scripts' name


# Keys of the encoder that --finetune's checkpoints do not hold: the stride-32 level is new in segmentation.
NEW_ENCODER_KEYS = ("head.", "fc_norm.", "downsample32.")


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
                            evaluate_checkpoint, resolve_config, segmentation_loaders, segmentation_optimizer,
                            segmenter_layout, train_and_evaluate)
from engine_finetune import encoder_layout, load_encoder  # noqa: E402
from models_convvit import conv_weights_channels_last  # noqa: E402
from training.run import Run, TrainState  # noqa: E402
from training.step import TrainStep  # noqa: E402
from training.sync_batchnorm import convert_sync_batchnorm  # noqa: E402


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
