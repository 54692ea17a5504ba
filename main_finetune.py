"""Fine-tuning a pre-trained ConViT / ViT encoder for ImageNet classification.

    torchrun --nproc_per_node=8 main_finetune.py --finetune out/dmjd_convit_b/checkpoint-399.pth \
        --data_path /path/to/imagenet --output_dir out/ft_convit_b

Defaults are the released ConViT-B recipe; see FINETUNE.md.
"""
import argparse

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

import models_convvit  # noqa: F401  (registers the classifiers with timm)
from util.checkpoint import architecture_kwargs, check_encoder_loaded, find_resume, load_pretrained
from util.classification import add_run_args, build_loaders, check_classifier_name, fit, setup_run
from util.transforms import eval_transform, finetune_transform


def get_args_parser():
    p = argparse.ArgumentParser("fine-tuning for image classification", add_help=True)
    p.add_argument("--batch_size", default=128, type=int, help="images per GPU (released: 1024 in all)")
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--accum_iter", default=1, type=int)

    g = p.add_argument_group("model")
    g.add_argument("--model", default="convvit_base_patch16", type=str)
    g.add_argument("--input_size", default=224, type=int)
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate")
    g.add_argument("--global_pool", action=argparse.BooleanOptionalAction, default=True,
                   help="mean of the tokens then a fresh norm (fc_norm, default), or the pre-trained final norm then "
                        "the mean")

    g = p.add_argument_group("optimizer")
    g.add_argument("--clip_grad", default=None, type=float)
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr x total batch / 256)")
    g.add_argument("--blr", default=5e-4, type=float)
    g.add_argument("--layer_decay", default=0.65, type=float, help="layer-wise lr decay (0.75 for ConViT-L)")
    g.add_argument("--min_lr", default=1e-6, type=float)
    g.add_argument("--warmup_epochs", default=5, type=float)

    g = p.add_argument_group("augmentation")
    g.add_argument("--color_jitter", default=None, type=float, help="only used without --aa")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str, help="timm auto-augment policy")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    g.add_argument("--remode", default="pixel", type=str)
    g.add_argument("--recount", default=1, type=int)
    g.add_argument("--mixup", default=0.8, type=float, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", default=1.0, type=float, help="cutmix alpha (0 = off)")
    g.add_argument("--cutmix_minmax", default=None, type=float, nargs="+")
    g.add_argument("--mixup_prob", default=1.0, type=float)
    g.add_argument("--mixup_switch_prob", default=0.5, type=float)
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])

    g = p.add_argument_group("initialisation")
    g.add_argument("--finetune", default="", help="pre-trained checkpoint (ours, released, or encoder-only)")
    g.add_argument("--checkpoint_key", default="model", choices=["model", "teacher"],
                   help="take the student encoder, or the EMA teacher's")
    add_run_args(p)
    return p


def main(args):
    run = setup_run(args)
    check_classifier_name(args.model)
    if args.lr is None:
        args.lr = args.blr * run.images_per_step / 256
        print(f"lr = blr {args.blr:.3g} x {run.images_per_step} images / 256 = {args.lr:.4g}")

    train_tf = finetune_transform(args.input_size, args.aa, args.reprob, args.remode, args.recount, args.color_jitter)
    loaders = build_loaders(args, run, train_tf, eval_transform(args.input_size))

    # A checkpoint in MAE's / timm's ViT layout (with a class token) is fine-tuned with its class token, as MAE does.
    resume = find_resume(args.resume, None if args.eval else args.output_dir)
    layout = architecture_kwargs(resume) if resume else architecture_kwargs(args.finetune, args.checkpoint_key)
    model = timm.create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                              drop_path_rate=args.drop_path, fc_norm=args.global_pool, **layout)
    if args.finetune:
        missing, unexpected = load_pretrained(model, args.finetune, args.checkpoint_key)
        check_encoder_loaded(missing, unexpected, args.finetune)
    model.to(run.device)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise SystemExit(f"error: --batch_size {args.batch_size} must be even for mixup / cutmix")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        print("mixup / cutmix on: soft-target cross-entropy")
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    param_groups = param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                            layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, fused=run.device.type == "cuda")
    fit(model, criterion, optimizer, loaders, args, run, mixup_fn)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
