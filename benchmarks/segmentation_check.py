"""A small real check of segmentation transfer, on a CPU: UperNet fine-tuned with main_segment.py on Fashion-MNIST
items pasted on 64 x 64 canvases (util/demo_seg_data.py, in ADE20K's layout), once from the demo's DMJD-pre-trained
encoder and once from a randomly initialised one, with the same flags and seed otherwise.

    python demo.py                                   # once: output_dir/demo/pretrain/checkpoint-last.pth
    python -m benchmarks.segmentation_check          # both fine-tunings, their mIoU and a picture

Without the demo's checkpoint the check says how to make it; with `--pretrain` it makes it itself, running the
demo's pre-training stage (the same main_pretrain.py command as demo.py). Both fine-tunings are main_segment.py runs,
started as the printed commands, so what is checked is the real script. The picture sets image, ground truth and
both models' predictions side by side for the first validation images.
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models_convvit  # noqa: E402,F401  (registers the encoders)
from engine_segment import SegmentConfig, build_segmenter  # noqa: E402
from util.checkpoint import load_checkpoint, load_state_dict_strict  # noqa: E402
from training.flags import absent_values, segmentation_parser  # noqa: E402
from util.demo_commands import (CLASSIFIER, DATA_DIR, PRETRAIN_EPOCHS, PRETRAIN_MODEL, pretrain_command,  # noqa: E402
                                 shown)
from util.demo_data import prepare_fashion_mnist  # noqa: E402
from util.demo_seg_data import SEG_CLASS_NAMES, prepare_fashion_mnist_seg  # noqa: E402
from util.seg_datasets import SegEvalTransform, SegmentationFolder  # noqa: E402
from util.visualization import segmentation_figure  # noqa: E402

RUNS = {"pretrained": "DMJD pre-trained", "random_init": "random init"}


def parse_args(argv=None):
    p = argparse.ArgumentParser("segmentation transfer check on Fashion-MNIST items",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained", default=os.path.join("output_dir", "demo", "pretrain", "checkpoint-last.pth"),
                   help="the demo's DMJD pre-training checkpoint (made by `python demo.py`)")
    p.add_argument("--pretrain", action="store_true",
                   help="if --pretrained is missing, make it with the demo's pre-training stage first")
    p.add_argument("--data", default=os.path.join("data", "fashion_mnist_seg"), help="segmentation dataset root")
    p.add_argument("--source", default=None, help="folder of the Fashion-MNIST idx files (none: the demo's)")
    p.add_argument("--num_train", default=2000, type=int, help="training canvases")
    p.add_argument("--num_val", default=500, type=int, help="validation canvases")
    p.add_argument("--output_dir", default=os.path.join("output_dir", "segmentation_check"),
                   help="both runs, the summary and the picture")
    p.add_argument("--iters", default=400, type=int, help="fine-tuning iterations of each run")
    p.add_argument("--warmup_iters", default=40, type=int, help="linear lr warmup")
    p.add_argument("--batch_size", default=16, type=int, help="images per iteration")
    p.add_argument("--blr", default=1.6e-2, type=float,
                   help="base lr (lr = blr x batch / 256): ten times the ADE20K recipe's, for a short run")
    p.add_argument("--decoder_channels", default=64, type=int, help="UPerHead width (the recipe's 768 is for 150 "
                                                                    "classes at 512 px)")
    p.add_argument("--aux_channels", default=32, type=int, help="auxiliary head width")
    p.add_argument("--num_images", default=6, type=int, help="validation images in the picture")
    p.add_argument("--picture", default=None, help="where the picture goes (none: <output_dir>/predictions.png)")
    p.add_argument("--num_workers", default=1, type=int,
                   help="data-loading workers of each run (on 2 cores more than 1 slows the step down)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", default=0, type=int, help="seeds both runs alike (the dataset is always the same)")
    return p.parse_args(argv)


def segment_command(args, data: str, output_dir: str, finetune: str = None):
    """main_segment.py at the canvas size (one 64 px window: whole-image evaluation), evaluated once at the end."""
    python = shown(sys.executable)
    cmd = [python, "main_segment.py", "--model", CLASSIFIER, "--input_size", "64", "--nb_classes",
           str(len(SEG_CLASS_NAMES)), "--img_scale", "64", "64", "--eval_mode", "whole",
           "--batch_size", str(args.batch_size), "--iters", str(args.iters), "--eval_interval", str(args.iters),
           "--warmup_iters", str(args.warmup_iters), "--blr", str(args.blr),
           "--decoder_channels", str(args.decoder_channels), "--aux_channels", str(args.aux_channels),
           "--num_workers", str(args.num_workers), "--device", args.device,
           "--seed", str(args.seed), "--print_freq", "50", "--data_path", shown(data),
           "--output_dir", shown(output_dir)]
    return cmd + (["--finetune", shown(finetune)] if finetune else [])


def run(cmd) -> float:
    print("\n$ " + shlex.join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def make_pretrained(args) -> None:
    """The demo's pre-training stage, as demo.py runs it, into --pretrained's folder."""
    out = os.path.dirname(os.path.abspath(args.pretrained))
    data = prepare_fashion_mnist(DATA_DIR, sources=[args.source] if args.source else None, verbose=True)
    run(pretrain_command(data, out, PRETRAIN_EPOCHS, args.num_workers, args.device))


def last_scores(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "log.txt")) as f:
        return json.loads(f.read().splitlines()[-1])


def predictions(checkpoint: str, dataset: SegmentationFolder, indices) -> np.ndarray:
    """A run's predicted label maps [N, H, W] for validation images `indices`, from its checkpoint, evaluated as the
    script evaluates (its saved flags: window, stride, scales)."""
    ckpt = load_checkpoint(checkpoint)
    # a flag the checkpoint predates: the value its run had (training.flags.flag's `absent`)
    saved = {**absent_values(segmentation_parser()), **ckpt["args"], "device": "cpu", "amp": "none"}
    cfg = SegmentConfig(**{f.name: saved[f.name] for f in dataclasses.fields(SegmentConfig)})
    model = build_segmenter(cfg)
    load_state_dict_strict(model, ckpt["model"])
    model.eval()
    out = []
    for index in indices:
        image, label = dataset[index]
        probs = model.predict(image[None], label.shape, cfg.eval_mode, cfg.eval_crop_size, cfg.eval_stride,
                              cfg.test_ratios, cfg.aug_test)
        out.append(probs.argmax(1)[0].numpy())
    return np.stack(out)


def picture(data: str, runs: dict, num_images: int, path: str) -> None:
    dataset = SegmentationFolder(data, "validation", len(SEG_CLASS_NAMES), SegEvalTransform((64, 64)))
    indices = list(range(min(num_images, len(dataset))))
    images = np.stack([np.asarray(dataset.load_pair(i)[0]) for i in indices])
    labels = np.stack([dataset.load_pair(i)[1] for i in indices])
    maps = [predictions(os.path.join(out, "checkpoint-last.pth"), dataset, indices) for out in runs.values()]
    figure = segmentation_figure(images, labels, maps[0], SEG_CLASS_NAMES, more_predictions=maps[1:],
                                 titles=("image", "ground truth", *[RUNS[name] for name in runs]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(figure).save(path)


def main(args):
    start = time.time()
    torch.manual_seed(args.seed)
    if not os.path.isfile(args.pretrained):
        if not args.pretrain:
            raise SystemExit(f"error: no pre-trained checkpoint at {args.pretrained}. Make it with "
                             f"`{shown(sys.executable)} demo.py` "
                             f"(about 10-20 minutes on 2 CPU cores), or run this check with --pretrain to run only "
                             f"the demo's pre-training stage, or give another DMJD checkpoint of "
                             f"{PRETRAIN_MODEL} with --pretrained")
        make_pretrained(args)
    try:  # the dataset's own fixed seed: --seed seeds the two runs, not the data
        data = prepare_fashion_mnist_seg(args.data, [args.source] if args.source else None, args.num_train,
                                         args.num_val, verbose=True)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    runs, seconds = {}, {}
    for name in RUNS:
        out = os.path.join(args.output_dir, name)
        if os.path.isdir(out):  # a fresh run each time, not a resumed one
            for entry in os.listdir(out):
                os.remove(os.path.join(out, entry))
        seconds[name] = run(segment_command(args, data, out, args.pretrained if name == "pretrained" else None))
        runs[name] = out
    scores = {name: last_scores(out) for name, out in runs.items()}
    path = args.picture or os.path.join(args.output_dir, "predictions.png")
    picture(data, runs, args.num_images, path)

    summary = {name: {"mIoU": s["test_mIoU"], "mAcc": s["test_mAcc"], "aAcc": s["test_aAcc"],
                      "IoU": s["test_IoU"], "minutes": seconds[name] / 60} for name, s in scores.items()}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"iters": args.iters, "batch_size": args.batch_size, "pretrained": args.pretrained, **summary}, f,
                  indent=1)
    print("\n" + "=" * 78)
    print(f"UperNet on {CLASSIFIER}, {args.iters} iterations of {args.batch_size} images, "
          f"{args.num_val} validation canvases ({len(SEG_CLASS_NAMES)} classes):")
    for name, label in RUNS.items():
        s = summary[name]
        print(f"  {label:<17} mIoU {s['mIoU']:.2f}  mAcc {s['mAcc']:.2f}  aAcc {s['aAcc']:.2f}  "
              f"({s['minutes']:.1f} min)")
    gain = summary["pretrained"]["mIoU"] - summary["random_init"]["mIoU"]
    print(f"  pre-training gives {gain:+.2f} mIoU; picture: {path}; check time {(time.time() - start) / 60:.1f} min")
    print("=" * 78)
    return summary


if __name__ == "__main__":
    main(parse_args())
