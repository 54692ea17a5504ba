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

import argparse  # noqa: E402
import os  # noqa: E402

from training.errors import exits_like_a_script, flag_error  # noqa: E402
from training.flags import (MUST_MATCH, add_initialisation_flags, add_model_flags, add_optimizer_flags,  # noqa: E402
                            add_run_flags, add_step_flags, check_run_flags, flag, float_or_none)
from util.layouts import detection_split_paths  # noqa: E402

RECIPES = ("convmae", "vitdet")  # engine_detect.DETECTION_RECIPES: their values
REL_POS_CHOICES = ("none", "per_block", "shared", "decomposed")


def get_args_parser() -> argparse.ArgumentParser:
    """The flags: a named recipe (--recipe) gives the schedule's and optimizer's defaults, ConvMAE-B's 25-epoch COCO
    recipe for a ConViT and ViTDet's 100-epoch one for a ViT (engine_detect.DETECTION_RECIPES); the backbone follows
    the model (its family's anchor), each of its options a flag."""
    p = argparse.ArgumentParser("main_detect.py", description="object detection and instance segmentation with "
                                                              "Mask R-CNN",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag(p, "--recipe", default=None, choices=RECIPES, resume=MUST_MATCH,
         help="the schedule and optimizer: convmae (ConvMAE-B's 25 epochs, cosine) or vitdet (ViTDet's 100 epochs, "
              "step decay, layer-wise lr decay); none: convmae for a ConViT, vitdet for a ViT. Flags given win")
    add_step_flags(p, None, "images per GPU and micro-batch (none: the recipe's, for 8 GPUs: convmae 4, 32 images per "
                            "step; vitdet 1 with --accum_iter 8, 64 per step)",
                   "micro-batches per optimizer step (iteration) (none: the recipe's, convmae 1, vitdet 8)",
                   accum_iter=None)
    _add_schedule_flags(p)
    _add_model_flags(p)
    g = p.add_argument_group("optimizer (AdamW)")
    add_optimizer_flags(g, blr=None, blr_help="base lr: lr = blr x total batch / 256 (none: the recipe's, convmae "
                                              "6.4e-4: 8e-5 at 32 images per step; vitdet 4e-4: 1e-4 at 64)",
                        weight_decay=0.1, weight_decay_help="none on norms and position embeddings (and ConvMAE's "
                                                            "relative-position tables with --recipe convmae)")
    flag(g, "--betas", default=[0.9, 0.999], type=float, nargs=2, help="AdamW betas", check="[0, 1)",
         resume=MUST_MATCH)
    flag(g, "--layer_decay", default=None, type=float, check="(0, 1]", resume=MUST_MATCH,
         help="layer-wise lr decay of the encoder (1: none; none: the recipe's, convmae 1, vitdet 0.7 for ViT-B, 0.8 "
              "for ViT-L)")
    _add_data_flags(p)
    g = p.add_argument_group("evaluation")
    flag(g, "--eval", action="store_true", help="only evaluate --resume on the validation set",
         resume="an evaluation loads the weights only, and may change anything")
    flag(g, "--eval_batch_size", default=2, type=int, check=">= 1",
         help="validation images per batch (each is padded to the --input_size square alone: the same detections "
              "in batches of any size)", resume="the same scores in batches of any size")
    add_initialisation_flags(p.add_argument_group("initialisation"),
                             "pre-trained checkpoint (ours, released, or an encoder export)")
    add_run_flags(p, data_help="dataset root in COCO 2017's layout: annotations/instances_{train,val}2017.json, "
                               "train2017/, val2017/")
    p.set_defaults(data_path="/datasets/coco")
    return p


def _add_schedule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule (in iterations, i.e. optimizer steps)")
    flag(g, "--iters", default=None, type=int, check=">= 1", resume=MUST_MATCH,
         help="training iterations (none: the recipe's, convmae 92187 = 368,750 / 4: 25 epochs of COCO at 32 images; "
              "vitdet 184375: 100 epochs at 64)")
    flag(g, "--lr_schedule", default=None, choices=["cosine", "step"], resume=MUST_MATCH,
         help="cosine from --lr to --min_lr, or step: x0.1 at each of --lr_steps (none: the recipe's, convmae cosine, "
              "vitdet step)")
    flag(g, "--lr_steps", default=None, type=float, nargs="+", check="(0, 1)", resume=MUST_MATCH,
         help="with --lr_schedule step: where the lr is divided by 10, as fractions of --iters (none: vitdet's "
              "163889 and 177546 of 184375)")
    flag(g, "--warmup_length", default=None, type=float, check="[0, 1]", resume=MUST_MATCH,
         help="linear warmup, as a fraction of --iters (none: the recipe's, convmae 0.005 = the 100-epoch config's "
              "0.125%% x 4, vitdet 250 iterations of 184375)")
    flag(g, "--warmup_factor", default=0.001, type=float, help="the warmup starts at this fraction of the lr",
         check="[0, 1]", resume=MUST_MATCH)
    flag(g, "--eval_interval", default=None, type=int, check=">= 1", resume=MUST_MATCH,
         help="evaluate and checkpoint every N iterations and at the last (none: the recipe's, convmae 3688, "
              "vitdet 5000)")
    flag(g, "--save_freq", default=0, type=int, check=">= 0",
         help="also keep checkpoint-<k>.pth every N evaluation intervals (0: only last and best)",
         resume="which periodic checkpoints are kept")
    flag(g, "--keep_last", default=0, type=int, help="periodic checkpoints kept (0 = all)", check=">= 0",
         resume="how many periodic checkpoints are kept")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a ConViT: ConvMAE's DET backbone and heads; a ViT: ViTDet's)")
    add_model_flags(g, "convvit_base_patch16", "the encoder (its multi-scale features)", 1024,
                    "training crops are --input_size squared (large-scale jitter); test images are resized to it on "
                    "their longest side; both are padded to the --input_size square")
    flag(g, "--drop_path", default=None, type=float, check="[0, 1)", resume=MUST_MATCH,
         help="stochastic depth rate of the encoder (none: the recipe's, 0.1; vitdet 0.4 for ViT-L, 0.5 for ViT-H)")
    flag(g, "--fpn_channels", default=256, type=int, help="FPN (a ViT: simple pyramid) and RoI heads' width",
         check=">= 1", resume=MUST_MATCH)
    flag(g, "--rois_per_image", default=512, type=int, check=">= 1", resume=MUST_MATCH,
         help="proposals sampled per image for the box head in training (a quarter of them positive at most)")
    flag(g, "--window_size", default=None, type=int, check=">= 0", resume=MUST_MATCH,
         help="the transformer blocks attend within windows of N x N tokens, but --global_blocks (0: every block "
              "global; none: 16 for a ConViT as ConvMAE, 14 for a ViT as ViTDet)")
    flag(g, "--global_blocks", default=None, type=int, nargs="*", check=">= 0", resume=MUST_MATCH,
         help="the transformer blocks that attend globally (none: ConvMAE's 0 3 6 10 of ConViT-B's 11 blocks, at the "
              "same fractions of another depth; ViTDet's last block of each quarter, 2 5 8 11 of ViT-B's 12)")
    flag(g, "--rel_pos", default=None, choices=REL_POS_CHOICES, resume=MUST_MATCH,
         help="relative positions in the attention: shared (ConvMAE's DET: one table for the windowed blocks, one for "
              "the global ones), decomposed (ViTDet's, per block), per_block (a table per block, ConvMAE's "
              "segmentation), none (none: shared for a ConViT, decomposed for a ViT)")
    flag(g, "--pos_embed", default=None, choices=["frozen", "learned"], resume=MUST_MATCH,
         help="the pre-trained absolute position embedding (resampled to the grid) stays frozen (ConvMAE's DET) or "
              "learns (ViTDet) (none: frozen for a ConViT, learned for a ViT)")
    flag(g, "--layer_scale", default=None, type=float_or_none, check="> 0", resume=MUST_MATCH,
         help="layer scale's initial value on the blocks' attention and MLP branches (none: no layer scale, as both "
              "anchors' detection backbones)")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (classes come from the annotation file)")
    flag(g, "--train_json", default="", type=str, resume="the same data may be read from another place",
         help="a COCO-format annotation file for training (none: --data_path's annotations/instances_train2017.json)")
    flag(g, "--train_images", default="", type=str, resume="the same data may be read from another place",
         help="the folder its file_names are relative to (none: --data_path/train2017)")
    flag(g, "--val_json", default="", type=str, resume="the same data may be read from another place",
         help="a COCO-format annotation file for evaluation (none: --data_path's instances_val2017.json)")
    flag(g, "--val_images", default="", type=str, resume="the same data may be read from another place",
         help="the folder its file_names are relative to (none: --data_path/val2017)")
    flag(g, "--scale_range", default=[0.1, 2.0], type=float, nargs=2, metavar=("LOW", "HIGH"), check="> 0",
         resume=MUST_MATCH, help="large-scale jitter: images are resized to --input_size times a random ratio in "
                                 "this range, then cropped (padded) to --input_size")
    flag(g, "--flip_prob", default=0.5, type=float, help="horizontal flip probability", check="[0, 1]",
         resume=MUST_MATCH)


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

import engine_detect  # noqa: E402
from training.run import Run  # noqa: E402


def validate_args(args):
    """The flags checked and resolved, before any work (the SLURM launcher's check too)."""
    return engine_detect.validate_args(args, get_args_parser())


@exits_like_a_script
def main(args):
    cfg, lr_line = engine_detect.resolve_config(args, get_args_parser())
    check_data(args)  # before the run's header and output folder
    with Run(cfg, save_freq=cfg.save_freq or None, keep_last=cfg.keep_last) as run:
        print(lr_line)
        print(cfg.describe())
        return engine_detect.run_detection(run, cfg)


if __name__ == "__main__":
    main(ARGS)
