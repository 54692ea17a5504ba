"""The flags every training script shares and their checks, importable without torch: a script parses its command
line and checks --data_path before it imports torch, so that --help, a malformed flag and a missing data folder answer
at once; every check here runs before the run prints its config or makes its output folder."""
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
