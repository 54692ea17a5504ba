"""Helpers that several test files (and the scripts some tests start) share: a tiny ImageFolder, and the
pre-training config and epoch that main_pretrain.py builds, at test size."""
import dataclasses

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


def write_image_folder(root, splits, classes=("a", "b"), size=(72, 80), seed=0):
    """A tiny ImageFolder, `<root>/<split>/<class>/<i>.png` with `splits[split]` images per class: each a
    class-tinted picture with a random rectangle and a little noise (structure for HOG, colour for the classes)."""
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                img = np.full((*size, 3), 60 * c + 20, np.uint8)
                y, x = rng.integers(0, (size[0] - 20, size[1] - 25))
                img[y:y + 20, x:x + 25] = rng.integers(0, 256, 3)
                img += rng.integers(0, 20, img.shape, dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def pretrain_config(**overrides):
    """An engine_pretrain.PretrainConfig: main_pretrain.py's defaults for a one-process CPU run of the tiny ConViT at
    64 pixels without warmup, then the overrides (any field)."""
    import main_pretrain
    from engine_pretrain import PretrainConfig

    flags = vars(main_pretrain.get_args_parser().parse_args(
        ["--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64", "--device", "cpu"]))
    flags.update(pred_ratio=1.0, lr=1e-3, amp="none", channels_last=False, world_size=1, warmup_epochs=0)
    flags.update(overrides)
    return PretrainConfig(**{f.name: flags[f.name] for f in dataclasses.fields(PretrainConfig)})


def pretrain_epoch(model, loader, optimizer, cfg, teacher=None, student=None, skipped=0, epoch=0):
    """engine_pretrain.train_one_epoch's stats, with the TrainStep and Progress that main_pretrain.py builds."""
    from engine_pretrain import LOSS_NAMES, train_one_epoch
    from training.meters import Progress
    from training.step import TrainStep
    from util.schedules import epoch_iterations

    iters = epoch_iterations(len(loader), cfg.accum_iter)
    rank = dist.get_rank() if dist.is_initialized() else 0
    step = TrainStep.for_run(model, optimizer, cfg, rank, iters, loss_names=LOSS_NAMES, skipped=skipped,
                             teacher=teacher, student=student, momentum_schedule=cfg.momentum_at if teacher else None)
    progress = Progress(f"Epoch [{epoch}]", iters, cfg.print_freq, torch.device("cpu"), names=LOSS_NAMES)
    return train_one_epoch(model, step, loader, epoch, cfg, progress, teacher=teacher)


def stop_with_signal(cmd, env, cwd, when: str, sig) -> str:
    """Runs a training command, sends it `sig` once it prints a line starting with `when`, and returns what it
    printed from then on; the run must end with status 75 (stopped after saving its step)."""
    import subprocess

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in proc.stdout:
        if line.startswith(when):
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 75, rest
    return rest
