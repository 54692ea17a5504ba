"""Semantic segmentation: UperNet on a pre-trained ConViT / ViT encoder, trained and evaluated on ADE20K (or any
dataset in its layout). Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_segment.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/ADEChallengeData2016 --output_dir out/seg_convit_b

Defaults are ConvMAE-B's ADE20K recipe (upernet_convmae_base_512_slide_160k_ade20k); see SEGMENT.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

from training.errors import exits_like_a_script  # noqa: E402
from training.flags import check_data_path, check_run_flags  # noqa: E402
# the script's parser, by the scripts' name
from training.flags import segmentation_parser as get_args_parser  # noqa: E402


def check_data(args) -> None:
    """Segmentation reads images and annotations of both splits (of the validation split alone with --eval)."""
    splits = ["validation"] if args.eval else ["training", "validation"]
    check_data_path(args.data_path, [f"{kind}/{split}" for split in splits for kind in ("images", "annotations")],
                    "a dataset root in ADE20K's layout: images/ and annotations/, each with training/ and validation/")


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_data)(ARGS)

from functools import partial  # noqa: E402

import models_convvit  # noqa: E402,F401  (registers the encoders with timm)
from engine_segment import (SegmentConfig, SegmentTask, build_segmenter,  # noqa: E402
                            encoder_of, resolve_config, run_segmentation, segmentation_loaders,
                            validate_args)  # noqa: F401  (validate_args: the submitit launcher's check)
from training.run import Run  # noqa: E402
from training.transfer import count_parameters, on_run_device, transfer_model  # noqa: E402


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

    model = transfer_model(run, cfg, partial(build_segmenter, cfg), encoder_of,
                           "--model, --input_size, --out_indices and --aux_in_index")
    print(f"UperNet on {cfg.model}: {count_parameters(model):.2f} M parameters "
          f"({count_parameters(model.backbone):.2f} M encoder), feature strides "
          f"{list(model.backbone.feature_info.reduction())}, channels {model.in_channels}")
    task = SegmentTask(on_run_device(model, run, cfg), cfg, run.device, names)
    return run_segmentation(run, cfg, task, (train_loader, val_loader))


if __name__ == "__main__":
    main(ARGS)
