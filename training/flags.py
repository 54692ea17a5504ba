"""The flags every training script shares and their checks, importable without torch: a script parses its command
line and checks its flags (`check_run_flags`: each one's declared range, --allow_flag_changes's names) and --data_path
before it imports torch, so that --help, a malformed flag, a value out of range and a missing data folder answer at
once; every check here runs before the run prints its config or makes its output folder. main_segment.py's whole
parser is here too (`segmentation_parser`), as the segmentation benchmark builds its configs from the same recipe."""
import argparse
import difflib
import os
import signal
from typing import Dict, Optional, Sequence, Tuple

from training.errors import flag_error

MUST_MATCH = "must match"  # a flag that defines what the run computes (see `flag`)
# what defines a run without being a flag (training.config.TrainConfig resolves it): --allow_flag_changes may name it
RESOLVED_MUST_MATCH = ("world_size",)
NOT_DECLARED = object()  # `flag`'s `absent` when runs were never saved without the flag
_RANGES = {  # check -> (the values it allows, as its error says them)
    ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0,
    "(0, 1)": lambda v: 0 < v < 1, "(0, 1]": lambda v: 0 < v <= 1, "[0, 1]": lambda v: 0 <= v <= 1,
    "[0, 1)": lambda v: 0 <= v < 1,
}


def flag(group, name: str, *, resume: str, check: Optional[str] = None, absent=NOT_DECLARED,
         **kwargs) -> argparse.Action:
    """`group.add_argument(name, **kwargs)`, with what a resumed run does with the flag and the values it allows.

    `resume`: MUST_MATCH for a flag that defines what the run computes (model, optimisation, schedule, data order
    and augmentation, method): a resumed run must have the checkpoint's value, or name the flag in
    --allow_flag_changes. Else the reason it may change: it says where or how the run executes or reports, not what
    it computes. `check`: one of ">= 0", ">= 1", "> 0", "(0, 1)", "(0, 1]", "[0, 1]", "[0, 1)", the range of its
    value (of each value, for a list; None passes), checked by `check_flags` before any work. `absent`: for a
    MUST_MATCH flag added after checkpoints were saved without it, what those runs computed with (an option that
    did not exist: off); resuming such a checkpoint then needs this value (see `absent_values`)."""
    if check is not None and check not in _RANGES:
        raise ValueError(f"{name}: unknown check {check!r}; one of {', '.join(_RANGES)}")
    action = group.add_argument(name, **kwargs)
    action.resume, action.check = resume, check
    if absent is not NOT_DECLARED:
        action.absent = absent
    return action


