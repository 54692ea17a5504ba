"""Semantic segmentation: UperNet on a pre-trained ConViT / ViT encoder, trained and evaluated on ADE20K (or any
dataset in its layout). Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_segment.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/ADEChallengeData2016 --output_dir out/seg_convit_b

Defaults are ConvMAE-B's ADE20K recipe (upernet_convmae_base_512_slide_160k_ade20k); see SEGMENT.md.
"""
from training.errors import RunError, exits_like_a_script
from training.flags import check_data_path
from training.flags import segmentation_parser as get_args_parser  # the script's parser, by the scripts' name


def check_data(args) -> None:
    """Segmentation reads images and annotations of both splits (of the validation split alone with --eval)."""
    splits = ["validation"] if args.eval else ["training", "validation"]
    check_data_path(args.data_path, [f"{kind}/{split}" for split in splits for kind in ("images", "annotations")],
                    "a dataset root in ADE20K's layout: images/ and annotations/, each with training/ and validation/")


if __name__ == "__main__":  # the flags first: --help and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_data)(ARGS)

import models_convvit  # noqa: E402,F401  (registers the encoders with timm)
from dmjd_encoders.pretrained import FRESH_KEYS, architecture_kwargs, encoder_layout, load_encoder  # noqa: E402
from engine_segment import (SegmentConfig, SegmentTask, build_segmenter, count_parameters,  # noqa: E402
                            encoder_of, resolve_config, run_segmentation, segmentation_loaders,
                            validate_args)  # noqa: F401  (validate_args: the submitit launcher's check)
from models_convvit import conv_weights_channels_last  # noqa: E402
from training.run import Run  # noqa: E402
from training.sync_batchnorm import convert_sync_batchnorm  # noqa: E402


@exits_like_a_script
def main(args):
    cfg, lr_line = resolve_config(args)
    check_data(args)  # before the run's header and output folder
    with Run(cfg, save_freq=cfg.save_freq or None, keep_last=cfg.keep_last) as run:
        print(lr_line)
        return segment(run, cfg)


def segment(run: Run, cfg: SegmentConfig):
    if not cfg.eval:
        print(f"{cfg.iters} iterations of {cfg.images_per_step} images ({cfg.batch_size} per process x "
              f"{cfg.world_size} processes x accum {cfg.accum_iter}), warmup {cfg.warmup_iters}, poly power "
              f"{cfg.poly_power:g}; evaluation and checkpoint every {cfg.eval_interval} iterations")
    train_loader, val_loader, names = segmentation_loaders(run, cfg)

    # A checkpoint in MAE's / timm's ViT layout (with a class token) keeps its class token, as fine-tuning does.
    resume = run.resume_path(auto=not cfg.eval)
    layout = architecture_kwargs(resume) if resume else encoder_layout(cfg.finetune, cfg.checkpoint_key)
    try:
        model = build_segmenter(cfg, **layout)
    except ValueError as err:  # sizes or levels the encoder cannot give
        raise RunError(f"{err} (check --model, --input_size, --out_indices and --aux_in_index)") from None
    if cfg.finetune and not resume:
        load_encoder(encoder_of(model), cfg.finetune, cfg.checkpoint_key, allowed_missing=FRESH_KEYS["dense"])
    print(f"UperNet on {cfg.model}: {count_parameters(model):.2f} M parameters "
          f"({count_parameters(model.backbone):.2f} M encoder), feature strides "
          f"{list(model.backbone.feature_info.reduction())}, channels {model.in_channels}")
    model = model.to(run.device)
    if run.dist.distributed and not cfg.eval:  # statistics over the whole batch, as the recipe's SyncBN
        model = convert_sync_batchnorm(model, run.device)
    task = SegmentTask(conv_weights_channels_last(model), cfg, run.device, names)
    return run_segmentation(run, cfg, task, (train_loader, val_loader))


if __name__ == "__main__":
    main(ARGS)
