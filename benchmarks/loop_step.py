"""Seconds per pre-training step through a checkout's own training loop, to compare two checkouts side by side.

    python benchmarks/loop_step.py --tree . --vis_target hog --steps 150
    python benchmarks/loop_step.py --tree /path/to/older/checkout --vis_target hog --steps 150

It imports the checkout given as --tree (its models, its loop and its tests/helpers.pretrain_epoch, the one epoch of
pre-training the tests run, with the TrainStep and Progress its script builds), trains the tiny ConViT at 64 px on
one batch of 8 synthetic images repeated --steps times after a warm-up of 3, and prints one JSON line: seconds per
step, images/s and the epoch's mean loss (equal between checkouts whose numerics agree). Run the two checkouts
alternately, several times: on a shared CPU one process's step time moves by 20% or more between minutes.
"""
import argparse
import json
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description="pre-training step time through a checkout's loop",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tree", default=".", help="the checkout to time (its own code is imported)")
    p.add_argument("--vis_target", default="hog", choices=["hog", "ema"], help="ema: with the teacher's update")
    p.add_argument("--steps", default=150, type=int, help="timed steps")
    p.add_argument("--batch_size", default=8, type=int, help="images per step")
    args = p.parse_args(argv)
    tree = os.path.abspath(args.tree)
    sys.path[:0] = [tree, os.path.join(tree, "tests")]
    import torch
    from helpers import pretrain_config, pretrain_epoch
    from models_dmjd import EMATeacher, create_from_flags

    cfg = pretrain_config(epochs=1, print_freq=10 ** 6, batch_size=args.batch_size, vis_target=args.vis_target)
    torch.manual_seed(0)
    model = create_from_flags(cfg.flags())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    teacher = EMATeacher(model.encoder) if model.uses_teacher else None
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (args.batch_size, 3, 64, 64), dtype=torch.uint8, generator=g),
             torch.zeros(args.batch_size, dtype=torch.long), 0)
    kwargs = dict(teacher=teacher, student=model.encoder if teacher is not None else None)
    pretrain_epoch(model, [batch] * 3, optimizer, cfg, **kwargs)  # warm-up
    start = time.perf_counter()
    stats = pretrain_epoch(model, [batch] * args.steps, optimizer, cfg, **kwargs)
    seconds = (time.perf_counter() - start) / args.steps
    row = {"tree": tree, "vis_target": args.vis_target, "ms_per_step": round(seconds * 1000, 2),
           "images_per_s": round(args.batch_size / seconds, 1), "loss": stats["loss"]}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
