"""Memory per image, FLOPs per image and images/s of the detection training step: Mask R-CNN with FPN on ConViT-B
(ConvMAE's detection backbone: windows of 16, four global blocks) at 1024 x 1024 by default, or on any other encoder
with its own detection backbone (a ViT: ViTDet's), built and trained as main_detect.py does (its flags, recipe,
model, optimizer and training loop).

    python -m benchmarks.detection_step --device cuda --amp bf16                 # a GPU: the recipe's step
    python -m benchmarks.detection_step --sizes 256 384 --steps 1                # this CPU, to extrapolate

For each crop size, the figures of benchmarks.task_step on engine_detect.DetectTask and random crops with 8 random
instances each (boxes and masks): activation memory per image (batch 2 to 3), weights + gradients + AdamW, FLOPs per
image (the RoI heads' share depends on the 512 proposals sampled per image, not on the crop size), images/s of the
training loop's round and, on CUDA, the peak memory.
"""
import argparse
import multiprocessing
from functools import partial

import torch

from benchmarks import task_step
from benchmarks.doc_block import provenance, rewrite_block
from benchmarks.task_step import step_device
from engine_detect import DetectConfig, DetectTask, build_detector, resolve_config
from dmjd_encoders.models_convvit import conv_weights_channels_last
from main_detect import get_args_parser as detection_parser

COCO_CLASSES = 80


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="memory and speed of the detection training step",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="convvit_base_patch16", help="the encoder")
    p.add_argument("--sizes", default=[1024], type=int, nargs="+", help="crop sizes in pixels")
    p.add_argument("--batch_size", default=2, type=int, help="images per timed step (the recipe: 4 per GPU)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype of the timed step (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--steps", default=3, type=int, help="timed steps (after one warm-up step); 0: memory only")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count (a forward and backward at batch 1)")
    p.add_argument("--fpn_channels", default=256, type=int, help="FPN and heads' width (the recipe's)")
    p.add_argument("--rois_per_image", default=512, type=int, help="proposals sampled per image (the recipe's)")
    p.add_argument("--window_size", default=None, type=int,
                   help="attention windows (none: the model's detection backbone's, 16 for a ConViT)")
    p.add_argument("--global_blocks", default=None, type=int, nargs="*",
                   help="blocks attending globally (none: the model's, ConvMAE's 0 3 6 10 for ConViT-B)")
    p.add_argument("--doc", default=None,
                   help="a markdown file whose detection_step block gets the table, with a row extrapolated to "
                        "--extrapolate px from the first two sizes (DETECT.md)")
    p.add_argument("--extrapolate", default=1024, type=int, help="the crop size of the extrapolated row")
    return p.parse_args(argv)


def step_config(args, size: int, batch_size: int) -> DetectConfig:
    """main_detect.py's config for this benchmark: the recipe with the model, size, batch and device asked for."""
    flags = ["--model", args.model, "--input_size", str(size), "--batch_size", str(batch_size),
             "--device", args.device, "--amp", args.amp, "--print_freq", str(10 ** 6),
             "--fpn_channels", str(args.fpn_channels), "--rois_per_image", str(args.rois_per_image)]
    if args.window_size is not None:
        flags += ["--window_size", str(args.window_size)]
    if args.global_blocks is not None:
        flags += ["--global_blocks", *map(str, args.global_blocks)]
    parser = detection_parser()
    return resolve_config(parser.parse_args(flags), parser)[0]


def random_batch(size: int, batch_size: int, device: torch.device, instances: int = 8):
    """Random uint8 crops with `instances` random boxes each, their masks the boxes' rectangles."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch_size):
        corners = torch.randint(0, size // 2, (instances, 2), generator=g)
        extents = torch.randint(size // 16, size // 2, (instances, 2), generator=g)
        boxes = torch.cat([corners, corners + extents], dim=1).float()
        masks = torch.zeros(instances, size, size, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            mask[y0:y1, x0:x1] = 1
        labels = torch.randint(1, COCO_CLASSES + 1, (instances,), generator=g)
        images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


class _Classes:  # what DetectTask reads of a validation set, for a step that is never evaluated
    class_names = [str(k) for k in range(COCO_CLASSES)]
    category_ids = list(range(1, COCO_CLASSES + 1))

    @staticmethod
    def ground_truth_data():
        return {"images": [], "annotations": [], "categories": [{"id": k} for k in range(1, COCO_CLASSES + 1)]}


def measure(args, size: int) -> dict:
    cfg = step_config(args, size, args.batch_size)
    device = step_device(cfg.device)
    torch.manual_seed(0)
    model = conv_weights_channels_last(build_detector(cfg, COCO_CLASSES).to(device)).train()
    task = DetectTask(model, cfg, device, _Classes())

    def raw(n):
        return random_batch(size, n, device)

    return task_step.measure(task, cfg, size, raw, lambda n: task.prepare(*raw(n))[:2], device, args.steps,
                             not args.no_flops)


def measure_alone(args, size: int) -> dict:
    """`measure` in a process of its own: the allocator keeps what one size freed (8 GB after 256 px on the CPU), so
    a larger size measured after it in the same process would need that much more memory than it uses."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (args, size))


def doc_block(args, rows) -> str:
    """The table of `rows` for the docs, with an extrapolated row when two sizes were measured, and the provenance."""
    lines = [task_step.TABLE_HEADER] + [task_step.table_row(r, speed_digits=3) for r in rows]
    if len(rows) >= 2 and args.extrapolate not in args.sizes:
        row = task_step.table_row(task_step.extrapolated(rows, args.extrapolate))
        lines.append(row.replace(" |", ", extrapolated |", 1))
    device = step_device(args.device)
    return (f"{args.model}, {COCO_CLASSES} classes, `--amp {args.amp}`, batch {args.batch_size} "
            f"({provenance(device)}):\n\n" + "\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    rows = task_step.print_table(f"Mask R-CNN with FPN on {args.model}, training step ({COCO_CLASSES} classes)",
                                 args.sizes, partial(measure_alone, args), speed_digits=3)
    if args.doc:
        rewrite_block(args.doc, "detection_step", doc_block(args, rows))
    return rows


if __name__ == "__main__":
    main()
