"""A small real check of segmentation transfer, on a CPU: UperNet fine-tuned with main_segment.py on Fashion-MNIST
items pasted on 64 x 64 canvases (util/demo_seg_data.py, in ADE20K's layout), once from the demo's DMJD-pre-trained
encoder and once from a randomly initialised one, with the same flags and seed otherwise.

    python demo.py                                   # once: output_dir/demo/pretrain/checkpoint-last.pth
    python -m benchmarks.segmentation_check          # both fine-tunings, their mIoU and a picture

Without the demo's checkpoint the check says how to make it; with `--pretrain` it makes it itself, running the
demo's pre-training stage (the same main_pretrain.py command as demo.py). Both fine-tunings are main_segment.py runs,
started as the printed commands, so what is checked is the real script. The picture sets image, ground truth and
both models' predictions side by side for the first validation images.

    python -m benchmarks.segmentation_check --seeds 0 1 2 --picture docs/segmentation_check.png --doc SEGMENT.md

runs the check once per seed (each seed's runs in <output_dir>/seed<N>) and writes the figures of every seed, their
mean and range, and the first seed's per-class IoU into SEGMENT.md's segmentation_check block, with the machine and
torch they were made with.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmjd_encoders  # noqa: E402,F401  (registers the encoders)
from benchmarks.doc_block import block_names, provenance, rewrite_block  # noqa: E402
from benchmarks.transfer_check import (RUNS, check_parser, ensure_pretrained, fine_tune_both,  # noqa: E402
                                       prepared_data, recipe_of, report, saved_config, write_summary)
from engine_segment import SegmentConfig, build_segmenter  # noqa: E402
from dmjd_encoders.checkpoint import load_checkpoint, load_state_dict_strict  # noqa: E402
from main_segment import get_args_parser as segmentation_parser  # noqa: E402
from util.demo_commands import CLASSIFIER, SegmentationCheck  # noqa: E402
from util.demo_seg_data import SEG_CLASS_NAMES  # noqa: E402
from util.misc import resolve_device  # noqa: E402
from util.seg_datasets import SegEvalTransform, SegmentationFolder  # noqa: E402
from util.visualization import segmentation_figure  # noqa: E402

RECIPE = SegmentationCheck()  # the check's flags and data (main_transfer.py's check suite runs the same)
PICTURE_IMAGES = 6  # validation images in the picture (main_transfer.py draws its check suite's the same)


def parse_args(argv=None):
    p = check_parser("segmentation transfer check on Fashion-MNIST items", RECIPE,
                     os.path.join("output_dir", "segmentation_check"))
    p.add_argument("--warmup_iters", default=RECIPE.warmup_iters, type=int, help="linear lr warmup")
    p.add_argument("--blr", default=RECIPE.blr, type=float,
                   help="base lr (lr = blr x batch / 256): ten times the ADE20K recipe's, for a short run")
    p.add_argument("--decoder_channels", default=RECIPE.decoder_channels, type=int,
                   help="UPerHead width (the recipe's 768 is for 150 classes at 512 px)")
    p.add_argument("--aux_channels", default=RECIPE.aux_channels, type=int, help="auxiliary head width")
    p.add_argument("--num_images", default=PICTURE_IMAGES, type=int, help="validation images in the picture")
    p.add_argument("--seeds", default=None, type=int, nargs="+",
                   help="run the check once per seed, each seed's runs in <output_dir>/seed<N> (none: --seed alone, "
                        "in <output_dir>); the picture is the first seed's")
    p.add_argument("--doc", default=None, help="a markdown file whose segmentation_check block gets the figures of "
                                               "every seed (SEGMENT.md)")
    args = p.parse_args(argv)
    if args.doc and "segmentation_check" not in (block_names(args.doc) if os.path.isfile(args.doc) else []):
        p.error(f"--doc {args.doc}: no segmentation_check block in it (the lines <!-- segmentation_check --> and "
                f"<!-- /segmentation_check -->)")  # said now, not after the runs
    return args


def predictions(checkpoint: str, dataset: SegmentationFolder, indices) -> np.ndarray:
    """A run's predicted label maps [N, H, W] for validation images `indices`, from its checkpoint, evaluated as the
    script evaluates (its saved flags: window, stride, scales)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = saved_config(ckpt, segmentation_parser(), SegmentConfig)
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
    """Image, ground truth and the predictions of each run ({title: run folder}) for the first validation images."""
    dataset = SegmentationFolder(data, "validation", len(SEG_CLASS_NAMES), SegEvalTransform((64, 64)))
    indices = list(range(min(num_images, len(dataset))))
    images = np.stack([np.asarray(dataset.load_pair(i)[0]) for i in indices])
    labels = np.stack([dataset.load_pair(i)[1] for i in indices])
    maps = [predictions(os.path.join(out, "checkpoint-last.pth"), dataset, indices) for out in runs.values()]
    figure = segmentation_figure(images, labels, maps[0], SEG_CLASS_NAMES, more_predictions=maps[1:],
                                 titles=("image", "ground truth", *runs))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(figure).save(path)


