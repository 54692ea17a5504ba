"""What image classification on a pre-trained encoder shares, fine-tuning (engine_finetune) and linear probing
(engine_linprobe): the config both extend, their flags' checks, the ImageFolder loaders labelled by the training
classes, the task of the training loop (training.loop) and top-1 / top-5 evaluation."""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dmjd_encoders.pretrained import check_pretrained_flag
from dmjd_encoders.models_convvit import check_classifier_name, encoder_stride
from training.config import EpochConfig
from training.data import eval_loader, train_loader
from training.distributed import all_reduce_sum, launch_world_size
from training.errors import RunError
from training.flags import check_epoch_flags, check_input_size, check_run_flags
from training.loop import Schedule, evaluate_checkpoint, fit
from training.run import Run
from training.task import Evaluator, Task
from dmjd_encoders.checkpoint import CheckpointError, load_checkpoint
from util.datasets import classes_without_images, classification_folders, skip_bad_collate
from util.misc import resolve_amp, resolve_device
from util.schedules import scaled_lr


@dataclass(frozen=True)
class ClassificationConfig(EpochConfig):
    """What fine-tuning and probing share besides the run: classes, the pre-trained checkpoint, evaluation."""
    nb_classes: int
    finetune: str
    checkpoint_key: str
    eval: bool
    dist_eval: bool


def check_classification_flags(parser, args) -> None:
    """The checks of fine-tuning's or probing's flags (`parser`: the script's); each failure names its flag."""
    check_run_flags(parser, args)
    check_epoch_flags(args)
    check_pretrained_flag(args.finetune)
    check_classifier_name(args.model)
    check_input_size(args.input_size, args.model, encoder_stride(args.model))


def resolve_classification(config_cls, parser, args, **resolved):
    """(config, lr line) of fine-tuning or probing flags, checked by the script's `validate_args`: lr = blr x total
    batch / 256 (unless --lr is given), the precision resolved for the launch's device and world size, and any other
    `resolved` fields as given."""
    device, world_size = resolve_device(args.device), launch_world_size()
    lr, line = scaled_lr(args.blr, args.batch_size * args.accum_iter * world_size, args.lr)
    return config_cls.from_args(args, parser, lr=lr, amp=resolve_amp(args.amp, device)[0], world_size=world_size,
                                **resolved), line


def evaluated_classes(cfg: ClassificationConfig) -> Tuple[Optional[List[str]], str]:
    """--eval's labels for val/: (the class names that the evaluated checkpoint, --resume or else --finetune, was
    trained on, "the checkpoint <path>"), or (None, why there are none) when it stores none (saved before
    checkpoints kept them, or not a classifier's): val/'s own sorted folders then stand for them."""
    path = cfg.resume or cfg.finetune
    if not path:
        return None, "no checkpoint is given"
    try:
        classes = load_checkpoint(path, mmap=True).get("classes")
    except (CheckpointError, FileNotFoundError) as err:
        raise RunError(str(err)) from None
    if classes is None:
        return None, f"{path} does not store the classes it was trained on"
    return list(classes), f"the checkpoint {path}"


def classification_loaders(run: Run, cfg: ClassificationConfig, train_transform, val_transform):
    """(train loader or None with --eval, val loader, class names) over `<data_path>/train` and `<data_path>/val`,
    both labelled by the training classes (util.datasets.classification_folders): train/'s class folders, or with
    --eval those the checkpoint stores. Checked before the first step: a val/ class that training lacks, or a val/
    without images, stops the run naming the folder; a training class without images in val/ is named once here."""
    classes, classes_of = evaluated_classes(cfg) if cfg.eval else (None, "")
    try:
        train_set, val_set = classification_folders(cfg.data_path, train_transform, val_transform, cfg.nb_classes,
                                                    with_train=not cfg.eval, classes=classes, classes_of=classes_of)
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err)) from None
    val_root = os.path.join(cfg.data_path, "val")
    if cfg.eval and classes is None:
        print(f"{classes_of}: the labels 0..{len(val_set.classes) - 1} of its outputs are taken to be {val_root}'s "
              f"own class folders, sorted; they must be the classes it was trained on, in that order")
    elif cfg.eval:
        print(f"labels: the {len(classes)} classes that {classes_of} was trained on")
    missing = classes_without_images(val_set)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        print(f"{val_root} has no images of {len(missing)} of the {len(val_set.classes)} training classes: {shown}; "
              f"its accuracy covers the other {len(val_set.classes) - len(missing)}")
    pin = cfg.pin_mem and run.device.type == "cuda"
    val = eval_loader(val_set, cfg.batch_size, run.dist, cfg.dist_eval, cfg.num_workers, pin, skip_bad_collate)
    if cfg.eval:
        return None, val, val_set.classes
    if len(train_set) < cfg.batch_size * run.world_size:
        raise RunError(f"--batch_size {cfg.batch_size} x {run.world_size} processes needs at least "
                       f"that many images; {cfg.data_path}/train has {len(train_set)}")
    print(f"train: {len(train_set)} images, val: {len(val_set)} images, {len(train_set.classes)} classes")
    train = train_loader(train_set, cfg.batch_size, cfg.seed, run.dist, cfg.num_workers, pin, skip_bad_collate)
    return train, val, train_set.classes


