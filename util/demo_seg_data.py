"""A small semantic segmentation dataset made of Fashion-MNIST items, in ADE20K's layout, for checks on a CPU.

    python -m util.demo_seg_data --root data/fashion_mnist_seg                    # 2000 train / 500 val images
    python -m util.demo_seg_data --root data/fashion_mnist_seg_tiny --num_train 40 --num_val 20

writes ``root/images/{training,validation}/<index>.jpg``, ``root/annotations/{training,validation}/<index>.png``
and ``root/classes.txt``. Each image is a black canvas (64 x 64 by default) with a few Fashion-MNIST items pasted at
random positions and sizes, in grey as Fashion-MNIST is; training images take their items from Fashion-MNIST's
training split, validation images from its test split. Items are pasted one after the other: a later item hides
an earlier one where its own pixels are non-zero (its black surround is transparent), so every pixel belongs to the
topmost item that has ink there, or to the background.

Annotations follow ADE20K's convention, so that the same flags train on both (`reduce_zero_label`):
0 = ignore, 1 = background, 2..11 = the ten Fashion-MNIST classes; after reduction: background 0, items 1..10,
11 classes in all. A pixel is labelled with its item's class where the item's intensity there is at least
FOREGROUND_THRESHOLD (24 of 255), and ignored where it is fainter but not zero: the anti-aliased rims and faint
texture (about 15% of the item pixels at the default sizes), whose membership is ambiguous.

Everything is drawn from a generator seeded with `seed`: the same options give the same files, byte for byte, on
the same Pillow version. As util.demo_data, the tree is written next to `root` and renamed into place with a marker
file inside, and a finished preparation is reused when the options match.
"""
import argparse
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from util.demo_data import (CLASS_NAMES, DEBIAN_DIR, add_source_flags, finish_preparation, finished_preparation,
                            load_split, locate_idx_files, partial_folder)

__all__ = ["prepare_fashion_mnist_seg", "make_canvas", "paste_items", "Placement", "canvas_options", "SEG_CLASS_NAMES",
           "FOREGROUND_THRESHOLD"]

FOREGROUND_THRESHOLD = 24
IGNORE_LABEL, BACKGROUND_LABEL = 0, 1  # annotation values; items are 2 + Fashion-MNIST label
SEG_CLASS_NAMES = ("background",) + CLASS_NAMES  # class order after reduce_zero_label
JPEG_QUALITY = 95
# split folder -> demo_data's split name (the Fashion-MNIST file it reads)
SPLITS = {"training": "train", "validation": "val"}


class Placement(NamedTuple):
    """An item pasted on a canvas: its Fashion-MNIST label, top-left corner and resized pixels (uint8 [side, side])."""
    label: int
    y: int
    x: int
    pixels: np.ndarray

    @property
    def window(self) -> Tuple[slice, slice]:
        side = self.pixels.shape[0]
        return slice(self.y, self.y + side), slice(self.x, self.x + side)


def paste_items(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, canvas: int = 64,
                min_items: int = 2, max_items: int = 4, scale_range: Tuple[float, float] = (0.75, 1.5)):
    """A grey canvas (uint8 [canvas, canvas]) with items from a pool (uint8 [N, h, w], labels [N]) pasted one after
    the other, and their Placements in pasting order. An item's black surround is transparent."""
    image = np.zeros((canvas, canvas), np.uint8)
    placements = []
    for _ in range(rng.integers(min_items, max_items + 1)):
        k = rng.integers(len(items))
        side = int(round(items.shape[1] * rng.uniform(*scale_range)))
        side = max(1, min(side, canvas))
        item = np.asarray(Image.fromarray(items[k]).resize((side, side), Image.BILINEAR))
        y, x = rng.integers(0, canvas - side + 1, size=2)
        placement = Placement(int(labels[k]), int(y), int(x), item)
        image[placement.window] = np.where(item > 0, item, image[placement.window])
        placements.append(placement)
    return image, placements


def make_canvas(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, canvas: int = 64,
                min_items: int = 2, max_items: int = 4, scale_range: Tuple[float, float] = (0.75, 1.5)):
    """One image and its annotation from a pool of items (uint8 [N, h, w], labels [N]): uint8 [canvas, canvas]
    grey image, uint8 [canvas, canvas] annotation (0 ignore, 1 background, 2 + label)."""
    image, placements = paste_items(items, labels, rng, canvas, min_items, max_items, scale_range)
    annotation = np.full((canvas, canvas), BACKGROUND_LABEL, np.uint8)
    for placement in placements:
        item = placement.pixels
        item_label = np.where(item >= FOREGROUND_THRESHOLD, 2 + placement.label, IGNORE_LABEL).astype(np.uint8)
        annotation[placement.window] = np.where(item > 0, item_label, annotation[placement.window])
    return image, annotation


def _write_split(folder: str, items: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator,
                 options: dict) -> None:
    image_dir = os.path.join(folder, "images", options["split"])
    label_dir = os.path.join(folder, "annotations", options["split"])
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    width = len(str(max(count - 1, 0)))
    for i in range(count):
        image, annotation = make_canvas(items, labels, rng, options["canvas"], options["min_items"],
                                        options["max_items"], tuple(options["scale_range"]))
        Image.fromarray(image, "L").convert("RGB").save(os.path.join(image_dir, f"{i:0{width}d}.jpg"),
                                                         quality=JPEG_QUALITY)
        Image.fromarray(annotation, "L").save(os.path.join(label_dir, f"{i:0{width}d}.png"))


