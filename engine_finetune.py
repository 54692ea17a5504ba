"""Supervised training on a pre-trained encoder (fine-tuning or linear probing): the flags and config both scripts
share, one epoch, evaluation, and the epochs of both."""
import contextlib
import os
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from models_convvit import check_classifier_name
from models_dmjd import ENCODER_NAMES
from training.config import TrainConfig
from training.flags import check_run_flags, flag_error
from training.data import eval_loader, train_loader
from training.distributed import all_reduce_sum, launch_world_size
from training.meters import Progress, log_window
from training.run import Run, TrainState
from training.step import NonFiniteLossError, TrainStep, autocast_context
from util.checkpoint import (ArchitectureMismatch, CheckpointError, architecture_kwargs, check_encoder_loaded,
                             load_pretrained, saved_model)
from util.datasets import classification_folders, skip_bad_collate
from util.misc import resolve_amp, resolve_device


@dataclass(frozen=True)
class ClassificationConfig(TrainConfig):
    """What fine-tuning and probing share besides the run: classes, the pre-trained checkpoint, evaluation."""
    nb_classes: int
    finetune: str
    checkpoint_key: str
    eval: bool
    dist_eval: bool

    RESUME_MUST_MATCH: ClassVar[Tuple[str, ...]] = TrainConfig.RESUME_MUST_MATCH + ("nb_classes",)
    RESUME_MAY_CHANGE: ClassVar[Dict[str, str]] = {
        **TrainConfig.RESUME_MAY_CHANGE,
        "finetune": "only the first start loads it: a resumed run's weights come from its checkpoint",
        "checkpoint_key": "only the first start reads --finetune",
        "eval": "an evaluation loads the weights only, and may change anything",
        "dist_eval": "sharded or not, evaluation is exact: the same scores",
    }


def check_classification_flags(args) -> None:
    """The checks of fine-tuning's and probing's shared flags; each failure names its flag."""
    check_run_flags(args)
    check_pretrained_flag(args.finetune)
    if args.nb_classes < 1:
        raise SystemExit(f"error: --nb_classes must be >= 1, got {args.nb_classes}")
    check_classifier_name(args.model)


def resolve_classification(config_cls, args, **resolved):
    """(config, lr line) of fine-tuning or probing flags, checked by the script's `validate_args`: lr = blr x total
    batch / 256 (unless --lr is given), the precision resolved for the launch's device and world size, and any other
    `resolved` fields as given."""
    device, world_size = resolve_device(args.device), launch_world_size()
    images_per_step = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * images_per_step / 256
    line = (f"lr = {lr:.4g} (given)" if args.lr is not None else
            f"lr = blr {args.blr:.3g} x {images_per_step} images / 256 = {lr:.4g}")
    return config_cls.from_args(args, lr=lr, amp=resolve_amp(args.amp, device)[0], world_size=world_size,
                                **resolved), line


def check_pretrained_flag(path: str) -> None:
    """--finetune, when given, must name something to load (a checkpoint file or an export folder)."""
    if path and not os.path.exists(path):
        raise flag_error("--finetune", f"{path!r} is neither a checkpoint file nor an export folder")


@contextlib.contextmanager
def _pretrained_errors(path: str):
    """A --finetune checkpoint that cannot be read, or does not fit, ends the script saying why, and which --model
    fits it when the checkpoint says what it was trained as."""
    try:
        yield
    except (ArchitectureMismatch, CheckpointError, ValueError, KeyError, FileNotFoundError) as err:
        trained_as = saved_model(path)
        hint = (f" It holds the encoder of {trained_as!r}: fine-tune or probe it with --model "
                f"{ENCODER_NAMES.get(trained_as, trained_as)}." if trained_as else "")
        raise SystemExit(f"error: --finetune {err}{hint}") from None


def encoder_layout(path: str, key: str = "model") -> dict:
    """`architecture_kwargs` of --finetune's checkpoint (the build arguments its encoder layout needs), read before
    the model is built; a file that cannot be read ends the script naming the flag."""
    with _pretrained_errors(path):
        return architecture_kwargs(path, key)


def load_encoder(model: torch.nn.Module, path: str, key: str = "model",
                 allowed_missing=("head.", "fc_norm.")) -> None:
    """--finetune's encoder weights into `model`; see `_pretrained_errors` for a checkpoint that does not fit."""
    with _pretrained_errors(path):
        missing, unexpected = load_pretrained(model, path, key)
        check_encoder_loaded(missing, unexpected, path, allowed_missing)


def classification_loaders(run: Run, cfg: ClassificationConfig, train_transform, val_transform):
    """(train loader or None with --eval, val loader) over `<data_path>/train` and `<data_path>/val`."""
    try:
        train_set, val_set = classification_folders(cfg.data_path, train_transform, val_transform, cfg.nb_classes,
                                                    with_train=not cfg.eval)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    pin = cfg.pin_mem and run.device.type == "cuda"
    val = eval_loader(val_set, cfg.batch_size, run.dist, cfg.dist_eval, cfg.num_workers, pin, skip_bad_collate)
    if cfg.eval:
        return None, val
    if len(train_set) < cfg.batch_size * run.world_size:
        raise SystemExit(f"error: --batch_size {cfg.batch_size} x {run.world_size} processes needs at least "
                         f"that many images; {cfg.data_path}/train has {len(train_set)}")
    print(f"train: {len(train_set)} images, val: {len(val_set)} images, {len(train_set.classes)} classes")
    return train_loader(train_set, cfg.batch_size, cfg.seed, run.dist, cfg.num_workers, pin, skip_bad_collate), val