def check_seed(args, data: str, picture_path: str) -> dict:
    """Both fine-tunings at `args.seed` into `args.output_dir`, their picture, summary and report; the summary."""
    start = time.time()
    torch.manual_seed(args.seed)
    recipe = recipe_of(args, RECIPE)
    runs = fine_tune_both(args, lambda out, finetune: recipe.command(data, out, finetune))
    if picture_path:
        picture(data, {RUNS[name]: r["dir"] for name, r in runs.items()}, args.num_images, picture_path)
    summary = {name: {"mIoU": r["scores"]["test_mIoU"], "mAcc": r["scores"]["test_mAcc"],
                      "aAcc": r["scores"]["test_aAcc"], "IoU": r["scores"]["test_IoU"], "minutes": r["seconds"] / 60}
               for name, r in runs.items()}
    write_summary(args, summary)
    lines = {name: f"mIoU {s['mIoU']:.2f}  mAcc {s['mAcc']:.2f}  aAcc {s['aAcc']:.2f}" for name, s in summary.items()}
    gain = summary["pretrained"]["mIoU"] - summary["random_init"]["mIoU"]
    report(f"UperNet on {CLASSIFIER}, {args.iters} iterations of {args.batch_size} images, {args.num_val} validation "
           f"canvases ({len(SEG_CLASS_NAMES)} classes), seed {args.seed}:", lines, summary, f"{gain:+.2f} mIoU",
           picture_path or "none", start)
    return summary


def doc_block(args, summaries: dict, minutes: float) -> str:
    """The figures of every seed as SEGMENT.md shows them: mIoU per seed with mean and range, mAcc, aAcc and minutes
    per seed, and the first seed's per-class IoU."""
    seeds = list(summaries)

    def row(label, values, digits=2, sign=""):
        spread = f"{min(values):{sign}.1f} - {max(values):{sign}.1f}"
        return (f"| {label} | " + " | ".join(f"{v:{sign}.{digits}f}" for v in values) +
                f" | **{sum(values) / len(values):{sign}.1f}** | {spread} |")

    def pair(key, seed, digits=2):
        return f"{summaries[seed]['pretrained'][key]:.{digits}f} / {summaries[seed]['random_init'][key]:.{digits}f}"

    mious = {name: [summaries[seed][name]["mIoU"] for seed in seeds] for name in RUNS}
    gains = [a - b for a, b in zip(mious["pretrained"], mious["random_init"])]
    head = " | ".join(f"seed {seed}" for seed in seeds)
    lines = [f"| | {head} | mean | range |", "|---" * (len(seeds) + 3) + "|",
             row("mIoU, DMJD pre-trained (the demo's checkpoint)", mious["pretrained"]),
             row("mIoU, randomly initialised", mious["random_init"]),
             row("pre-trained minus random", gains, digits=1, sign="+")]
    for key in ("mAcc", "aAcc"):
        lines.append(f"| {key}, pre-trained / random | " + " | ".join(pair(key, seed) for seed in seeds) + " | | |")
    lines.append("| minutes per run, pre-trained / random | " +
                 " | ".join(pair("minutes", seed, 1) for seed in seeds) + " | | |")
    first = summaries[seeds[0]]
    per_class = [f"| IoU at seed {seeds[0]} | " + " | ".join(RUNS.values()) + " |", "|---|---|---|"]
    for name in SEG_CLASS_NAMES:
        cells = [first[run]["IoU"].get(name) for run in RUNS]
        per_class.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    wins = sum(g > 0 for g in gains)
    return (f"{args.iters} iterations of {args.batch_size} images, {args.num_val} validation canvases, seeds "
            f"{', '.join(map(str, seeds))} ({provenance(resolve_device(args.device))}; the whole check "
            f"{minutes:.0f} minutes):\n\n" +
            "\n".join(lines) + f"\n\nThe pre-trained encoder wins at {wins} of {len(seeds)} seeds, by "
            f"{sum(gains) / len(gains):+.1f} mIoU on average. Per class:\n\n" + "\n".join(per_class))


def main(args):
    """Returns the summary of each seed's runs ({seed: summary})."""
    start = time.time()
    ensure_pretrained(args)
    data = prepared_data(recipe_of(args, RECIPE), args)
    seeds = args.seeds or [args.seed]
    summaries = {}
    for index, seed in enumerate(seeds):
        output_dir = args.output_dir if args.seeds is None else os.path.join(args.output_dir, f"seed{seed}")
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed, "output_dir": output_dir})
        path = os.path.join(output_dir, "predictions.png") if index or not args.picture else args.picture
        summaries[seed] = check_seed(seed_args, data, path)
    if args.doc:
        rewrite_block(args.doc, "segmentation_check", doc_block(args, summaries, (time.time() - start) / 60))
    return summaries


if __name__ == "__main__":
    main(parse_args())
