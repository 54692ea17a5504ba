"""DMJD pre-training. Launch with torchrun on GPUs, or plainly (or with torchrun) on a CPU.

    torchrun --nproc_per_node=8 main_pretrain.py --data_path /path/to/imagenet --output_dir out/dmjd_convit_b

Defaults are the released ConViT-B recipe; see PRETRAIN.md.
"""
if __name__ == "__main__":  # first: a stop signal while the script starts is a requeue, nothing written
    from training.signals import handle_from_start
    handle_from_start()

import argparse  # noqa: E402

from training.errors import RunError, exits_like_a_script, flag_error  # noqa: E402
from training.flags import (DEFAULT_PRETRAIN_MODEL, MUST_MATCH, add_run_flags, check_data_path,  # noqa: E402
                            check_epoch_flags, check_input_size, check_run_flags, flag)


def get_args_parser():
    p = argparse.ArgumentParser("DMJD pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag(p, "--batch_size", default=64, type=int, help="images per GPU (each gives --num_views views)",
            check=">= 1", resume=MUST_MATCH)
    flag(p, "--epochs", default=400, type=int, help="pre-training epochs", check=">= 1", resume=MUST_MATCH)
    flag(p, "--accum_iter", default=1, type=int, help="gradient accumulation steps per optimizer step",
            check=">= 1", resume=MUST_MATCH)

    g = p.add_argument_group("model and method")
    flag(g, "--model", default=DEFAULT_PRETRAIN_MODEL, type=str, help="a registered dmjd_* model", resume=MUST_MATCH)
    flag(g, "--input_size", default=224, type=int, help="crop size in pixels", check=">= 1", resume=MUST_MATCH)
    flag(g, "--num_views", default=2, type=int, help="disjointly masked views per image (1 = MaskFeat/ConvMAE)",
            check=">= 1", resume=MUST_MATCH)
    flag(g, "--mask_ratio", default=0.6, type=float, help="corruption rate: fraction masked in one view",
            check="(0, 1)", resume=MUST_MATCH)
    flag(g, "--pred_ratio", default=None, type=float,
            help="prediction rate: fraction masked in at least one view, at least --mask_ratio (none: min(1, views x "
                 "mask_ratio))", check="(0, 1]", resume=MUST_MATCH)
    flag(g, "--mask_type", default="block", choices=["block", "rand"],
            help="block: units of --block_size x --block_size patches (SimMIM); rand: single patches",
            resume=MUST_MATCH)
    flag(g, "--block_size", default=2, type=int, help="block masking unit, in patches", check=">= 1", resume=MUST_MATCH)
    flag(g, "--pred_type", default="hog", choices=["hog", "pixel"], help="target of the masked tokens",
            resume=MUST_MATCH)
    flag(g, "--vis_target", default="hog", choices=["hog", "ema"], help="target of the visible tokens",
            resume=MUST_MATCH)
    flag(g, "--theta", default=1.0, type=float, help="weight of the visible-distillation loss (0 = off)",
            check=">= 0", resume=MUST_MATCH)
    flag(g, "--ema_momentum", default=0.996, type=float, help="initial teacher momentum (cosine to 1)",
            check="[0, 1]", resume=MUST_MATCH)
    flag(g, "--min_crop_scale", default=0.5, type=float, help="RandomResizedCrop's smallest area fraction",
            check="(0, 1]", resume=MUST_MATCH)

    g = p.add_argument_group("optimizer")
    flag(g, "--weight_decay", default=0.05, type=float, help="AdamW weight decay (none on biases and norms)",
            check=">= 0", resume=MUST_MATCH)
    flag(g, "--lr", default=None, type=float, help="absolute lr (none: the adaptive rule from --blr)",
            check="> 0", resume=MUST_MATCH)
    flag(g, "--blr", default=6e-4, type=float, help="base lr: lr = blr x images / 256 x pred / mask ratio",
            check="> 0", resume=MUST_MATCH)
    flag(g, "--min_lr", default=0.0, type=float, help="lr at the end of the cosine", check=">= 0", resume=MUST_MATCH)
    flag(g, "--warmup_epochs", default=20, type=float, help="linear lr warmup, per iteration, at most --epochs",
            check=">= 0", resume=MUST_MATCH)
    flag(g, "--clip_grad", default=None, type=float, help="max gradient norm (3.0 for ConViT-L)",
            check="> 0", resume=MUST_MATCH)

    g = add_run_flags(p, data_help="ImageFolder root holding train/")
    flag(g, "--compile", action="store_true", help="torch.compile the model (CUDA; first steps are slow)",
            resume="the same model, compiled or not")
    flag(g, "--channels_last", action=argparse.BooleanOptionalAction, default=None,
            help="NHWC memory for the conv stages and the input (none: on with CUDA, off on the CPU)",
            resume="the conv weights' memory layout, not their values")
    flag(g, "--save_freq", default=20, type=int, help="keep checkpoint-<epoch>.pth every N epochs",
            check=">= 1", resume="which periodic checkpoints are kept")
    flag(g, "--keep_last", default=0, type=int, help="periodic checkpoints kept (0 = all)",
            check=">= 0", resume="how many periodic checkpoints are kept")
    flag(g, "--vis_freq", default=20, type=int,
            help="TensorBoard picture of masks and predictions every N epochs (0 = never)",
            check=">= 0", resume="how often TensorBoard gets a picture")
    return p


def check_data(args) -> None:
    """Pre-training reads `train/` of --data_path."""
    check_data_path(args.data_path, ["train"], "an ImageFolder root: train/ with one folder of images per class")