def evaluate_checkpoint(run: Run, cfg: ClassificationConfig, model: torch.nn.Module, val_loader) -> Dict[str, float]:
    """--eval: the weights of --resume (if given, else the model as it is) on val/."""
    run.resume(None, model, auto=False)
    stats = evaluate(val_loader, model, run.device, cfg.amp_dtype, cfg.print_freq)
    print(f"accuracy of the network on {stats['count']} test images: top-1 {stats['acc1']:.2f}%  "
          f"top-5 {stats['acc5']:.2f}%  loss {stats['loss']:.4f}")
    return stats


def train_one_epoch(model: torch.nn.Module, criterion, step: TrainStep, loader, epoch: int, cfg: TrainConfig,
                    progress: Progress, writer=None, mixup_fn=None) -> Dict[str, float]:
    """Trains the epoch's iterations that `progress` tracks (its names: ("loss",)) on `(images, targets, num_bad)`
    batches (util.datasets.skip_bad_collate); returns the epoch's mean loss over all ranks and the lr."""
    model.train()
    for it, (images, targets, _) in progress.track(loader):
        # A batch whose files were all unreadable still takes its step (every DDP rank must), with zero weight.
        weight = 1.0
        if images is None:
            images, targets, weight = torch.zeros(2, 3, cfg.input_size, cfg.input_size), torch.zeros(2).long(), 0.0
        if mixup_fn is not None and len(images) % 2:  # an unreadable file left an odd batch: Mixup needs pairs
            images, targets = images[:-1], targets[:-1]
        progress.count(len(images) if weight else 0)
        images = images.to(step.device, non_blocking=True)
        targets = targets.to(step.device, non_blocking=True)

        def forward():  # mixup inside, so that the step's seeding covers its draws
            x, y = mixup_fn(images, targets) if mixup_fn is not None else (images, targets)
            return criterion(model(x).float(), y)

        losses = step(forward, epoch + it / progress.total, epoch * progress.total + it, weight)
        if losses is not None:
            progress.losses.add(*losses)
        if progress.due(it):
            log_window(step, progress, it, epoch, writer)
    stats = progress.totals()
    print(f"Epoch [{epoch}] {'stopped' if progress.stopped else 'done'}: loss {stats['loss']:.4f}; "
          f"{progress.summary()}", flush=True)
    return {"loss": stats["loss"], "lr": step.lr}


@torch.no_grad()
def evaluate(data_loader, model: torch.nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             print_freq: int = 20) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over every sample the loader gives this process, summed over
    processes (each sample counted once when the loader shards the set without padding)."""
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1, top-5, count
    progress = Progress("Test", len(data_loader), print_freq, device)
    for it, (images, targets, _) in progress.track(data_loader):
        if images is not None:  # None: every file of the batch was unreadable (each was named in a warning)
            progress.count(len(images))
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast_context(device, amp_dtype):
                outputs = model(images)
            outputs = outputs.float()
            top5 = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
            correct = top5 == targets.unsqueeze(1)
            totals += torch.stack([F.cross_entropy(outputs, targets, reduction="sum").double(),
                                   correct[:, 0].sum().double(), correct.any(dim=1).sum().double(),
                                   torch.tensor(float(targets.numel()), device=device, dtype=torch.float64)])
        if progress.due(it):
            loss, top1, _, count = totals.tolist()  # this process's running figures
            progress.line(it, {"loss": loss / max(count, 1), "acc1": 100 * top1 / max(count, 1)})
    loss, top1, top5, count = all_reduce_sum(totals, what="the evaluation's totals").tolist()
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count, "count": int(count)}


def report(stats: Dict[str, float]) -> str:
    return (f"top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  loss {stats['loss']:.4f} on {stats['count']} "
            f"images")


def train_and_evaluate(run: Run, cfg: TrainConfig, model: torch.nn.Module, state: TrainState, criterion, loaders,
                       mixup_fn=None) -> Dict[str, float]:
    """The epochs of fine-tuning or probing: train, evaluate on val/, keep checkpoint-last.pth and
    checkpoint-best.pth (best top-1), log.txt and TensorBoard. `model` is what trains (DDP when distributed);
    `state` holds it unwrapped. Returns the last evaluation."""
    train_loader, val_loader = loaders
    start_epoch = run.resume(state)
    best_acc1 = run.saved.get("best_acc1", 0.0)
    iters = state.step.iters_per_epoch
    stats = {}
    for epoch in run.epochs(start_epoch, train_loader):
        progress = run.progress(epoch, iters)
        try:
            train_stats = train_one_epoch(model, criterion, state.step, train_loader, epoch, cfg, progress,
                                          run.writer, mixup_fn)
        except NonFiniteLossError as err:
            raise SystemExit(f"error: {err}") from None
        run.stop_if_requested(state, epoch, progress, best_acc1=best_acc1)
        stats = evaluate(val_loader, model, run.device, cfg.amp_dtype, cfg.print_freq)
        is_best = stats["acc1"] > best_acc1
        best_acc1 = max(best_acc1, stats["acc1"])
        print(f"epoch {epoch}: {report(stats)}; best top-1 {best_acc1:.2f}%")
        if run.writer is not None:
            for k in ("acc1", "acc5", "loss"):
                run.writer.add_scalar(f"test/{k}", stats[k], epoch)
        record = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in stats.items()},
                  "best_acc1": best_acc1}
        run.end_epoch(state, epoch, record, best=is_best, best_acc1=best_acc1)
    print(f"best top-1 {best_acc1:.2f}%")
    return stats