def resume_rules(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """{flag: MUST_MATCH or the reason it may change on resume} of every flag `flag` declared in `parser`."""
    return {a.dest: a.resume for a in parser._actions if hasattr(a, "resume")}


def absent_values(parser: argparse.ArgumentParser) -> Dict[str, object]:
    """{flag: the value of a checkpoint saved before the flag existed} of the flags of `parser` that declare one."""
    return {a.dest: a.absent for a in parser._actions if hasattr(a, "absent")}


def must_match(parser: argparse.ArgumentParser) -> Tuple[str, ...]:
    return tuple(sorted(name for name, rule in resume_rules(parser).items() if rule == MUST_MATCH))


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    """The range of every flag of `parser` that declares one (`flag(..., check=...)`), in the parser's order; the
    first one out of range raises naming it: `--<flag> must be <range>, got <value>`."""
    for action in parser._actions:
        check = getattr(action, "check", None)
        value = getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        if not all(_RANGES[check](v) for v in (value if isinstance(value, list) else [value])):
            shown = check if check[0] in "<>" else f"in {check}"
            raise flag_error(action.option_strings[0], f"must be {shown}, got {value}")

# Defaults and choices that name models (kept here so that a parser needs no model code): the released pre-training
# recipe's model (models_dmjd), and the features a linear probe can take (models_convvit.LinearProbe).
DEFAULT_PRETRAIN_MODEL = "dmjd_convit_base_patch16_dec8_hog"
PROBE_FEATURES = ("pool_then_fresh_norm", "final_norm_then_pool")


def add_run_flags(parser: argparse.ArgumentParser, data_help: str) -> argparse._ArgumentGroup:
    """Data, output, device, precision, seeding, resume, logging and loading flags (the same in every script)."""
    g = parser.add_argument_group("data and run")
    flag(g, "--data_path", default="/datasets/imagenet", type=str, help=data_help,
            resume="the same data may be read from another place (its content is not compared)")
    flag(g, "--output_dir", default="./output_dir", type=str, help="checkpoints and log.txt",
            resume="where the run writes, not what it computes")
    flag(g, "--log_dir", default=None, type=str, help="TensorBoard folder (none: --output_dir)",
            resume="where TensorBoard's events go")
    flag(g, "--device", default="auto", type=str, help="auto, cuda, cuda:<index> or cpu",
            resume="where the run executes (e.g. resuming a GPU run's checkpoint on another node)")
    flag(g, "--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
            help="autocast dtype (auto: bf16 on CUDA, none on CPU)",
            resume="the arithmetic's precision, not the method (e.g. fp16 on GPUs without bf16)")
    flag(g, "--seed", default=0, type=int, help="seeds crops, augmentation, masks and shuffling", resume=MUST_MATCH)
    flag(g, "--resume", default="", type=str, help="checkpoint to resume (none: output_dir's last one)",
            resume="which file to continue from (the newest good one of it and the folder wins)")
    flag(g, "--print_freq", default=20, type=int,
            help="steps between log lines; the losses are read back from the device only then",
            check=">= 1", resume="how often losses are read back and printed; the steps are the same")
    flag(g, "--skip_nonfinite", default=0, type=int,
            help="skip up to N optimizer steps with a non-finite loss in the run, then stop (0: stop at the "
                 "first; N > 0 reads the loss back every step)",
            check=">= 0", resume="the failure policy: raising it gets a run past a known bad step")
    flag(g, "--num_workers", default=10, type=int, help="data-loading processes", check=">= 0",
            resume="samples are seeded by (seed, epoch, index): the same crops with any number of workers")
    flag(g, "--pin_mem", action=argparse.BooleanOptionalAction, default=True,
            help="pinned host memory for the batches (CUDA)", resume="host memory for the batches; the same values")
    flag(g, "--allow_flag_changes", default="", type=str,
            help="flags that may differ from the resumed checkpoint's, comma-separated ('all': any); by default "
                 "a change to the run's schedule or model stops it", resume="names the changes allowed in this start")
    flag(g, "--stop_signals", default="TERM,USR1", type=str,
            help="signals after which the run saves a checkpoint of its current step and exits with status 75 "
                 "(requeue)", resume="how the scheduler stops the run")
    flag(g, "--dist_timeout", default=10.0, type=float,
            help="minutes a collective waits for the other processes before the run fails naming it", check="> 0",
            resume="how long a collective waits before the run fails")
    flag(g, "--start_over", action="store_true",
            help="start at epoch 0 when every checkpoint in --output_dir is damaged (they and log.txt are moved "
                 "into a subfolder); without it such a folder stops the run",
            resume="only read when the folder has no loadable checkpoint")
    return g


def add_classification_flags(group: argparse._ArgumentGroup) -> None:
    """The flags fine-tuning and linear probing share: classes, evaluation only, sharded evaluation."""
    flag(group, "--nb_classes", default=1000, type=int, help="size of the classifier", check=">= 1", resume=MUST_MATCH)
    flag(group, "--eval", action="store_true", help="only evaluate --resume (or --finetune) on val/",
                resume="an evaluation loads the weights only, and may change anything")
    flag(group, "--dist_eval", action=argparse.BooleanOptionalAction, default=True,
                help="shard evaluation over processes (exact: no padding); off = every process evaluates all",
                resume="sharded or not, evaluation is exact: the same scores")


def check_classification_data(args) -> None:
    """Fine-tuning and probing read `train/` and `val/` of --data_path (`val/` alone with --eval)."""
    check_data_path(args.data_path, ["val"] if args.eval else ["train", "val"],
                    "an ImageFolder root: train/ and val/, each with one folder of images per class")


def check_run_flags(parser: argparse.ArgumentParser, args) -> None:
    """The checks every training script makes before any work, and before it imports torch: the declared range of
    each of its flags (`check_flags`), then those of the run flags (add_run_flags); each failure names its flag.
    Reads, never writes."""
    check_flags(parser, args)
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise flag_error("--device", f"must be auto, cpu, cuda or cuda:<index>, got {args.device!r}")
    if args.resume and not os.path.isfile(args.resume):
        raise flag_error("--resume", f"{args.resume!r} is not a file")
    check_allowed_changes(parser, args.allow_flag_changes)
    for name in (n.strip() for n in args.stop_signals.split(",")):
        if name in ("KILL", "STOP") or not isinstance(getattr(signal, "SIG" + name, None), signal.Signals):
            raise flag_error("--stop_signals", f"{name!r} is not a signal that can be caught (e.g. TERM,USR1)")


def check_allowed_changes(parser: argparse.ArgumentParser, allowed: str) -> None:
    """--allow_flag_changes names flags of `parser` (without `--`; or `all`, or a resolved name of RESOLVED_MUST_MATCH):
    a misspelt one would otherwise allow nothing, and the run would stop at resume naming the change it meant."""
    known = [a.dest for a in parser._actions if hasattr(a, "resume")] + list(RESOLVED_MUST_MATCH) + ["all"]
    for name in (n.strip() for n in allowed.split(",")):
        if name and name not in known:
            close = difflib.get_close_matches(name.lstrip("-"), known, n=3, cutoff=0.6)
            raise flag_error("--allow_flag_changes", f"{name!r} is not a flag of this script" + (
                f"; did you mean {', '.join(close)}?" if close else
                "; give the names of flags without '--', comma-separated (e.g. epochs,lr), or all"))


def check_input_size(input_size: int, model: str, stride: int) -> None:
    """--input_size must be a multiple of --model's `stride` (the pixels of one token's side): the token grid has
    no fraction of a token."""
    if input_size % stride:
        below, above = input_size // stride * stride, (input_size // stride + 1) * stride
        raise flag_error("--input_size", f"{input_size} must be divisible by the model's stride, {stride} for --model "
                                          f"{model} (e.g. {f'{below} or ' if below else ''}{above})")


def check_epoch_flags(args) -> None:
    """--warmup_epochs within --epochs, for a run counted in epochs."""
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
    flag(p, "--batch_size", default=2, type=int, help="images per GPU (the recipe: 2 x 8 GPUs = 16)",
            check=">= 1", resume=MUST_MATCH)
    flag(p, "--accum_iter", default=1, type=int, help="micro-batches per optimizer step (iteration)",
            check=">= 1", resume=MUST_MATCH)
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


def _add_segmentation_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    flag(g, "--model", default="convvit_base_patch16", type=str, help="the encoder (its multi-scale features)",
            resume=MUST_MATCH)
    flag(g, "--input_size", default=512, type=int, help="training crop size in pixels", check=">= 1", resume=MUST_MATCH)
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
    _add_dense_backbone_flags(g)


def float_or_none(text: str) -> Optional[float]:
    """A flag's float, or `none`."""
    return None if text.lower() == "none" else float(text)


def _add_dense_backbone_flags(g) -> None:
    """The encoder's build options for segmentation (dmjd_encoders.dense), ConvMAE's segmentation backbone by default.
    Checkpoints saved before these flags had the options off (`absent`)."""
    flag(g, "--rel_pos_bias", action=argparse.BooleanOptionalAction, default=True,
            help="a learned relative position bias in every transformer block (ConvMAE's segmentation backbone)",
            resume=MUST_MATCH, absent=False)
    flag(g, "--layer_scale", default=1.0, type=float_or_none,
            help="layer scale's initial value on the blocks' attention and MLP branches (ConvMAE's init_values; "
                 "none: no layer scale)", check="> 0", resume=MUST_MATCH, absent=None)
    flag(g, "--simple_pyramid", action=argparse.BooleanOptionalAction, default=None,
            help="ViTDet's simple feature pyramid (strides 4 to 32 from the last block) for a plain ViT (none: on for "
                 "a ViT; a ConViT's own stages give its levels)", resume=MUST_MATCH, absent=False)


def _add_segmentation_optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer (AdamW)")
    flag(g, "--lr", default=None, type=float, help="absolute lr (none: blr x total batch / 256)",
            check="> 0", resume=MUST_MATCH)
    flag(g, "--blr", default=1.6e-3, type=float,
            help="base lr: lr = blr x total batch / 256 (the recipe: 1e-4 at 16 images per step)",
            check="> 0", resume=MUST_MATCH)
    flag(g, "--min_lr", default=0.0, type=float, help="lr at the end of the poly decay",
            check=">= 0", resume=MUST_MATCH)
    flag(g, "--betas", default=[0.9, 0.999], type=float, nargs=2, help="AdamW betas", check="[0, 1)", resume=MUST_MATCH)
    flag(g, "--weight_decay", default=0.05, type=float, help="none on biases, norms and pos_embed",
            check=">= 0", resume=MUST_MATCH)
    flag(g, "--layer_decay", default=0.75, type=float, help="layer-wise lr decay", check="(0, 1]", resume=MUST_MATCH)
    flag(g, "--clip_grad", default=None, type=float, help="max gradient norm (none: no clipping)",
            check="> 0", resume=MUST_MATCH)


def _add_segmentation_data_flags(p: argparse.ArgumentParser) -> None:
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


def _add_segmentation_evaluation_flags(p: argparse.ArgumentParser) -> None:
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


def _add_segmentation_initialisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("initialisation")
    flag(g, "--finetune", default="", help="pre-trained checkpoint (ours, released, or an encoder export)",
            resume="only the first start loads it: a resumed run's weights come from its checkpoint")
    flag(g, "--checkpoint_key", default="model", choices=["model", "teacher"],
            help="take the student encoder, or the EMA teacher's", resume="only the first start reads --finetune")


# The detection recipes (main_detect.py --recipe) and the flags they set where the flag is not given. ConvMAE-B's
# 25-epoch COCO config (DET/configs/convmae/convmae_base_mask_rcnn_FPN_25ep.py: 368,750 / 4 iterations of 32 images,
# evaluated every 3,688; lr 8e-5, cosine) for a ConViT; ViTDet's 100-epoch config (detectron2 projects/ViTDet/configs/
# COCO/mask_rcnn_vitdet_b_100ep.py: 184,375 iterations of 64 images, lr 1e-4 x0.1 at 163,889 and 177,546, 250 warmup
# iterations, layer-wise lr decay 0.7; eval_period 5,000 of detectron2's common train config) for a ViT.
# "per GPU" batch sizes are for one 8-GPU node.
DETECTION_RECIPES = {
    "convmae": dict(iters=92187, eval_interval=3688, batch_size=4, accum_iter=1, blr=6.4e-4, lr_schedule="cosine",
                    lr_steps=None, warmup_length=0.005, layer_decay=1.0, drop_path=0.1),
    # 64 images per step as 1 image x 8 GPUs x 8 accumulated micro-batches (ViTDet: 1 image on each of 64 GPUs; about
    # 11 GB each for ViT-B at 1024 px, 21 GB for ViT-L; LayerNorm throughout, so accumulating changes nothing)
    "vitdet": dict(iters=184375, eval_interval=5000, batch_size=1, accum_iter=8, blr=4e-4, lr_schedule="step",
                   lr_steps=[163889 / 184375, 177546 / 184375], warmup_length=250 / 184375, layer_decay=0.7,
                   drop_path=0.1),
}
# ViTDet's larger ViTs (mask_rcnn_vitdet_l_100ep.py, _h_75ep.py): by the transformer's depth
VITDET_BY_DEPTH = {24: dict(layer_decay=0.8, drop_path=0.4), 32: dict(layer_decay=0.9, drop_path=0.5)}
REL_POS_CHOICES = ("none", "per_block", "shared", "decomposed")


def detection_parser() -> argparse.ArgumentParser:
    """main_detect.py's flags: a named recipe (--recipe) gives the schedule's and optimizer's defaults, ConvMAE-B's
    25-epoch COCO recipe for a ConViT and ViTDet's 100-epoch one for a ViT (DETECTION_RECIPES); the backbone follows
    the model (its family's anchor), each of its options a flag."""
    p = argparse.ArgumentParser("object detection and instance segmentation with Mask R-CNN",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag(p, "--recipe", default=None, choices=sorted(DETECTION_RECIPES), resume=MUST_MATCH,
         help="the schedule and optimizer: convmae (ConvMAE-B's 25 epochs, cosine) or vitdet (ViTDet's 100 epochs, "
              "step decay, layer-wise lr decay); none: convmae for a ConViT, vitdet for a ViT. Flags given win")
    flag(p, "--batch_size", default=None, type=int, check=">= 1", resume=MUST_MATCH,
         help="images per GPU and micro-batch (none: the recipe's, for 8 GPUs: convmae 4, 32 images per step; "
              "vitdet 1 with --accum_iter 8, 64 per step)")
    flag(p, "--accum_iter", default=None, type=int, check=">= 1", resume=MUST_MATCH,
         help="micro-batches per optimizer step (iteration) (none: the recipe's, convmae 1, vitdet 8)")
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
    _add_detection_model_flags(p)
    _add_detection_optimizer_flags(p)
    _add_detection_data_flags(p)
    g = p.add_argument_group("evaluation")
    flag(g, "--eval", action="store_true", help="only evaluate --resume on the validation set",
         resume="an evaluation loads the weights only, and may change anything")
    flag(g, "--eval_batch_size", default=2, type=int, check=">= 1",
         help="validation images per batch (each is padded to the --input_size square alone: the same detections "
              "in batches of any size)", resume="the same scores in batches of any size")
    _add_segmentation_initialisation_flags(p)
    add_run_flags(p, data_help="dataset root in COCO 2017's layout: annotations/instances_{train,val}2017.json, "
                               "train2017/, val2017/")
    p.set_defaults(data_path="/datasets/coco")
    return p


def detection_split_paths(flags, split: str) -> Tuple[str, str]:
    """(image folder, annotation file) of "train" or "val" for main_detect.py's flags (or its config): --{split}_images
    and --{split}_json where given, else COCO 2017's layout under --data_path (util.coco.coco_split_paths, which
    cannot be imported before torch)."""
    return (getattr(flags, f"{split}_images") or os.path.join(flags.data_path, f"{split}2017"),
            getattr(flags, f"{split}_json") or os.path.join(flags.data_path, "annotations",
                                                            f"instances_{split}2017.json"))


def _add_detection_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a ConViT: ConvMAE's DET backbone and heads; a ViT: ViTDet's)")
    flag(g, "--model", default="convvit_base_patch16", type=str, help="the encoder (its multi-scale features)",
         resume=MUST_MATCH)
    flag(g, "--input_size", default=1024, type=int, check=">= 1", resume=MUST_MATCH,
         help="training crops are --input_size squared (large-scale jitter); test images are resized to it on "
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


def _add_detection_optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer (AdamW)")
    flag(g, "--lr", default=None, type=float, help="absolute lr (none: blr x total batch / 256)", check="> 0",
         resume=MUST_MATCH)
    flag(g, "--blr", default=None, type=float, check="> 0", resume=MUST_MATCH,
         help="base lr: lr = blr x total batch / 256 (none: the recipe's, convmae 6.4e-4: 8e-5 at 32 images per "
              "step; vitdet 4e-4: 1e-4 at 64)")
    flag(g, "--min_lr", default=0.0, type=float, help="lr at the end of the cosine", check=">= 0",
         resume=MUST_MATCH)
    flag(g, "--betas", default=[0.9, 0.999], type=float, nargs=2, help="AdamW betas", check="[0, 1)",
         resume=MUST_MATCH)
    flag(g, "--weight_decay", default=0.1, type=float, check=">= 0", resume=MUST_MATCH,
         help="none on norms and position embeddings (and ConvMAE's relative-position tables with --recipe convmae)")
    flag(g, "--layer_decay", default=None, type=float, check="(0, 1]", resume=MUST_MATCH,
         help="layer-wise lr decay of the encoder (1: none; none: the recipe's, convmae 1, vitdet 0.7 for ViT-B, 0.8 "
              "for ViT-L)")
    flag(g, "--clip_grad", default=None, type=float, help="max gradient norm (none: no clipping)", check="> 0",
         resume=MUST_MATCH)


def _add_detection_data_flags(p: argparse.ArgumentParser) -> None:
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