if __name__ == "__main__":  # --help, a flag out of its range and a wrong --data_path answer before torch is imported
    ARGS = get_args_parser().parse_args()
    exits_like_a_script(check_run_flags)(get_args_parser(), ARGS)
    exits_like_a_script(check_data)(ARGS)

from typing import Tuple  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

import models_dmjd  # noqa: E402,F401  (registers the DMJD models with timm)
from dmjd_encoders.models_convvit import check_model_name, encoder_stride  # noqa: E402
from engine_pretrain import PretrainConfig, PretrainTask  # noqa: E402
from models_dmjd import adaptive_lr, create_from_flags, reachable_pred_ratio  # noqa: E402
from training.data import train_loader  # noqa: E402
from training.distributed import launch_world_size  # noqa: E402
from training.loop import Schedule, fit  # noqa: E402
from training.run import Run  # noqa: E402
from util.datasets import build_pretrain_dataset, sample_images, skip_bad_collate  # noqa: E402
from util.misc import resolve_amp, resolve_device  # noqa: E402


def validate_args(args) -> argparse.Namespace:
    """Fails before any work, naming the flag; returns a copy of `args` with the prediction rate made explicit
    (`args` itself is left as it is)."""
    check_run_flags(get_args_parser(), args)  # each flag's range, as declared
    check_epoch_flags(args)
    reachable = reachable_pred_ratio(args.num_views, args.mask_ratio)
    pred_ratio = reachable if args.pred_ratio is None else args.pred_ratio
    if not args.mask_ratio <= pred_ratio <= 1:
        raise flag_error("--pred_ratio", f"must be in [--mask_ratio, 1], got {pred_ratio}")
    if pred_ratio > reachable + 1e-6:
        raise flag_error("--pred_ratio", f"{pred_ratio} cannot be reached by {args.num_views} view(s) of mask_ratio "
                                         f"{args.mask_ratio} (at most {reachable:.3g}); add views or lower it")
    check_model_name(args.model, timm.list_models("dmjd_*"), "a DMJD model")
    check_input_size(args.input_size, args.model, encoder_stride(args.model))
    return argparse.Namespace(**{**vars(args), "pred_ratio": pred_ratio})


def resolve_config(args) -> Tuple[PretrainConfig, str]:
    """The run's config: the flags checked, and the prediction rate, lr, precision and memory format resolved for
    the launch's device and world size; and a line that says how the lr was chosen."""
    args = validate_args(args)
    device, world_size = resolve_device(args.device), launch_world_size()
    pred_ratio = args.pred_ratio
    images_per_step = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        lr, lr_line = adaptive_lr(args.blr, images_per_step, pred_ratio, args.mask_ratio)
    else:
        lr, lr_line = args.lr, f"lr = {args.lr:.4g} (given; the adaptive rule is not applied)"
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    cfg = PretrainConfig.from_args(args, get_args_parser(), pred_ratio=pred_ratio, lr=lr,
                                   amp=resolve_amp(args.amp, device)[0], channels_last=channels_last,
                                   world_size=world_size)
    return cfg, lr_line


def check_dataset_size(num_images: int, batch_size: int, accum_iter: int, world_size: int, folder: str) -> None:
    """An epoch must hold at least one optimizer step on every process (drop_last batches)."""
    per_step = batch_size * world_size
    if num_images < per_step:
        raise RunError(f"--batch_size {batch_size} x {world_size} processes needs at least that many images; "
                       f"{folder} has {num_images}")
    batches = num_images // per_step
    if batches < accum_iter:
        raise RunError(f"--accum_iter {accum_iter} needs {accum_iter} batches of {batch_size} per process in an "
                       f"epoch; {num_images} images over {world_size} processes give {batches}")


def build_model(cfg: PretrainConfig):
    try:
        return create_from_flags(cfg.flags())
    except ValueError as err:  # shapes that do not fit the model: name them before any work
        raise RunError(f"{err} (check --input_size, --block_size, --mask_ratio)") from None


@exits_like_a_script
def main(args):
    cfg, lr_line = resolve_config(args)
    check_data(args)  # before the run's header and output folder
    with Run(cfg, save_freq=cfg.save_freq, keep_last=cfg.keep_last) as run:
        print(lr_line)
        pretrain(run, cfg)


def pretrain(run: Run, cfg: PretrainConfig) -> None:
    print(f"{cfg.batch_size} images x {cfg.num_views} views per process, accum {cfg.accum_iter}, "
          f"{cfg.images_per_step} unique images per optimizer step")
    try:
        dataset = build_pretrain_dataset(cfg.data_path, cfg.input_size, cfg.min_crop_scale)
    except FileNotFoundError as err:
        raise RunError(str(err)) from None
    check_dataset_size(len(dataset), cfg.batch_size, cfg.accum_iter, cfg.world_size, f"{cfg.data_path}/train")
    print(f"dataset: {len(dataset)} images in {cfg.data_path}/train")
    loader = train_loader(dataset, cfg.batch_size, cfg.seed, run.dist, cfg.num_workers,
                          cfg.pin_mem and run.device.type == "cuda", skip_bad_collate)
    schedule = Schedule.of_epochs(cfg.epochs, len(loader), cfg.accum_iter)

    model = build_model(cfg).to(run.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights only; the teacher copies the format
    vis_images = None
    if run.is_main and cfg.vis_freq > 0:
        vis_images = sample_images(cfg.data_path, "train", cfg.input_size, 4).to(run.device)
    task = PretrainTask(model, cfg, run.device, lambda steps: cfg.momentum_at(schedule.epochs(steps)), vis_images)
    print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
          f"({sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f} M encoder)")
    if cfg.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay as they are
    fit(run, task, cfg, loader, None, schedule)


if __name__ == "__main__":
    main(ARGS)
