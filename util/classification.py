"""What main_finetune.py and main_linprobe.py share: run flags, set-up, data loaders and the epoch loop with
evaluation, best/last checkpoints, log.txt and TensorBoard."""
import argparse
import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import timm
import torch
from torch.utils.tensorboard import SummaryWriter

from engine_finetune import evaluate, train_one_epoch
from models_convvit import ConvBlock
from util.checkpoint import find_resume, last_checkpoint_path, load_checkpoint, load_state_dict_strict, save_checkpoint
from util.datasets import image_folder, skip_bad_collate
from util.misc import (DistInfo, check_model_name, cleanup_distributed, init_distributed, resolve_amp,
                        seed_everything)


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--data_path", default="/datasets/imagenet", type=str, help="ImageFolder root with train/ and val/")
    g.add_argument("--nb_classes", default=1000, type=int)
    g.add_argument("--output_dir", default="./output_dir", type=str)
    g.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--device", default="auto", type=str, help="auto, cuda or cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume (default: output_dir's last one)")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume (or --finetune) on val/")
    g.add_argument("--dist_eval", action=argparse.BooleanOptionalAction, default=True,
                   help="shard evaluation over processes (exact: no padding); off = every process evaluates all")
    g.add_argument("--print_freq", default=20, type=int)
    g.add_argument("--num_workers", default=10, type=int)
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True)


@dataclass
class Run:
    dist: DistInfo
    amp_dtype: Optional[torch.dtype]
    images_per_step: int

    @property
    def device(self) -> torch.device:
        return self.dist.device


def setup_run(args) -> Run:
    for flag in ("batch_size", "accum_iter", "epochs", "input_size", "nb_classes", "print_freq"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise SystemExit(f"error: --warmup_epochs must be in [0, --epochs], got {args.warmup_epochs}")
    dist_info = init_distributed(args.device)
    amp_name, amp_dtype = resolve_amp(args.amp, dist_info.device)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}  device {dist_info.device}, "
          f"world size {dist_info.world_size}, amp {amp_name}")
    print(json.dumps(vars(args), indent=1, default=str))
    seed_everything(args.seed + dist_info.rank)
    return Run(dist_info, amp_dtype, args.batch_size * args.accum_iter * dist_info.world_size)


def check_classifier_name(name: str) -> None:
    """Exits unless --model names an encoder of models_convvit; a former name works, with a note of the new one."""
    renamed = timm.models.get_deprecated_models("models_convvit")
    if name in renamed:
        print(f"note: --model {name} is now called {renamed[name]}; the former name still works")
        return
    check_model_name(name, timm.list_models(module="models_convvit"), "a classifier of this project")


