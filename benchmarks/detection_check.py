"""A small real check of detection and instance-segmentation transfer, on a CPU: Mask R-CNN fine-tuned with
main_detect.py on Fashion-MNIST items pasted on 64 x 64 canvases (util/demo_det_data.py, in COCO's format: one
instance per pasted item, its box and mask), once from the demo's DMJD-pre-trained encoder and once from a randomly
initialised one, with the same flags and seed otherwise.

    python demo.py                                   # once: output_dir/demo/pretrain/checkpoint-last.pth
    python -m benchmarks.detection_check             # both fine-tunings, their box and mask AP, and a picture

Without the demo's checkpoint the check says how to make it; with `--pretrain` it makes it itself (the demo's
pre-training stage). Both fine-tunings are main_detect.py runs, started as the printed commands. The picture sets
image, ground truth and both models' detections (masks, boxes, class names, scores of --score_threshold or more)
side by side for the first validation images.
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models_convvit  # noqa: E402,F401  (registers the encoders)
from benchmarks.segmentation_check import make_pretrained  # noqa: E402
from engine_detect import DetectConfig, build_detector  # noqa: E402
from training.flags import absent_values, detection_parser  # noqa: E402
from util.checkpoint import load_checkpoint, load_state_dict_strict  # noqa: E402
from util.coco import coco_split  # noqa: E402
from util.demo_commands import CLASSIFIER, PRETRAIN_MODEL, shown  # noqa: E402
from util.demo_det_data import prepare_fashion_mnist_det  # noqa: E402
from util.det_transforms import DetEvalTransform  # noqa: E402
from util.visualization import detection_figure  # noqa: E402

RUNS = {"pretrained": "DMJD pre-trained", "random_init": "random init"}


def parse_args(argv=None):
    p = argparse.ArgumentParser("detection transfer check on Fashion-MNIST items",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained", default=os.path.join("output_dir", "demo", "pretrain", "checkpoint-last.pth"),
                   help="the demo's DMJD pre-training checkpoint (made by `python demo.py`)")
    p.add_argument("--pretrain", action="store_true",
                   help="if --pretrained is missing, make it with the demo's pre-training stage first")
    p.add_argument("--data", default=os.path.join("data", "fashion_mnist_det"), help="COCO-format dataset root")
    p.add_argument("--source", default=None, help="folder of the Fashion-MNIST idx files (none: the demo's)")
    p.add_argument("--num_train", default=2000, type=int, help="training canvases")
    p.add_argument("--num_val", default=500, type=int, help="validation canvases")
    p.add_argument("--output_dir", default=os.path.join("output_dir", "detection_check"),
                   help="both runs, the summary and the picture")
    p.add_argument("--iters", default=400, type=int, help="fine-tuning iterations of each run")
    p.add_argument("--batch_size", default=16, type=int, help="images per iteration")
    p.add_argument("--blr", default=6.4e-3, type=float,
                   help="base lr (lr = blr x batch / 256): ten times the COCO recipe's, for a short run")
    p.add_argument("--scale_range", default=[0.5, 2.0], type=float, nargs=2,
                   help="large-scale jitter's range (the recipe's 0.1 makes 64 px canvases' items a few pixels)")
    p.add_argument("--fpn_channels", default=64, type=int, help="FPN and heads' width (the recipe's 256)")
    p.add_argument("--rois_per_image", default=64, type=int, help="proposals sampled per image (the recipe's 512)")
    p.add_argument("--num_images", default=4, type=int, help="validation images in the picture")
    p.add_argument("--score_threshold", default=0.2, type=float, help="the picture's detections: scores from this on")
    p.add_argument("--picture", default=None, help="where the picture goes (none: <output_dir>/predictions.png)")
    p.add_argument("--num_workers", default=1, type=int, help="data-loading workers of each run")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", default=0, type=int, help="seeds both runs alike (the dataset is always the same)")
    return p.parse_args(argv)


def detect_command(args, data: str, output_dir: str, finetune: str = None):
    """main_detect.py at the canvas size, evaluated once at the end; the encoder's stage 3 attends globally (an 8 x 8
    grid at 64 px needs no windows)."""
    cmd = [shown(sys.executable), "main_detect.py", "--model", CLASSIFIER, "--input_size", "64",
           "--batch_size", str(args.batch_size), "--iters", str(args.iters), "--eval_interval", str(args.iters),
           "--blr", str(args.blr), "--scale_range", *map(str, args.scale_range), "--window_size", "0",
           "--global_blocks", "--fpn_channels", str(args.fpn_channels), "--rois_per_image", str(args.rois_per_image),
           "--num_workers", str(args.num_workers), "--device", args.device, "--seed", str(args.seed),
           "--print_freq", "50", "--data_path", shown(data), "--output_dir", shown(output_dir)]
    return cmd + (["--finetune", shown(finetune)] if finetune else [])


def run(cmd) -> float:
    print("\n$ " + shlex.join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def last_scores(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "log.txt")) as f:
        return json.loads(f.read().splitlines()[-1])


@torch.no_grad()
def detections(checkpoint: str, images, num_classes: int):
    """A run's Mask R-CNN outputs for `images` (uint8 [3, H, W] each), built from its checkpoint's saved flags."""
    ckpt = load_checkpoint(checkpoint)
    saved = {**absent_values(detection_parser()), **ckpt["args"], "device": "cpu", "amp": "none"}
    cfg = DetectConfig(**{f.name: saved[f.name] for f in dataclasses.fields(DetectConfig)})
    model = build_detector(cfg, num_classes)
    load_state_dict_strict(model, ckpt["model"])
    return model.eval()([image.float() / 255 for image in images])


def picture(data: str, runs: dict, num_images: int, path: str, score_threshold: float) -> None:
    dataset = coco_split(data, "val", DetEvalTransform(64), train=False)
    samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
    images, targets = [s[0] for s in samples], [s[1] for s in samples]
    outputs = [detections(os.path.join(out, "checkpoint-last.pth"), images, len(dataset.class_names))
               for out in runs.values()]
    figure = detection_figure(images, targets, outputs, dataset.class_names,
                              ("image", "ground truth", *[RUNS[name] for name in runs]), score_threshold)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(figure).save(path)


def main(args):
    start = time.time()
    if not os.path.isfile(args.pretrained):
        if not args.pretrain:
            raise SystemExit(f"error: no pre-trained checkpoint at {args.pretrained}. Make it with "
                             f"`{shown(sys.executable)} demo.py` (about 10-20 minutes on 2 CPU cores), or run this "
                             f"check with --pretrain to run only the demo's pre-training stage, or give another DMJD "
                             f"checkpoint of {PRETRAIN_MODEL} with --pretrained")
        make_pretrained(args)
    try:  # the dataset's own fixed seed: --seed seeds the two runs, not the data
        data = prepare_fashion_mnist_det(args.data, [args.source] if args.source else None, args.num_train,
                                         args.num_val, verbose=True)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    runs, seconds = {}, {}
    for name in RUNS:
        out = os.path.join(args.output_dir, name)
        if os.path.isdir(out):  # a fresh run each time, not a resumed one
            for entry in os.listdir(out):
                os.remove(os.path.join(out, entry))
        seconds[name] = run(detect_command(args, data, out, args.pretrained if name == "pretrained" else None))
        runs[name] = out
    scores = {name: last_scores(out) for name, out in runs.items()}
    path = args.picture or os.path.join(args.output_dir, "predictions.png")
    picture(data, runs, args.num_images, path, args.score_threshold)
    keys = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")
    summary = {name: {**{k: s[f"test_{k}"] for k in keys}, "minutes": seconds[name] / 60}
               for name, s in scores.items()}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"iters": args.iters, "batch_size": args.batch_size, "pretrained": args.pretrained, **summary}, f,
                  indent=1)
    print("\n" + "=" * 78)
    print(f"Mask R-CNN on {CLASSIFIER}, {args.iters} iterations of {args.batch_size} images, {args.num_val} "
          f"validation canvases:")
    for name, label in RUNS.items():
        s = summary[name]
        print(f"  {label:<17} box AP {s['bbox_AP']:.2f} (AP50 {s['bbox_AP50']:.2f})  mask AP {s['segm_AP']:.2f} "
              f"(AP50 {s['segm_AP50']:.2f})  ({s['minutes']:.1f} min)")
    gain = summary["pretrained"]["bbox_AP"] - summary["random_init"]["bbox_AP"]
    print(f"  pre-training gives {gain:+.2f} box AP; picture: {path}; check time {(time.time() - start) / 60:.1f} min")
    print("=" * 78)
    return summary


if __name__ == "__main__":
    main(parse_args())
