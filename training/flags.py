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


def add_step_flags(parser: argparse.ArgumentParser, batch_size: Optional[int], batch_help: str,
                   accum_help: str = "micro-batches per optimizer step",
                   accum_iter: Optional[int] = 1) -> None:
    """--batch_size and --accum_iter: the images of an optimizer step (with the world size)."""
    flag(parser, "--batch_size", default=batch_size, type=int, help=batch_help, check=">= 1", resume=MUST_MATCH)
    flag(parser, "--accum_iter", default=accum_iter, type=int, help=accum_help, check=">= 1", resume=MUST_MATCH)


def add_model_flags(group, model: str, model_help: str, input_size: int, input_help: str = "crop size in pixels"):
    """--model and --input_size."""
    flag(group, "--model", default=model, type=str, help=model_help, resume=MUST_MATCH)
    flag(group, "--input_size", default=input_size, type=int, help=input_help, check=">= 1", resume=MUST_MATCH)


def add_optimizer_flags(group, *, blr: Optional[float], blr_help: str, weight_decay: float, weight_decay_help: str,
                        min_lr: float = 0.0, min_lr_help: str = "lr at the end of the cosine",
                        lr_help: str = "absolute lr (none: blr x total batch / 256)",
                        clip_grad_help: Optional[str] = "max gradient norm (none: no clipping)") -> None:
    """--lr, --blr, --min_lr, --weight_decay and, unless `clip_grad_help` is None, --clip_grad (a script without it
    sets its default, None)."""
    flag(group, "--lr", default=None, type=float, help=lr_help, check="> 0", resume=MUST_MATCH)
    flag(group, "--blr", default=blr, type=float, help=blr_help, check="> 0", resume=MUST_MATCH)
    flag(group, "--min_lr", default=min_lr, type=float, help=min_lr_help, check=">= 0", resume=MUST_MATCH)
    flag(group, "--weight_decay", default=weight_decay, type=float, help=weight_decay_help, check=">= 0",
         resume=MUST_MATCH)
    if clip_grad_help is not None:
        flag(group, "--clip_grad", default=None, type=float, help=clip_grad_help, check="> 0", resume=MUST_MATCH)


def add_initialisation_flags(group, finetune_help: str, key_help: str = "take the student encoder, or the EMA "
                                                                          "teacher's") -> None:
    """--finetune and --checkpoint_key: the pre-trained encoder a new run starts from."""
    flag(group, "--finetune", default="", help=finetune_help,
         resume="only the first start loads it: a resumed run's weights come from its checkpoint")
    flag(group, "--checkpoint_key", default="model", choices=["model", "teacher"], help=key_help,
         resume="only the first start reads --finetune")


def float_or_none(text: str) -> Optional[float]:
    """A flag's float, or `none`."""
    return None if text.lower() == "none" else float(text)


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
    finetune = getattr(args, "finetune", "")  # add_initialisation_flags'
    if finetune and not os.path.exists(finetune):
        raise flag_error("--finetune", f"{finetune!r} is neither a checkpoint file nor an export folder")
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
