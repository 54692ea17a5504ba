"""Object detection and instance segmentation: Mask R-CNN with FPN on a pre-trained ConViT / ViT encoder, trained and
evaluated on COCO (or any COCO-format dataset). Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_detect.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/coco --output_dir out/det_convit_b

Defaults are ConvMAE-B's 25-epoch COCO recipe (convmae_base_mask_rcnn_FPN_25ep) for a ConViT and ViTDet's 100-epoch one
(mask_rcnn_vitdet_b_100ep) for a ViT (--recipe); see DETECT.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

import os  # noqa: E402

from training.errors import exits_like_a_script, flag_error  # noqa: E402
from training.flags import check_run_flags, detection_split_paths  # noqa: E402
# the script's parser, by the scripts' name
from training.flags import detection_parser as get_args_parser  # noqa: E402


def check_data(args) -> None:
    """The annotation files and image folders the run reads (of the validation split alone with --eval), named by
    the flags or in COCO 2017's layout under --data_path."""
    splits = ["val"] if args.eval else ["train", "val"]
    for split in splits:
        images, annotations = detection_split_paths(args, split)
        if not os.path.isfile(annotations):
            raise flag_error(f"--{split}_json" if getattr(args, f"{split}_json") else "--data_path",
                             f"{annotations!r} is not a file: expected COCO's instance annotations")
        if not os.path.isdir(images):
            raise flag_error(f"--{split}_images" if getattr(args, f"{split}_images") else "--data_path",
                             f"{images!r} is not a folder: expected the images of {annotations}")


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_data)(ARGS)

from functools import partial  # noqa: E402

import models_convvit  # noqa: E402,F401  (registers the encoders with timm)
from engine_detect import (DetectConfig, DetectTask, build_detector, check_detection_checkpoint,  # noqa: E402,F401
                           detection_loaders, encoder_of, resolve_config, run_detection, validate_args)
from training.run import Run  # noqa: E402
from training.transfer import count_parameters, on_run_device, transfer_model  # noqa: E402


@exits_like_a_script
def main(args):
    cfg, lr_line = resolve_config(args)
    check_data(args)  # before the run's header and output folder
    with Run(cfg, save_freq=cfg.save_freq or None, keep_last=cfg.keep_last) as run:
        print(lr_line)
        print(cfg.describe())
        return detect(run, cfg)


def detect(run: Run, cfg: DetectConfig):
    if not cfg.eval:
        print(f"{cfg.iters} iterations of {cfg.images_per_step} images ({cfg.batch_size} per process x "
              f"{cfg.world_size} processes x accum {cfg.accum_iter}); large-scale jitter {cfg.scale_range} at "
              f"{cfg.input_size} px")
    train_loader, val_loader, val_set = detection_loaders(run, cfg)

    model = transfer_model(run, cfg, partial(build_detector, cfg, len(val_set.class_names)), encoder_of,
                           "--model and --input_size", patch_tokens_only=True,
                           check_resumed=check_detection_checkpoint)
    print(f"Mask R-CNN on {cfg.model}: {count_parameters(model):.2f} M parameters "
          f"({count_parameters(model.backbone.body):.2f} M encoder), feature strides {model.backbone.strides}")
    task = DetectTask(on_run_device(model, run, cfg), cfg, run.device, val_set)
    return run_detection(run, cfg, task, (train_loader, val_loader))


if __name__ == "__main__":
    main(ARGS)
