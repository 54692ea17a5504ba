"""Fashion-MNIST as an ImageFolder tree, so that a demo run reads its data exactly as an ImageNet run does.

    python -m util.demo_data --root data/fashion_mnist                      # 60k train / 10k val images
    python -m util.demo_data --root data/fashion_mnist_small --max_train 2000 --max_val 500

writes ``root/train/<class>/<index>.png`` and ``root/val/<class>/<index>.png`` (28 x 28 grayscale PNGs; the image
loader converts them to RGB), with the ten classes named ``t-shirt_top``, ``trouser``, ... ``ankle_boot``.
ImageFolder numbers classes in alphabetical order, not in Fashion-MNIST's label order; both splits always hold all
ten classes, so the numbering agrees between them.

The idx files are read from the first folder that has them: by default the Debian/Ubuntu package
(``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist), then a download
folder, where torchvision fetches them when the network allows. The tree is built next to ``root`` and renamed
into place with a marker file inside, so an interrupted preparation is redone rather than reused, and a finished
one is reused as long as it was prepared with the same options.
"""
import argparse
import gzip
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["CLASS_NAMES", "DEBIAN_DIR", "prepare_fashion_mnist", "read_idx", "find_idx_files", "locate_idx_files",
           "load_split"]

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# Fashion-MNIST's labels 0-9, as folder names.
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle_boot")
SPLITS = {  # ImageFolder split -> idx file stem
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MARKER = ".prepared.json"

# idx type codes (the third magic byte) -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class CorruptIdxFile(ValueError):
    pass


def read_idx(path: str) -> np.ndarray:
    """Reads an idx file (LeCun's MNIST format), gzipped or not (told apart by content, not by name).

    Raises CorruptIdxFile, naming the file, on a bad magic number, a truncated or overlong body or a broken gzip.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise CorruptIdxFile(f"{path}: cannot be read as a (gzipped) idx file: {err}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise CorruptIdxFile(f"{path}: not an idx file (magic number {data[:4].hex() or 'missing'}; expected "
                             f"0000 followed by a type code and the number of dimensions)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptIdxFile(f"{path}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise CorruptIdxFile(f"{path}: {len(data)} bytes, but its header {shape} of {dtype} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_files(folder: str) -> Optional[Dict[str, str]]:
    """Paths of the four idx files in `folder` (each plain or .gz), keyed by stem; None unless all four are there."""
    found = {}
    for stem in (s for pair in SPLITS.values() for s in pair):
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                found[stem] = os.path.join(folder, name)
                break
        else:
            return None
    return found


def _download(download_dir: str) -> str:
    """Fetches the idx files with torchvision; returns the folder that holds them."""
    from torchvision.datasets import FashionMNIST
    for train in (True, False):
        FashionMNIST(download_dir, train=train, download=True)
    return os.path.join(download_dir, "FashionMNIST", "raw")


def locate_idx_files(sources: Sequence[str], download_dir: Optional[str]) -> Dict[str, str]:
    """The four idx files (stem -> path) from the first of `sources` that holds them all, else from `download_dir`
    (downloaded there if needed; None turns the download off). Raises FileNotFoundError saying how to get them."""
    for folder in sources:
        files = find_idx_files(folder)
        if files is not None:
            return files
    tried = ", ".join(sources) or "no folder"
    if download_dir is None:
        raise FileNotFoundError(f"Fashion-MNIST idx files not found in {tried}, and downloading is off. "
                                f"Install them with `apt-get install dataset-fashion-mnist` or allow the download.")
    raw = os.path.join(download_dir, "FashionMNIST", "raw")
    files = find_idx_files(raw)
    if files is not None:
        return files
    try:
        raw = _download(download_dir)
    except Exception as err:  # offline, proxy, checksum: all mean the same thing to the user
        raise FileNotFoundError(f"Fashion-MNIST idx files not found in {tried}, and downloading them into "
                                f"{download_dir} failed ({type(err).__name__}: {err}). Install them with "
                                f"`apt-get install dataset-fashion-mnist` or allow the download.") from None
    files = find_idx_files(raw)
    if files is None:
        raise FileNotFoundError(f"the download into {download_dir} did not leave the idx files in {raw}")
    return files


def load_split(files: Dict[str, str], split: str):
    """(uint8 images [N, H, W], uint8 labels [N]) of split "train" or "val" from `locate_idx_files`' files, checked:
    a corrupt file raises CorruptIdxFile naming it."""
    image_path, label_path = (files[stem] for stem in SPLITS[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise CorruptIdxFile(f"{image_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CorruptIdxFile(f"{label_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise CorruptIdxFile(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise CorruptIdxFile(f"{label_path}: label {labels.max()} outside 0-{len(CLASS_NAMES) - 1}")
    missing = sorted(set(range(len(CLASS_NAMES))) - set(np.unique(labels).tolist()))
    if missing:  # ImageFolder would number the classes of the two splits differently
        raise CorruptIdxFile(f"{label_path}: no image of class(es) {', '.join(CLASS_NAMES[m] for m in missing)}")
    return images, labels


def _per_class_subset(labels: np.ndarray, max_images: Optional[int], split: str) -> List[np.ndarray]:
    """Indices kept per class: all, or the first of each class, spread evenly (the remainder to the first classes)."""
    by_class = [np.flatnonzero(labels == c) for c in range(len(CLASS_NAMES))]
    if max_images is None:
        return by_class
    if max_images < len(CLASS_NAMES):
        raise ValueError(f"max_{split}={max_images} is fewer than the {len(CLASS_NAMES)} classes; every class needs "
                         f"an image in every split")
    quota, extra = divmod(max_images, len(CLASS_NAMES))
    return [ids[:quota + (c < extra)] for c, ids in enumerate(by_class)]


def _write_split(folder: str, images: np.ndarray, keep: List[np.ndarray], size: Optional[int]) -> int:
    width = len(str(max(len(images) - 1, 0)))
    count = 0
    for c, ids in enumerate(keep):
        class_dir = os.path.join(folder, CLASS_NAMES[c])
        os.makedirs(class_dir)
        for i in ids:
            img = Image.fromarray(images[i])
            if size is not None:
                img = img.resize((size, size), Image.BICUBIC)
            img.save(os.path.join(class_dir, f"{i:0{width}d}.png"))
            count += 1
    return count


def finished_preparation(root: str, options: dict, what: str) -> bool:
    """True when `root` holds a preparation finished with `options` (its marker file says so). Raises when it was
    finished with other options, or when `root` is a non-empty folder (or a file) without a marker: a folder this
    module did not finish is never reused or deleted."""
    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if {k: done.get(k) for k in options} != options:
            raise ValueError(f"{root} was prepared with {({k: done.get(k) for k in options})}, not {options}; "
                             f"choose another root or delete it")
        return True
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(f"{root} exists but holds no finished preparation of {what} ({MARKER} is missing); "
                              f"choose another root or delete it")
    return False


def partial_folder(root: str) -> str:
    """Where a preparation of `root` is written (emptied of what an interrupted one left), for finish_preparation."""
    partial = root + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    return partial


def finish_preparation(partial: str, root: str, record: dict) -> str:
    """Writes the marker (`record`) into `partial` and renames it to `root`: an interrupted preparation never looks
    finished."""
    with open(os.path.join(partial, MARKER), "w") as f:
        json.dump(record, f, indent=1)
    if os.path.isdir(root):
        os.rmdir(root)  # empty, checked by finished_preparation
    os.replace(partial, root)
    return root


def prepare_fashion_mnist(root: str, sources: Optional[Sequence[str]] = None, max_train: Optional[int] = None,
                          max_val: Optional[int] = None, size: Optional[int] = None,
                          download_dir: Optional[str] = "", verbose: bool = False) -> str:
    """Writes Fashion-MNIST as an ImageFolder tree under `root` (once) and returns `root`.

    Args:
        root: the folder to create; it must not exist, or hold a tree this function finished earlier.
        sources: folders searched for the four idx files (plain or .gz); default: the Debian package's folder.
        max_train / max_val: keep at most this many images per split, evenly over the classes (at least 10);
            None keeps all 60000 / 10000.
        size: resize the 28 x 28 images to size x size (bicubic) when writing; None keeps 28.
        download_dir: where torchvision downloads the files when no source has them; "" (default) means
            ``<root>_download``, None turns the download off.

    The options are stored in ``root/.prepared.json``: calling again with the same options returns at once,
    with others it raises rather than mixing two preparations.
    """
    root = os.path.abspath(root)
    sources = [DEBIAN_DIR] if sources is None else list(sources)
    if download_dir == "":
        download_dir = root + "_download"
    for name, value in (("max_train", max_train), ("max_val", max_val), ("size", size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    options = {"dataset": "fashion-mnist", "max_train": max_train, "max_val": max_val, "size": size}

    if finished_preparation(root, options, "Fashion-MNIST as an ImageFolder"):
        return root

    files = locate_idx_files(sources, download_dir)
    partial = partial_folder(root)
    counts = {}
    for split, max_images in (("train", max_train), ("val", max_val)):
        images, labels = load_split(files, split)
        keep = _per_class_subset(labels, max_images, split)
        counts[split] = _write_split(os.path.join(partial, split), images, keep, size)
        if verbose:
            print(f"{split}: {counts[split]} images", flush=True)
    return finish_preparation(partial, root, {**options, "counts": counts,
                                              "source": os.path.dirname(files[SPLITS["train"][0]])})


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """Where the Fashion-MNIST idx files come from: --source, --download_dir, --no_download."""
    parser.add_argument("--source", action="append", default=None,
                        help=f"folder holding the idx files (repeatable; none: {DEBIAN_DIR})")
    parser.add_argument("--download_dir", default="",
                        help="where to download them if needed (empty: <root>_download)")
    parser.add_argument("--no_download", action="store_true", help="fail rather than download")


def main(argv=None):
    p = argparse.ArgumentParser(description="Fashion-MNIST as an ImageFolder tree (root/train, root/val)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default="data/fashion_mnist", help="folder to create")
    p.add_argument("--max_train", type=int, default=None, help="keep at most N training images (even per class; none: all)")
    p.add_argument("--max_val", type=int, default=None, help="keep at most N validation images (even per class; none: all)")
    p.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE when writing (none: keep 28)")
    add_source_flags(p)
    args = p.parse_args(argv)
    try:
        root = prepare_fashion_mnist(args.root, args.source, args.max_train, args.max_val, args.size,
                                     None if args.no_download else args.download_dir, verbose=True)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    with open(os.path.join(root, MARKER)) as f:
        counts = json.load(f)["counts"]
    print(f"{root}: {counts['train']} train, {counts['val']} val images in {len(CLASS_NAMES)} classes")


if __name__ == "__main__":
    main()
