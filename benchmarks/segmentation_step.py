"""Memory per image and images/s of the segmentation training step: UperNet on ConViT-B at 512 x 512 by default, built
and trained exactly as main_segment.py does (its flags, model, optimizer and training loop).

    python -m benchmarks.segmentation_step --device cuda --amp bf16            # a GPU: the recipe's step
    python -m benchmarks.segmentation_step --sizes 256 512 --steps 2            # this CPU

For each crop size, the figures of benchmarks.task_step on engine_segment.SegmentTask (TrainStep: autocast, AdamW
with layer decay, the poly lr) and random crops already on the device: activation memory per image (from a batch of 2
to a batch of 3: BatchNorm's 1 x 1 pooling branch needs two images), weights + gradients + AdamW, FLOPs per image,
images/s of the training loop's round and, on CUDA, the peak memory.
"""
import argparse
from functools import partial

import torch

from benchmarks import task_step
from benchmarks.task_step import step_device
from engine_segment import SegmentTask, build_segmenter, resolve_config
from dmjd_encoders.models_convvit import conv_weights_channels_last
from main_segment import get_args_parser as segmentation_parser

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="memory and speed of the segmentation training step",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="convvit_base_patch16", help="the encoder")
    p.add_argument("--sizes", default=[512], type=int, nargs="+", help="crop sizes in pixels")
    p.add_argument("--batch_size", default=2, type=int, help="images per timed step (the recipe: 2 per GPU)")
    p.add_argument("--decoder_channels", default=768, type=int, help="UPerHead width (ConvMAE-B's config)")
    p.add_argument("--nb_classes", default=150, type=int, help="classes (ADE20K)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype of the timed step (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--steps", default=5, type=int, help="timed steps (after one warm-up step); 0: memory only")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count (a forward and backward at batch 1)")
    return p.parse_args(argv)


def step_config(args, size: int, batch_size: int, steps: int):
    """main_segment.py's config for this benchmark: the recipe with the model, size, batch and device asked for."""
    flags = ["--model", args.model, "--input_size", str(size), "--batch_size", str(batch_size),
             "--decoder_channels", str(args.decoder_channels), "--nb_classes", str(args.nb_classes),
             "--device", args.device, "--amp", args.amp, "--iters", str(max(steps, 1)),
             "--eval_interval", str(max(steps, 1)), "--warmup_iters", "0", "--print_freq", str(10 ** 6)]
    parser = segmentation_parser()
    return resolve_config(parser.parse_args(flags), parser)[0]


def random_batch(cfg, batch_size: int, device: torch.device):
    images = torch.randn(batch_size, 3, cfg.input_size, cfg.input_size, device=device)
    labels = torch.randint(0, cfg.nb_classes, (batch_size, cfg.input_size, cfg.input_size), device=device)
    return images, labels


def measure(args, size: int) -> dict:
    cfg = step_config(args, size, args.batch_size, args.steps)
    device = step_device(cfg.device)
    torch.manual_seed(0)
    model = conv_weights_channels_last(build_segmenter(cfg).to(device)).train()
    task = SegmentTask(model, cfg, device, [str(k) for k in range(cfg.nb_classes)])
    batch = partial(random_batch, cfg, device=device)  # on the device: what task.prepare gives and takes
    return task_step.measure(task, cfg, size, batch, batch, device, args.steps, not args.no_flops)


def main(argv=None):
    args = parse_args(argv)
    return task_step.print_table(f"UperNet ({args.decoder_channels} channels, {args.nb_classes} classes) on "
                                 f"{args.model}, training step", args.sizes, partial(measure, args))


if __name__ == "__main__":
    main()
