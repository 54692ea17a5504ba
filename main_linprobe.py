"""Linear probing of a frozen pre-trained encoder: the release's features (the mean of the last block's tokens through
a LayerNorm without affine), BatchNorm without affine and a linear classifier, trained with LARS.

    torchrun --nproc_per_node=8 main_linprobe.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/imagenet --output_dir out/lin_convit_b

Defaults are the released ConViT-B recipe; see FINETUNE.md.
"""
import argparse

import timm
import torch
from timm.optim import Lars

import models_convvit  # noqa: F401  (registers the encoders with timm)
from models_convvit import PROBE_FEATURES, LinearProbe
from util.checkpoint import architecture_kwargs, check_encoder_loaded, find_resume, load_checkpoint, load_pretrained
from util.classification import add_run_args, build_loaders, check_classifier_name, fit, setup_run
from util.transforms import eval_transform, linprobe_transform


def get_args_parser():
    p = argparse.ArgumentParser("linear probing", add_help=True)
    p.add_argument("--batch_size", default=512, type=int, help="images per GPU (released: 4096 in all)")
    p.add_argument("--epochs", default=90, type=int, help="90 for ConViT-B, 50 for ConViT-L")
    p.add_argument("--accum_iter", default=1, type=int)
    p.add_argument("--model", default="convvit_base_patch16", type=str)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--min_crop_scale", default=0.08, type=float, help="RandomResizedCrop's smallest area fraction")
    p.add_argument("--weight_decay", default=0.0, type=float)
    p.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr x total batch / 256)")
    p.add_argument("--blr", default=0.1, type=float, help="0.1 for ConViT-B, 0.05 for ConViT-L")
    p.add_argument("--min_lr", default=0.0, type=float)
    p.add_argument("--warmup_epochs", default=10, type=float)
    p.add_argument("--finetune", default="", help="pre-trained checkpoint (ours, released, or encoder-only)")
    p.add_argument("--checkpoint_key", default="model", choices=["model", "teacher"],
                   help="probe the student encoder, or the EMA teacher's")
    p.add_argument("--probe_features", default=None, choices=PROBE_FEATURES,
                   help="pool_then_fresh_norm: the release's (mean of the last block's tokens, then a LayerNorm "
                        "without affine; the default); final_norm_then_pool: the mean of the final norm's tokens, as "
                        "probes trained before this flag existed. A resumed probe keeps its own.")
    add_run_args(p)
    p.set_defaults(clip_grad=None)
    return p


def lars_param_groups(head: torch.nn.Module, weight_decay: float):
    """LARS adapts the weight matrices' steps; biases get plain momentum SGD and no weight decay (as MAE)."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    return [{"params": matrices, "weight_decay": weight_decay, "always_adapt": True},
            {"params": vectors, "weight_decay": 0.0, "always_adapt": False}]


def resumed_probe_features(args, resume):
    """--probe_features, or the features a resumed probe was trained on (final_norm_then_pool for probes saved
    before the flag existed); a conflict between the two stops the run."""
    saved = None
    if resume:
        saved_args = load_checkpoint(resume, mmap=True).get("args") or {}
        saved = saved_args.get("probe_features") or "final_norm_then_pool"
    if args.probe_features and saved and args.probe_features != saved:
        raise SystemExit(f"error: --probe_features {args.probe_features}, but {resume} was trained on {saved}")
    return args.probe_features or saved or PROBE_FEATURES[0]


def main(args):
    if not 0 < args.min_crop_scale <= 1:
        raise SystemExit(f"error: --min_crop_scale must be in (0, 1], got {args.min_crop_scale}")
    resume = find_resume(args.resume, None if args.eval else args.output_dir)
    args.probe_features = resumed_probe_features(args, resume)
    run = setup_run(args)
    check_classifier_name(args.model)
    if args.lr is None:
        args.lr = args.blr * run.images_per_step / 256
        print(f"lr = blr {args.blr:.3g} x {run.images_per_step} images / 256 = {args.lr:.4g}")
    loaders = build_loaders(args, run, linprobe_transform(args.input_size, args.min_crop_scale), eval_transform(args.input_size))

    # A checkpoint in MAE's / timm's ViT layout (with a class token) is probed with its class token, as MAE does.
    layout = architecture_kwargs(resume) if resume else architecture_kwargs(args.finetune, args.checkpoint_key)
    encoder = timm.create_model(args.model, img_size=args.input_size, **layout)
    if args.finetune:
        missing, unexpected = load_pretrained(encoder, args.finetune, args.checkpoint_key)
        check_encoder_loaded(missing, unexpected, args.finetune, allowed_missing=())
    elif not args.eval:
        print("warning: no --finetune checkpoint: probing a randomly initialised encoder")
    model = LinearProbe(encoder, args.nb_classes, args.probe_features).to(run.device)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    print(f"trainable parameters: {trainable}")

    optimizer = Lars(lars_param_groups(model.head, args.weight_decay), lr=args.lr, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    fit(model, criterion, optimizer, loaders, args, run)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
