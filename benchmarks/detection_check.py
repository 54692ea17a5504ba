"""A small real check of detection and instance-segmentation transfer, on a CPU: Mask R-CNN fine-tuned with
main_detect.py on Fashion-MNIST items pasted on 64 x 64 canvases (util/demo_det_data.py, in COCO's format: one
instance per pasted item, its box and mask), once from the demo's DMJD-pre-trained encoder and once from a randomly
initialised one, with the same flags and seed otherwise.

    python demo.py                                   # once: output_dir/demo/pretrain/checkpoint-last.pth
    python -m benchmarks.detection_check             # both fine-tunings, their box and mask AP, and a picture

Without the demo's checkpoint the check says how to make it; with `--pretrain` it makes it itself (the demo's
pre-training stage). Both fine-tunings are main_detect.py runs, started as the printed commands; each run's last
checkpoint is then evaluated again in bf16 (`--eval --amp bf16`), which must agree with its fp32 evaluation. The
picture sets image, ground truth and both models' detections (masks, boxes, class names, scores of --score_threshold
or more) side by side for the first validation images. `--doc DETECT.md` writes the figures into its
detection_check block.
"""
import os
import sys
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmjd_encoders  # noqa: E402,F401  (registers the encoders)
from benchmarks.doc_block import rewrite_block  # noqa: E402
from benchmarks.transfer_check import (RUNS, check_parser, ensure_pretrained, fine_tune_both,  # noqa: E402
                                       last_scores, prepared_data, recipe_of, report, run, saved_config,
                                       write_summary)
from engine_detect import DetectConfig, build_detector  # noqa: E402
from main_detect import get_args_parser as detection_parser  # noqa: E402
from dmjd_encoders.checkpoint import load_checkpoint, load_state_dict_strict  # noqa: E402
from util.coco import coco_split  # noqa: E402
from util.demo_commands import CLASSIFIER, DetectionCheck, shown  # noqa: E402
from util.det_transforms import DetEvalTransform, detections_in  # noqa: E402
from util.visualization import detection_figure  # noqa: E402

RECIPE = DetectionCheck()  # the check's flags and data (main_transfer.py's check suite runs the same)
PICTURE_IMAGES, PICTURE_THRESHOLD = 4, 0.2  # the picture's validation images and its detections' least score


def parse_args(argv=None):
    p = check_parser("detection transfer check on Fashion-MNIST items", RECIPE,
                     os.path.join("output_dir", "detection_check"))
    p.add_argument("--blr", default=RECIPE.blr, type=float,
                   help="base lr (lr = blr x batch / 256): ten times the COCO recipe's, for a short run")
    p.add_argument("--scale_range", default=list(RECIPE.scale_range), type=float, nargs=2,
                   help="large-scale jitter's range (the recipe's 0.1 makes 64 px canvases' items a few pixels)")
    p.add_argument("--fpn_channels", default=RECIPE.fpn_channels, type=int, help="FPN and heads' width (the "
                                                                                  "recipe's 256)")
    p.add_argument("--rois_per_image", default=RECIPE.rois_per_image, type=int,
                   help="proposals sampled per image (the recipe's 512)")
    p.add_argument("--num_images", default=PICTURE_IMAGES, type=int, help="validation images in the picture")
    p.add_argument("--score_threshold", default=PICTURE_THRESHOLD, type=float,
                   help="the picture's detections: scores from this on")
    p.add_argument("--doc", default=None, help="a markdown file whose detection_check block gets the figures")
    return p.parse_args(argv)


@torch.no_grad()
def detections(checkpoint: str, images, num_classes: int):
    """A run's detections in `images` (uint8 [3, H, W] each; masks pasted at their size), from a Mask R-CNN built
    from its checkpoint's saved flags."""
    ckpt = load_checkpoint(checkpoint)
    cfg = saved_config(ckpt, detection_parser(), DetectConfig)
    model = build_detector(cfg, num_classes)
    load_state_dict_strict(model, ckpt["model"])
    outputs = model.eval()([image.float() / 255 for image in images])
    return [detections_in(out, image.shape[-2:], image.shape[-2:]) for out, image in zip(outputs, images)]