class ClassificationTask(Task):
    """What fine-tuning's and probing's tasks share (engine_finetune.FinetuneTask, engine_linprobe.ProbeTask write
    their optimizer): a classifier, its criterion (cross-entropy unless given), optional mixup / cutmix (drawn
    inside the step, so that the step's seeding covers it), and top-1 / top-5 evaluation; the best checkpoint has
    the best top-1 (`best_acc1`). Batches are `(images, targets, num_bad)` from util.datasets.skip_bad_collate; a
    batch with no readable image trains as two blank images of weight 0. A checkpoint keeps the class names it was
    trained on (`classes`, the meaning of the head's outputs), which --eval reads back."""
    best = "acc1"

    def __init__(self, model: torch.nn.Module, cfg: EpochConfig, device: torch.device, classes: Sequence[str] = (),
                 criterion: Optional[torch.nn.Module] = None, mixup_fn=None):
        self.model, self.cfg, self.device = model, cfg, device
        self.criterion = criterion if criterion is not None else torch.nn.CrossEntropyLoss()
        self.mixup_fn = mixup_fn
        self.classes: List[str] = list(classes)

    @property
    def evaluation_set(self) -> str:
        return os.path.join(self.cfg.data_path, "val")

    def placeholder(self):
        size = self.cfg.input_size
        return torch.zeros(2, 3, size, size), torch.zeros(2, dtype=torch.long)

    def prepare(self, images, targets):
        if self.mixup_fn is not None and len(images) % 2:  # an unreadable file left an odd batch: Mixup needs pairs
            images, targets = images[:-1], targets[:-1]
        return (images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True),
                len(images))

    def loss(self, images, targets):
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        return self.criterion(self.trained(images).float(), targets)

    def round_stats(self, stats: Dict[str, float]) -> Dict[str, float]:
        return {"loss": stats["loss"], "lr": stats["lr"]}

    def predict(self, images, targets):
        return self.model(images.to(self.device, non_blocking=True))

    def evaluator(self) -> "TopKAccuracy":
        return TopKAccuracy(self.device)

    def report(self, scores: Dict[str, float]) -> str:
        return report(scores)

    def extra_state(self) -> dict:
        return {"classes": list(self.classes)}

    def load_extra_state(self, checkpoint: dict, path: str) -> None:
        saved = checkpoint.get("classes")  # None: saved before checkpoints kept them
        if saved is not None and list(saved) != self.classes:
            def named(classes):
                return f"{len(classes)}: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}"
            raise RunError(f"{path} was trained on other classes ({named(saved)}) than {self.cfg.data_path}/train has "
                           f"({named(self.classes)}): its outputs would stand for other classes")


class TopKAccuracy(Evaluator):
    """Top-1 / top-5 accuracy (%) and the mean cross-entropy, summed on the device and over the processes (each
    sample counted once when the loader shards the set without padding)."""

    def __init__(self, device: torch.device):
        self.totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1, top-5, count

    def update(self, outputs, targets) -> None:
        outputs = outputs.float()
        targets = targets.to(outputs.device, non_blocking=True)
        top5 = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        correct = top5 == targets.unsqueeze(1)
        self.totals += torch.stack([F.cross_entropy(outputs, targets, reduction="sum").double(),
                                    correct[:, 0].sum().double(), correct.any(dim=1).sum().double(),
                                    torch.tensor(float(targets.numel()), device=outputs.device,
                                                 dtype=torch.float64)])

    def running(self) -> Dict[str, float]:
        loss, top1, _, count = self.totals.tolist()  # this process's running figures
        return {"loss": loss / max(count, 1), "acc1": 100 * top1 / max(count, 1)}

    def scores(self) -> Dict[str, float]:
        loss, top1, top5, count = all_reduce_sum(self.totals, what="the evaluation's totals").tolist()
        count = max(count, 1)  # the loop stops an evaluation that read no image before it asks for scores
        return {"loss": loss / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count}


def report(scores: Dict[str, float]) -> str:
    return (f"top-1 {scores['acc1']:.2f}%  top-5 {scores['acc5']:.2f}%  loss {scores['loss']:.4f} on "
            f"{scores['images']} images")


def run_classification(run: Run, cfg: ClassificationConfig, task: ClassificationTask, loaders) -> Dict[str, float]:
    """--eval of a checkpoint, or the epochs of fine-tuning or probing (training.loop.fit): train, evaluate on val/,
    keep checkpoint-last.pth and checkpoint-best.pth (best top-1), log.txt and TensorBoard. `loaders`: (train, val).
    Returns the last evaluation."""
    train_loader, val_loader = loaders
    if cfg.eval:
        scores = evaluate_checkpoint(run, task, val_loader, cfg.resume or cfg.finetune or "the model")
        print(f"accuracy of the network on {scores['images']} test images: {scores['acc1']:.1f}%")  # MAE's line
        return scores
    return fit(run, task, cfg, train_loader, val_loader, Schedule.of_epochs(cfg.epochs, len(train_loader),
                                                                            cfg.accum_iter))
