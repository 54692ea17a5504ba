"""DMJD pre-training. Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_pretrain.py --data_path /path/to/imagenet --output_dir out/dmjd_convit_b

Defaults are the released ConViT-B recipe; see PRETRAIN.md.
"""
import argparse
import datetime
import json
import os
import time

import timm
import torch
from timm.optim import param_groups_weight_decay
from torch.utils.tensorboard import SummaryWriter

import models_dmjd  # noqa: F401  (registers the DMJD models with timm)
from engine_pretrain import NonFiniteLossError, train_one_epoch
from models_dmjd import EMATeacher
from util.checkpoint import (find_resume, last_checkpoint_path, load_checkpoint, load_state_dict_strict,
                             periodic_checkpoint_path, prune_periodic_checkpoints, save_checkpoint)
from util.datasets import build_pretrain_dataset, sample_images, skip_bad_collate
from util.misc import check_model_name, cleanup_distributed, init_distributed, resolve_amp, seed_everything
from util.schedules import adaptive_lr, reachable_pred_ratio
from util.visualization import make_figure


def get_args_parser():
    p = argparse.ArgumentParser("DMJD pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch_size", default=64, type=int, help="images per GPU (each gives --num_views views)")
    p.add_argument("--epochs", default=400, type=int, help="pre-training epochs")
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps per optimizer step")

    g = p.add_argument_group("model and method")
    g.add_argument("--model", default="dmjd_convit_base_patch16_dec8_hog", type=str, help="a registered dmjd_* model")
    g.add_argument("--input_size", default=224, type=int, help="crop size in pixels")
    g.add_argument("--num_views", default=2, type=int, help="disjointly masked views per image (1 = MaskFeat/ConvMAE)")
    g.add_argument("--mask_ratio", default=0.6, type=float, help="corruption rate: fraction masked in one view")
    g.add_argument("--pred_ratio", default=None, type=float,
                   help="prediction rate: fraction masked in at least one view (none: min(1, views x mask_ratio))")
    g.add_argument("--mask_type", default="block", choices=["block", "rand"],
                   help="block: units of --block_size x --block_size patches (SimMIM); rand: single patches")
    g.add_argument("--block_size", default=2, type=int, help="block masking unit, in patches")
    g.add_argument("--pred_type", default="hog", choices=["hog", "pixel"], help="target of the masked tokens")
    g.add_argument("--vis_target", default="hog", choices=["hog", "ema"], help="target of the visible tokens")
    g.add_argument("--theta", default=1.0, type=float, help="weight of the visible-distillation loss (0 = off)")
    g.add_argument("--ema_momentum", default=0.996, type=float, help="initial teacher momentum (cosine to 1)")
    g.add_argument("--min_crop_scale", default=0.5, type=float, help="RandomResizedCrop's smallest area fraction")

    g = p.add_argument_group("optimizer")
    g.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay (none on biases and norms)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (none: the adaptive rule from --blr)")
    g.add_argument("--blr", default=6e-4, type=float, help="base lr: lr = blr x images / 256 x pred / mask ratio")
    g.add_argument("--min_lr", default=0.0, type=float, help="lr at the end of the cosine")
    g.add_argument("--warmup_epochs", default=20, type=float, help="linear lr warmup, per iteration")
    g.add_argument("--clip_grad", default=None, type=float, help="max gradient norm (3.0 for ConViT-L)")
    g.add_argument("--skip_nonfinite", default=0, type=int,
                   help="skip up to N optimizer steps with a non-finite loss in the run, then stop (0: stop at the "
                        "first; N > 0 reads the loss back every step)")

    g = p.add_argument_group("run")
    g.add_argument("--data_path", default="/datasets/imagenet", type=str, help="ImageFolder root holding train/")
    g.add_argument("--output_dir", default="./output_dir", type=str, help="checkpoints and log.txt")
    g.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (none: --output_dir)")
    g.add_argument("--device", default="auto", type=str, help="auto, cuda or cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; first steps are slow)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory for the conv stages and the input (none: on with CUDA, off on the CPU)")
    g.add_argument("--seed", default=0, type=int, help="seeds crops, masks and shuffling")
    g.add_argument("--resume", default="", type=str, help="checkpoint to resume (none: output_dir's last one)")
    g.add_argument("--save_freq", default=20, type=int, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--keep_last", default=0, type=int, help="periodic checkpoints kept (0 = all)")
    g.add_argument("--vis_freq", default=20, type=int,
                   help="TensorBoard picture of masks and predictions every N epochs (0 = never)")
    g.add_argument("--print_freq", default=20, type=int, help="read losses back from the device every N steps")
    g.add_argument("--num_workers", default=10, type=int, help="data-loading processes")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pinned host memory for the batches (CUDA)")
    return p


def validate_args(args) -> None:
    """Fails before any work, naming the flag."""
    def bad(flag, why):
        raise SystemExit(f"error: {flag} {why}")

    if not 0 < args.mask_ratio < 1:
        bad("--mask_ratio", f"must be in (0, 1), got {args.mask_ratio}")
    if args.num_views < 1:
        bad("--num_views", f"must be >= 1, got {args.num_views}")
    reachable = reachable_pred_ratio(args.num_views, args.mask_ratio)
    if args.pred_ratio is None:
        args.pred_ratio = reachable
    if not args.mask_ratio <= args.pred_ratio <= 1:
        bad("--pred_ratio", f"must be in [--mask_ratio, 1], got {args.pred_ratio}")
    if args.pred_ratio > reachable + 1e-6:
        bad("--pred_ratio", f"{args.pred_ratio} cannot be reached by {args.num_views} view(s) of mask_ratio "
                            f"{args.mask_ratio} (at most {reachable:.3g}); add views or lower it")
    for flag in ("batch_size", "accum_iter", "epochs", "input_size", "print_freq", "save_freq", "block_size"):
        if getattr(args, flag) < 1:
            bad(f"--{flag}", f"must be >= 1, got {getattr(args, flag)}")
    for flag in ("keep_last", "vis_freq", "skip_nonfinite", "num_workers", "weight_decay", "min_lr"):
        if getattr(args, flag) < 0:
            bad(f"--{flag}", f"must be >= 0, got {getattr(args, flag)}")
    for flag in ("blr", "lr", "clip_grad"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            bad(f"--{flag}", f"must be > 0, got {getattr(args, flag)}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        bad("--device", f"must be auto, cpu, cuda or cuda:<index>, got {args.device!r}")
    if args.resume and not os.path.isfile(args.resume):
        bad("--resume", f"{args.resume!r} is not a file")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        bad("--warmup_epochs", f"must be in [0, --epochs {args.epochs}], got {args.warmup_epochs}; give a shorter warmup "
                                "for a short run")
    if args.theta < 0:
        bad("--theta", f"must be >= 0, got {args.theta}")
    if not 0 <= args.ema_momentum <= 1:
        bad("--ema_momentum", f"must be in [0, 1], got {args.ema_momentum}")
    if not 0 < args.min_crop_scale <= 1:
        bad("--min_crop_scale", f"must be in (0, 1], got {args.min_crop_scale}")
    check_model_name(args.model, timm.list_models("dmjd_*"), "a DMJD model")


def check_dataset_size(num_images: int, args, world_size: int) -> None:
    """An epoch must hold at least one optimizer step on every process (drop_last batches)."""
    per_step = args.batch_size * world_size
    if num_images < per_step:
        raise SystemExit(f"error: --batch_size {args.batch_size} x {world_size} processes needs at least "
                         f"that many images; {args.data_path}/train has {num_images}")
    batches = num_images // per_step
    if batches < args.accum_iter:
        raise SystemExit(f"error: --accum_iter {args.accum_iter} needs {args.accum_iter} batches of {args.batch_size} "
                         f"per process in an epoch; {num_images} images over {world_size} processes give {batches}")


def build_model(args):
    try:
        return timm.create_model(
            args.model, img_size=args.input_size, num_views=args.num_views, mask_ratio=args.mask_ratio,
            pred_ratio=args.pred_ratio, mask_type=args.mask_type, block_size=args.block_size,
            pred_type=args.pred_type, vis_target=args.vis_target, theta=args.theta)
    except ValueError as err:  # shapes that do not fit the model: name them before any work
        raise SystemExit(f"error: {err} (check --input_size, --block_size, --mask_ratio)") from None


def main(args):
    validate_args(args)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    amp_name, amp_dtype = resolve_amp(args.amp, device)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}  device {device}, world size {dist_info.world_size}, "
          f"amp {amp_name}")
    print(json.dumps(vars(args), indent=1, default=str))

    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels once

    seed_everything(args.seed + dist_info.rank)
    model = build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights only; the teacher copies the format
    model_without_ddp = model
    teacher = EMATeacher(model.encoder).to(device) if model.uses_teacher else None
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {args.model}: {n_params:.2f} M parameters ({sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f} M encoder)")

    images_per_step = args.batch_size * args.accum_iter * dist_info.world_size
    if args.lr is None:
        args.lr, line = adaptive_lr(args.blr, images_per_step, args.pred_ratio, args.mask_ratio)
        print(line)
    else:
        print(f"lr = {args.lr:.4g} (given; the adaptive rule is not applied)")
    print(f"{args.batch_size} images x {args.num_views} views per process, accum {args.accum_iter}, "
          f"{images_per_step} unique images per optimizer step")

    try:
        dataset = build_pretrain_dataset(args.data_path, args.input_size, args.min_crop_scale)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    check_dataset_size(len(dataset), args, dist_info.world_size)
    print(f"dataset: {len(dataset)} images in {args.data_path}/train")
    if dist_info.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_info.world_size,
                                                      rank=dist_info.rank, shuffle=True, seed=args.seed, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(dataset)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True, collate_fn=skip_bad_collate,
        persistent_workers=args.num_workers > 0)

    if args.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay as they are
    if dist_info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(  # gradients live in the all-reduce buckets: no copy
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)

    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay,
                                           no_weight_decay_list=model_without_ddp.no_weight_decay())
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    start_epoch = nonfinite_skipped = 0
    resume = find_resume(args.resume, args.output_dir)
    if resume:
        ckpt = load_checkpoint(resume)
        load_state_dict_strict(model_without_ddp, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if teacher is not None:
            if ckpt.get("teacher") is None:
                raise SystemExit(f"error: {resume} has no EMA teacher; it was not trained with --vis_target ema")
            load_state_dict_strict(teacher, ckpt["teacher"], "teacher")
        start_epoch = ckpt["epoch"] + 1
        nonfinite_skipped = ckpt.get("nonfinite_skipped", 0)  # --skip_nonfinite counts over the whole run
        print(f"resumed from {resume}: continuing at epoch {start_epoch}")

    log_writer = None
    if dist_info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)
    vis_images = None
    if dist_info.is_main and args.vis_freq > 0:
        vis_images = sample_images(args.data_path, "train", args.input_size, 4).to(device)

    def checkpoint_state(epoch):
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "teacher": teacher.state_dict() if teacher is not None else None,
                "epoch": epoch, "nonfinite_skipped": nonfinite_skipped, "args": {k: v for k, v in vars(args).items()}}

    print(f"training epochs {start_epoch} to {args.epochs - 1}")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        # Re-seeding per epoch makes masks, crops and shuffles a function of (seed, epoch, rank): exact resume.
        seed_everything(args.seed + 1000 * epoch + dist_info.rank)
        if dist_info.distributed:
            sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(model, loader, optimizer, device, epoch, args, amp_dtype, scaler, teacher,
                                    model_without_ddp.encoder, log_writer, nonfinite_skipped)
        except NonFiniteLossError as err:
            raise SystemExit(f"error: {err}") from None
        if stats["images"] == 0:  # every rank agrees: the counts are summed over ranks
            raise SystemExit(f"error: no image of epoch {epoch} could be read ({stats['bad_images']} files failed, "
                             f"see the warnings above); check --data_path {args.data_path}")
        nonfinite_skipped += stats["nonfinite_skipped"]
        if dist_info.is_main:
            state = checkpoint_state(epoch)
            save_checkpoint(state, last_checkpoint_path(args.output_dir))
            if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
                save_checkpoint(state, periodic_checkpoint_path(args.output_dir, epoch))
                prune_periodic_checkpoints(args.output_dir, args.keep_last)
            record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if vis_images is not None and ((epoch + 1) % args.vis_freq == 0 or epoch + 1 == args.epochs):
                figure = make_figure(model_without_ddp, vis_images, min_glyph=0)
                log_writer.add_image("masks_and_predictions", figure, epoch, dataformats="HWC")
            log_writer.flush()
    total = time.time() - start_time
    print(f"training time {datetime.timedelta(seconds=int(total))}")
    if log_writer is not None:
        log_writer.close()
    del model  # the DDP wrapper, before the process group (see cleanup_distributed)
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
