"""Helpers that several test files (and the scripts some tests start) share: a tiny ImageFolder, a tiny segmentation
dataset in ADE20K's layout, Fashion-MNIST idx files, a pre-training checkpoint, and the pre-training config and
epoch that main_pretrain.py builds, at test size, and a script's process with its log."""
import argparse
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def script_env():
    """The environment of a script started by a test: one thread, the repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run_script(cmd, check=True, timeout=300):
    """A script's process, run from the repository with one thread; `check`: fails with its output unless it exits
    0 without a warning that DDP's gradient buckets and the conv weights' gradients disagree in layout."""
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and (proc.returncode != 0 or "Grad strides do not match" in proc.stderr):
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_two_processes(script: str, timeout=120):
    """`python -c script` as ranks 0 and 1 of a 2-process group (torchrun's environment, a free local port); fails
    with their errors unless both exit 0. Returns each process's last line of output."""
    import socket
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=dict(script_env(), RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)))
             for rank in range(2)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    return [out.strip().splitlines()[-1] for out, _ in outputs]


def folder_digest(root) -> str:
    """A hash of every file's name and bytes under `root`, in a fixed order: equal for byte-identical folders."""
    import hashlib
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def read_log(out):
    """The JSON lines of a run's log.txt."""
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


def as_script(call, *args):
    """`call(*args)` as a script's main makes it: library errors become `error: ...` exits (status 1, 75 for a stop),
    as the scripts print them."""
    from training.errors import exits_like_a_script
    return exits_like_a_script(call)(*args)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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


def write_segmentation_folder(root, splits, num_classes=4, seed=0):
    """A tiny segmentation dataset in ADE20K's layout: `splits[split]` lists the (height, width) of its images, each
    `<root>/images/<split>/<i>.png` with `<root>/annotations/<split>/<i>.png`. Annotations follow ADE20K (0 = other,
    1..num_classes the classes): a background class and rectangles of other classes, each in its own colour (plus a
    little noise), so that a model can learn them; a border of label 0."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (num_classes + 1, 3))
    for split, sizes in splits.items():
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            label = np.ones((h, w), np.uint8)
            for k in rng.integers(2, num_classes + 1, 3):
                y, x = rng.integers(0, (h - h // 3, w - w // 3))
                label[y:y + h // 3, x:x + w // 3] = k
            label[:2] = 0
            image = (colors[label] + rng.integers(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            Image.fromarray(label, "L").save(root / "annotations" / split / f"{i}.png")
    return root


def write_fashion_idx(folder, train=30, test=20):
    """Fashion-MNIST-like idx files (every class present) in `folder`: items of ink in a square with a faint rim."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", train), ("t10k", test)):
        items = np.zeros((n, 28, 28), np.uint8)
        items[:, 6:22, 6:22] = 10
        items[:, 8:20, 8:20] = 200
        for name, array in ((f"{stem}-images-idx3-ubyte", items),
                            (f"{stem}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))):
            header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
            (folder / name).write_bytes(header + array.tobytes())
    return folder


def pretrain_checkpoint(path, model_name="dmjd_convit_tiny_patch16_dec1_hog", img_size=64, **kwargs):
    """A pre-training checkpoint as main_pretrain.py writes it, of a model whose weights were moved away from any
    fresh initialisation; returns the model."""
    import timm

    import models_dmjd  # noqa: F401  (registers the DMJD models)
    from dmjd_encoders.checkpoint import save_checkpoint

    torch.manual_seed(1)
    model = timm.create_model(model_name, img_size=img_size, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint({"model": model.state_dict(), "epoch": 0, "args": {"model": model_name, "input_size": img_size}},
                    str(path))
    return model


def pretrain_config(**overrides):
    """An engine_pretrain.PretrainConfig: main_pretrain.py's defaults for a one-process CPU run of the tiny ConViT at
    64 pixels without warmup, then the overrides (any field)."""
    import main_pretrain
    from engine_pretrain import PretrainConfig

    flags = vars(main_pretrain.get_args_parser().parse_args(
        ["--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64", "--device", "cpu"]))
    flags.update(pred_ratio=1.0, lr=1e-3, amp="none", channels_last=False, world_size=1, warmup_epochs=0)
    flags.update(overrides)
    return PretrainConfig.from_args(argparse.Namespace(**flags), main_pretrain.get_args_parser())


def pretrain_epoch(model, loader, optimizer, cfg, teacher=None, student=None, skipped=0, epoch=0):
    """The stats of one epoch of pre-training (training.loop.train_round on engine_pretrain.PretrainTask), with the
    TrainStep and Progress that training.loop.fit builds. `teacher`: an EMA teacher (or a stand-in with `update`)
    for the task to update after each optimizer step; `student` is what it follows (the model's encoder)."""
    from engine_pretrain import LOSS_NAMES, PretrainTask
    from training.loop import Schedule, train_round
    from training.meters import Progress
    from training.step import TrainStep

    schedule = Schedule.of_epochs(cfg.epochs, len(loader), cfg.accum_iter)
    task = PretrainTask.__new__(PretrainTask)  # the model may be a stand-in without an encoder
    task.model, task.trained, task.cfg, task.device = model, model, cfg, torch.device("cpu")
    task.teacher, task.momentum, task.vis_images = teacher, float("nan"), None
    if teacher is not None:
        task.model = type("Student", (), {"encoder": student})()  # what the teacher follows
    schedules = cfg.schedules(schedule.round_steps)
    if teacher is not None and "momentum" not in schedules:  # a stand-in teacher beside a config without one
        schedules["momentum"] = lambda steps: cfg.ema_momentum
    rank = dist.get_rank() if dist.is_initialized() else 0
    step = TrainStep.for_run(model, optimizer, cfg, rank, schedules, schedule.round_batches, loss_names=LOSS_NAMES,
                             skipped=skipped, after_step=task.after_step)
    progress = Progress(f"Epoch [{epoch}]", schedule.round_batches, cfg.print_freq, torch.device("cpu"),
                        names=LOSS_NAMES)
    return train_round(task, step, loader, progress, epoch, schedule)


def stop_with_signal(cmd, env, cwd, when: str, sig, status: int = 75, group: bool = True) -> str:
    """Runs a training command in a process group of its own and, once it prints a line starting with `when`, sends
    `sig` to the whole group, loader workers included, as a scheduler does (SLURM's preemption, `scancel`, the time
    limit), or with `group` False to the command's process alone; returns what it printed from then on. The run must
    end with `status` (75: stopped after saving its step), and no loader worker may have died of the signal."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith(when):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            break
    rest, errors = proc.communicate(timeout=120)
    assert proc.returncode == status, rest + errors[-3000:]
    assert "killed by signal" not in errors, errors[-3000:]
    return rest + errors


def encoder_checkpoint(path, name, input_size=64, **args):
    """A checkpoint of the registered encoder `name` at `input_size`, as fine-tuning saves one ({"model", "args"}),
    its weights away from a fresh initialisation; `args`: more saved flags. Returns the encoder (eval mode)."""
    import timm
    from dmjd_encoders.checkpoint import save_checkpoint
    torch.manual_seed(1)
    model = timm.create_model(name, img_size=input_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint({"model": model.state_dict(), "args": {"model": name, "input_size": input_size, **args}},
                    str(path))
    return model.eval()
