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
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmjd_encoders  # noqa: E402,F401  (registers the encoders)
from benchmarks.transfer_check import (RUNS, check_parser, ensure_pretrained, fine_tune_both,  # noqa: E402
                                       prepared_data, report, saved_config, write_summary)
from engine_segment import SegmentConfig, build_segmenter  # noqa: E402
from dmjd_encoders.checkpoint import load_checkpoint, load_state_dict_strict  # noqa: E402
from main_segment import get_args_parser as segmentation_parser  # noqa: E402
from util.demo_commands import CLASSIFIER, shown  # noqa: E402
from util.demo_seg_data import SEG_CLASS_NAMES, prepare_fashion_mnist_seg  # noqa: E402
from util.seg_datasets import SegEvalTransform, SegmentationFolder  # noqa: E402
from util.visualization import segmentation_figure  # noqa: E402

def parse_args(argv=None):
    p = check_parser("segmentation transfer check on Fashion-MNIST items", os.path.join("data", "fashion_mnist_seg"),
                     os.path.join("output_dir", "segmentation_check"))
    p.add_argument("--warmup_iters", default=40, type=int, help="linear lr warmup")
    p.add_argument("--blr", default=1.6e-2, type=float,
                   help="base lr (lr = blr x batch / 256): ten times the ADE20K recipe's, for a short run")
    p.add_argument("--decoder_channels", default=64, type=int, help="UPerHead width (the recipe's 768 is for 150 "
                                                                    "classes at 512 px)")
    p.add_argument("--aux_channels", default=32, type=int, help="auxiliary head width")
    p.add_argument("--num_images", default=6, type=int, help="validation images in the picture")
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
    ensure_pretrained(args)
    data = prepared_data(prepare_fashion_mnist_seg, args)
    runs = fine_tune_both(args, lambda out, finetune: segment_command(args, data, out, finetune))
    path = args.picture or os.path.join(args.output_dir, "predictions.png")
    picture(data, {name: r["dir"] for name, r in runs.items()}, args.num_images, path)
    summary = {name: {"mIoU": r["scores"]["test_mIoU"], "mAcc": r["scores"]["test_mAcc"],
                      "aAcc": r["scores"]["test_aAcc"], "IoU": r["scores"]["test_IoU"], "minutes": r["seconds"] / 60}
               for name, r in runs.items()}
    write_summary(args, summary)
    lines = {name: f"mIoU {s['mIoU']:.2f}  mAcc {s['mAcc']:.2f}  aAcc {s['aAcc']:.2f}" for name, s in summary.items()}
    gain = summary["pretrained"]["mIoU"] - summary["random_init"]["mIoU"]
    report(f"UperNet on {CLASSIFIER}, {args.iters} iterations of {args.batch_size} images, {args.num_val} validation "
           f"canvases ({len(SEG_CLASS_NAMES)} classes):", lines, summary, f"{gain:+.2f} mIoU", path, start)
    return summary


if __name__ == "__main__":
    main(parse_args())