def canvas_options(dataset: str, num_train: int, num_val: int, canvas: int, min_items: int, max_items: int,
                   scale_range: Tuple[float, float], seed: int) -> dict:
    """The options of a canvas dataset, checked, as its marker file records them."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("canvas", canvas),
                        ("min_items", min_items), ("max_items", max_items)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if max_items < min_items:
        raise ValueError(f"max_items ({max_items}) is below min_items ({min_items})")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    return {"dataset": dataset, "num_train": num_train, "num_val": num_val, "canvas": canvas,
            "min_items": min_items, "max_items": max_items, "scale_range": [float(low), float(high)],
            "seed": seed, "foreground_threshold": FOREGROUND_THRESHOLD}


def start_canvas_set(root: str, options: dict, what: str, splits: dict, sources: Optional[Sequence[str]],
                     download_dir: Optional[str]):
    """The start of writing a canvas set (`options` from canvas_options) to `root`: None when `root` holds it already
    with these options (others raise); else (the partial folder to write, the Fashion-MNIST source folder, and for each
    of `splits` {name: Fashion-MNIST split}: (name, items, labels, count, generator)). One child generator per split:
    the validation images do not depend on how many training images there are, and one seed gives the segmentation
    and the detection sets the same canvases."""
    if finished_preparation(root, options, what):
        return None
    if download_dir == "":
        download_dir = root + "_download"
    files = locate_idx_files([DEBIAN_DIR] if sources is None else list(sources), download_dir)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(options["seed"]).spawn(len(splits))]
    counts = (options["num_train"], options["num_val"])
    return partial_folder(root), os.path.dirname(files["train-images-idx3-ubyte"]), [
        (name, *load_split(files, source_split), count, rng)
        for (name, source_split), count, rng in zip(splits.items(), counts, rngs)]


def prepare_fashion_mnist_seg(root: str, sources: Optional[Sequence[str]] = None, num_train: int = 2000,
                              num_val: int = 500, canvas: int = 64, min_items: int = 2, max_items: int = 4,
                              scale_range: Tuple[float, float] = (0.75, 1.5), seed: int = 0,
                              download_dir: Optional[str] = "", verbose: bool = False) -> str:
    """Writes the dataset under `root` (once) and returns `root`.

    Args:
        root: the folder to create; it must not exist, or hold a dataset this function finished earlier.
        sources / download_dir: where the Fashion-MNIST idx files are found or downloaded, as in
            util.demo_data.prepare_fashion_mnist (default: the Debian package's folder, then ``<root>_download``).
        num_train / num_val: images per split.
        canvas: image side in pixels; min_items / max_items: items per image (uniform);
        scale_range: item side as a multiple of Fashion-MNIST's 28 pixels (uniform; at most the canvas).
        seed: seeds the generator that draws every choice.

    The options are stored in ``root/.prepared.json``: calling again with the same options returns at once, with
    others it raises rather than mixing two datasets.
    """
    root = os.path.abspath(root)
    options = canvas_options("fashion-mnist-seg", num_train, num_val, canvas, min_items, max_items, scale_range, seed)

    started = start_canvas_set(root, options, "the Fashion-MNIST segmentation set", SPLITS, sources, download_dir)
    if started is None:
        return root
    partial, source, splits = started
    for split, items, labels, count, rng in splits:
        _write_split(partial, items, labels, count, rng, {**options, "split": split})
        if verbose:
            print(f"{split}: {count} images", flush=True)
    with open(os.path.join(partial, "classes.txt"), "w") as f:
        f.write("\n".join(SEG_CLASS_NAMES) + "\n")
    return finish_preparation(partial, root, {**options, "source": source})


def canvas_main(argv, prepare, description: str, root: str) -> str:
    """A command line for a canvas dataset: the canvases' flags and the Fashion-MNIST source's, then `prepare` (the
    options in prepare_fashion_mnist_seg's order); a bad source or folder stops it naming the problem. Returns the
    dataset's folder."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default=root, help="folder to create")
    p.add_argument("--num_train", type=int, default=2000, help="training images")
    p.add_argument("--num_val", type=int, default=500, help="validation images")
    p.add_argument("--canvas", type=int, default=64, help="image side in pixels")
    p.add_argument("--min_items", type=int, default=2, help="fewest items per image")
    p.add_argument("--max_items", type=int, default=4, help="most items per image")
    p.add_argument("--scale_range", type=float, nargs=2, default=(0.75, 1.5), metavar=("LOW", "HIGH"),
                   help="item side as a multiple of 28 pixels")
    p.add_argument("--seed", type=int, default=0, help="seeds the items, their places and sizes")
    add_source_flags(p)
    args = p.parse_args(argv)
    try:
        folder = prepare(args.root, args.source, args.num_train, args.num_val, args.canvas, args.min_items,
                         args.max_items, tuple(args.scale_range), args.seed,
                         None if args.no_download else args.download_dir, verbose=True)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{folder}: {args.num_train} training, {args.num_val} validation images", end="")
    return folder


def main(argv=None):
    canvas_main(argv, prepare_fashion_mnist_seg, "Fashion-MNIST items on a canvas, as a segmentation dataset in "
                "ADE20K's layout (images/ and annotations/, training and validation)", "data/fashion_mnist_seg")
    print(f", {len(SEG_CLASS_NAMES)} classes (--nb_classes {len(SEG_CLASS_NAMES)} with reduce_zero_label)")


if __name__ == "__main__":
    main()
