"""A small detection / instance segmentation dataset made of Fashion-MNIST items, in COCO 2017's layout, for checks
on a CPU.

    python -m util.demo_det_data --root data/fashion_mnist_det                    # 2000 train / 500 val images
    python -m util.demo_det_data --root data/fashion_mnist_det_tiny --num_train 40 --num_val 20

writes ``root/annotations/instances_{train,val}2017.json`` and ``root/{train,val}2017/<index>.jpg``, the layout
util.coco.coco_split reads for COCO itself, so the same flags train on both. The images are util.demo_seg_data's
canvases (the same options and seed draw the same items at the same places): Fashion-MNIST items pasted on a black
canvas, training images from Fashion-MNIST's training split, validation images from its test split.

One instance per pasted item: category = the item's class (ids 1..10, Fashion-MNIST's names in label order), mask
= the item's pixels of intensity at least demo_seg_data.FOREGROUND_THRESHOLD that no later item covers (a later
item hides an earlier one where its own pixels are non-zero), box = the tight box of the mask (x, y, width, height
in whole pixels), area = the mask's pixel count. Masks are stored as compressed RLE, so they are exact; an item
that later items hide entirely is no instance. No annotation is a crowd.

Everything is drawn from a generator seeded with `seed`; as util.demo_seg_data, the tree is written next to `root`
and renamed into place with a marker file inside, and a finished preparation is reused when the options match.
"""
import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from util.demo_data import CLASS_NAMES, finish_preparation
from util.demo_seg_data import (FOREGROUND_THRESHOLD, JPEG_QUALITY, Placement, canvas_main, canvas_options,
                                paste_items, start_canvas_set)

__all__ = ["prepare_fashion_mnist_det", "instance_masks", "CATEGORIES"]

CATEGORIES = [{"id": label + 1, "name": name, "supercategory": "fashion"} for label, name in enumerate(CLASS_NAMES)]
# split -> demo_data's split name (the Fashion-MNIST file it reads)
SPLITS = {"train": "train", "val": "val"}


def instance_masks(placements: Sequence[Placement], canvas: int) -> List[Tuple[int, np.ndarray]]:
    """(label, uint8 [canvas, canvas] mask) of each placement that stays visible, in pasting order."""
    covered = np.zeros((canvas, canvas), bool)  # pixels that later items paint over
    instances = []
    for placement in reversed(placements):
        mask = np.zeros((canvas, canvas), bool)
        mask[placement.window] = placement.pixels >= FOREGROUND_THRESHOLD
        mask &= ~covered
        covered[placement.window] |= placement.pixels > 0
        if mask.any():
            instances.append((placement.label, mask.astype(np.uint8)))
    return instances[::-1]


def _annotation(mask: np.ndarray, label: int, image_id: int, annotation_id: int) -> dict:
    ys, xs = np.nonzero(mask)
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"id": annotation_id, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            "area": int(mask.sum()), "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode()}}


def _write_split(folder: str, split: str, items: np.ndarray, labels: np.ndarray, count: int,
                 rng: np.random.Generator, options: dict) -> int:
    """Writes the split's images and annotation file; returns the number of instances."""
    image_dir = os.path.join(folder, f"{split}2017")
    os.makedirs(image_dir)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    width = len(str(max(count - 1, 0)))
    images, annotations = [], []
    for i in range(count):
        canvas, placements = paste_items(items, labels, rng, options["canvas"], options["min_items"],
                                         options["max_items"], tuple(options["scale_range"]))
        file_name = f"{i:0{width}d}.jpg"
        Image.fromarray(canvas, "L").convert("RGB").save(os.path.join(image_dir, file_name), quality=JPEG_QUALITY)
        images.append({"id": i + 1, "file_name": file_name, "height": canvas.shape[0], "width": canvas.shape[1]})
        for label, mask in instance_masks(placements, options["canvas"]):
            annotations.append(_annotation(mask, label, i + 1, len(annotations) + 1))
    with open(os.path.join(folder, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"info": {"description": f"Fashion-MNIST items on a canvas ({split})"}, "images": images,
                   "annotations": annotations, "categories": CATEGORIES}, f)
    return len(annotations)


def prepare_fashion_mnist_det(root: str, sources: Optional[Sequence[str]] = None, num_train: int = 2000,
                              num_val: int = 500, canvas: int = 64, min_items: int = 2, max_items: int = 4,
                              scale_range: Tuple[float, float] = (0.75, 1.5), seed: int = 0,
                              download_dir: Optional[str] = "", verbose: bool = False) -> str:
    """Writes the dataset under `root` (once) and returns `root`; the arguments are util.demo_seg_data
    .prepare_fashion_mnist_seg's. The options are stored in ``root/.prepared.json``: calling again with the same
    options returns at once, with others it raises rather than mixing two datasets."""
    root = os.path.abspath(root)
    options = canvas_options("fashion-mnist-det", num_train, num_val, canvas, min_items, max_items, scale_range, seed)
    started = start_canvas_set(root, options, "the Fashion-MNIST detection set", SPLITS, sources, download_dir)
    if started is None:
        return root
    partial, source, splits = started
    instances = {}
    for split, items, labels, count, rng in splits:
        instances[split] = _write_split(partial, split, items, labels, count, rng, options)
        if verbose:
            print(f"{split}: {count} images, {instances[split]} instances", flush=True)
    return finish_preparation(partial, root, {**options, "instances": instances, "source": source})


def main(argv=None):
    canvas_main(argv, prepare_fashion_mnist_det, "Fashion-MNIST items on a canvas, as an instance segmentation "
                "dataset in COCO 2017's layout (annotations/, train2017/, val2017/)", "data/fashion_mnist_det")
    print(f", {len(CATEGORIES)} classes (main_detect.py reads them from annotations/instances_train2017.json)")


if __name__ == "__main__":
    main()