class ShardSampler(torch.utils.data.Sampler):
    """Every `world_size`-th index from `rank`: each sample is evaluated once, with no padding duplicates."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loaders(args, run: Run, train_transform, val_transform):
    dist_info = run.dist
    val_set = image_folder(args.data_path, "val", val_transform)
    if args.dist_eval and dist_info.distributed:
        val_sampler = ShardSampler(len(val_set), dist_info.rank, dist_info.world_size)
    else:
        val_sampler = torch.utils.data.SequentialSampler(val_set)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and run.device.type == "cuda",
                  collate_fn=skip_bad_collate)
    val_loader = torch.utils.data.DataLoader(val_set, sampler=val_sampler, batch_size=args.batch_size,
                                             drop_last=False, **common)
    if args.eval:
        return None, val_loader
    train_set = image_folder(args.data_path, "train", train_transform)
    for name, dataset in (("train", train_set), ("val", val_set)):
        if len(dataset.classes) > args.nb_classes:
            raise SystemExit(f"error: {args.data_path}/{name} has {len(dataset.classes)} classes but --nb_classes "
                             f"is {args.nb_classes}")
    if len(train_set) < args.batch_size * dist_info.world_size:
        raise SystemExit(f"error: --batch_size {args.batch_size} x {dist_info.world_size} processes needs at least "
                         f"that many images; {args.data_path}/train has {len(train_set)}")
    print(f"train: {len(train_set)} images, val: {len(val_set)} images, {len(train_set.classes)} classes")
    if dist_info.distributed:
        train_sampler = torch.utils.data.DistributedSampler(train_set, dist_info.world_size, dist_info.rank,
                                                            shuffle=True, seed=args.seed, drop_last=True)
    else:
        train_sampler = torch.utils.data.RandomSampler(train_set)
    train_loader = torch.utils.data.DataLoader(train_set, sampler=train_sampler, batch_size=args.batch_size,
                                               drop_last=True, **common)
    return train_loader, val_loader


def fit(model: torch.nn.Module, criterion, optimizer, loaders, args, run: Run, mixup_fn=None) -> dict:
    """Trains `args.epochs` epochs (or evaluates with --eval), resuming from --resume or output_dir's last
    checkpoint; keeps checkpoint-last.pth and checkpoint-best.pth. Returns the last evaluation."""
    train_loader, val_loader = loaders
    dist_info, device = run.dist, run.device
    if any(isinstance(m, ConvBlock) for m in model.modules()):
        # The LayerNorms of ConViT's conv stages leave their maps channels-last, so the convs give channels-last
        # weight gradients: weights stored the same way are what DDP's gradient buckets expect (no copy, no
        # layout warning), and the conv kernels need no format conversion. Same parameters, so the optimizer's
        # references stay valid.
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    scaler = torch.amp.GradScaler(device.type) if run.amp_dtype is torch.float16 else None
    start_epoch, best_acc1 = 0, 0.0

    resume = find_resume(args.resume, None if args.eval else args.output_dir)
    if resume:
        ckpt = load_checkpoint(resume)
        load_state_dict_strict(model_without_ddp, ckpt["model"])
        if not args.eval:
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch = ckpt["epoch"] + 1
            best_acc1 = ckpt.get("best_acc1", 0.0)
        print(f"resumed from {resume}" + ("" if args.eval else f": continuing at epoch {start_epoch}"))

    if args.eval:
        stats = evaluate(val_loader, model, device, run.amp_dtype)
        print(f"accuracy of the network on {stats['count']} test images: top-1 {stats['acc1']:.2f}%  "
              f"top-5 {stats['acc5']:.2f}%  loss {stats['loss']:.4f}")
        cleanup_distributed()
        return stats

    if dist_info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(  # gradients live in the all-reduce buckets: no copy
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)

    log_writer = None
    if dist_info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)

    stats = {}
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed + 1000 * epoch + dist_info.rank)
        if dist_info.distributed:
            train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, args,
                                      run.amp_dtype, scaler, mixup_fn, log_writer)
        stats = evaluate(val_loader, model, device, run.amp_dtype)
        is_best = stats["acc1"] > best_acc1
        best_acc1 = max(best_acc1, stats["acc1"])
        print(f"epoch {epoch}: top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  on {stats['count']} "
              f"images; best top-1 {best_acc1:.2f}%")
        if dist_info.is_main:
            state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                     "best_acc1": best_acc1, "args": dict(vars(args))}
            save_checkpoint(state, last_checkpoint_path(args.output_dir))
            if is_best:
                save_checkpoint(state, os.path.join(args.output_dir, "checkpoint-best.pth"))
            record = {**{f"train_{k}": v for k, v in train_stats.items()},
                      **{f"test_{k}": v for k, v in stats.items()}, "epoch": epoch, "best_acc1": best_acc1}
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(record) + "\n")
            for k in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f"test/{k}", stats[k], epoch)
            log_writer.flush()
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}; best top-1 {best_acc1:.2f}%")
    if log_writer is not None:
        log_writer.close()
    del model  # the DDP wrapper, before the process group (see cleanup_distributed)
    cleanup_distributed()
    return stats