def picture(data: str, runs: dict, num_images: int, path: str, score_threshold: float) -> None:
    """Image, ground truth and the detections of each run ({title: run folder}) for the first validation images."""
    dataset = coco_split(data, "val", DetEvalTransform(64), train=False)
    samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
    images, targets = [s[0] for s in samples], [s[1] for s in samples]
    outputs = [detections(os.path.join(out, "checkpoint-last.pth"), images, len(dataset.class_names))
               for out in runs.values()]
    figure = detection_figure(images, targets, outputs, dataset.class_names, ("image", "ground truth", *runs),
                              score_threshold)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(figure).save(path)


def evaluate_in_bf16(recipe: DetectionCheck, data: str, run_dir: str) -> dict:
    """The run's last checkpoint evaluated again, under bf16 autocast (CUDA's default): its last log.txt record."""
    out = os.path.join(run_dir, "eval_bf16")
    run(recipe.command(data, out) + ["--eval", "--amp", "bf16", "--resume",
                                     shown(os.path.join(run_dir, "checkpoint-last.pth"))])
    return last_scores(out)


def doc_block(args, summary: dict, gain: str, start: float) -> str:
    """The figures of the check as DETECT.md shows them."""
    from benchmarks.doc_block import provenance
    lines = ["| encoder | box AP | AP50 | AP75 | mask AP | AP50 | AP75 | box / mask AP in bf16 | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, label in RUNS.items():
        s = summary[name]
        lines.append(f"| {label} | {s['bbox_AP']:.2f} | {s['bbox_AP50']:.2f} | {s['bbox_AP75']:.2f} | "
                     f"{s['segm_AP']:.2f} | {s['segm_AP50']:.2f} | {s['segm_AP75']:.2f} | "
                     f"{s['bf16_bbox_AP']:.2f} / {s['bf16_segm_AP']:.2f} | {s['minutes']:.1f} |")
    worst = max(abs(summary[n][f"bf16_{k}"] - summary[n][k]) for n in RUNS for k in ("bbox_AP", "segm_AP"))
    return (f"{args.iters} iterations of {args.batch_size} images, {args.num_val} validation canvases "
            f"({provenance(torch.device('cpu' if args.device == 'auto' else args.device))}; the whole check "
            f"{(time.time() - start) / 60:.0f} minutes):\n\n" + "\n".join(lines) +
            f"\n\nPre-training gives {gain}. Evaluated in bf16, the same checkpoints score within {worst:.2f} AP "
            f"of their fp32 evaluation (boxes decoded and masks pasted in fp32 in both; only the features' rounding "
            f"differs).")


def main(args):
    start = time.time()
    ensure_pretrained(args)
    recipe = recipe_of(args, RECIPE)
    data = prepared_data(recipe, args)
    runs = fine_tune_both(args, lambda out, finetune: recipe.command(data, out, finetune))
    path = args.picture or os.path.join(args.output_dir, "predictions.png")
    picture(data, {RUNS[name]: r["dir"] for name, r in runs.items()}, args.num_images, path, args.score_threshold)
    keys = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")
    summary = {}
    for name, r in runs.items():
        bf16 = evaluate_in_bf16(recipe, data, r["dir"])
        summary[name] = {**{k: r["scores"][f"test_{k}"] for k in keys}, "minutes": r["seconds"] / 60,
                         **{f"bf16_{k}": bf16[f"test_{k}"] for k in keys}}
    write_summary(args, summary)
    lines = {name: f"box AP {s['bbox_AP']:.2f} (AP50 {s['bbox_AP50']:.2f})  mask AP {s['segm_AP']:.2f} "
                   f"(AP50 {s['segm_AP50']:.2f})" for name, s in summary.items()}
    gain = summary["pretrained"]["bbox_AP"] - summary["random_init"]["bbox_AP"]
    mask_gain = summary["pretrained"]["segm_AP"] - summary["random_init"]["segm_AP"]
    gains = f"{gain:+.2f} box AP and {mask_gain:+.2f} mask AP"
    report(f"Mask R-CNN on {CLASSIFIER}, {args.iters} iterations of {args.batch_size} images, {args.num_val} "
           f"validation canvases:", lines, summary, gains, path, start)
    if args.doc:
        rewrite_block(args.doc, "detection_check", doc_block(args, summary, gains, start))
    return summary


if __name__ == "__main__":
    main(parse_args())
