"""Semantic segmentation data in ADE20K's layout, and the training / evaluation transforms of its mmseg recipe.

    <root>/images/training/<name>.jpg         <root>/annotations/training/<name>.png
    <root>/images/validation/<name>.jpg       <root>/annotations/validation/<name>.png

Images and annotations pair by file name without extension (images may be any format Pillow reads; annotations
are single-channel PNGs of class indices). ADE20K (`ADEChallengeData2016` as distributed) is one such dataset; any
other in this layout works with its number of classes. An optional ``<root>/classes.txt`` (one name per line, in
class order after `reduce_zero_label`) names the classes in the per-class table.

Labels. With `reduce_zero_label` (ADE20K's convention) annotation 0 ("other") becomes the ignore index (255 unless
`ignore_index` says otherwise) and k becomes k - 1, so ADE20K's 1..150 are classes 0..149. A label that is then
neither the ignore index nor in [0, num_classes) stops the run with an error naming the file: it means a wrong
number of classes or a wrong `reduce_zero_label`, which mapping it to ignore would hide. `check_labels` reads a
split's annotations before the first step (all of them, or a fixed sample of a large split), so that such a label
stops the run at start rather than when a loader first reads it.

Bad files do not stop a run (as util.datasets.RobustImageFolder): an image or annotation that cannot be decoded,
or a pair whose sizes differ, is skipped with an `UnreadableImageWarning` naming the file(s); the dataset returns
None and `util.datasets.skip_bad_collate` drops and counts it. A wrong layout (a missing folder, an image without
annotation or the reverse) fails when the dataset is built.

Transforms draw from NumPy's global generator, so that a caller seeding each sample (or DataLoader worker) makes
them reproducible.
"""
import os
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.datasets import UnreadableImageWarning, load_rgb
from util.seg_labels import IGNORE_INDEX

__all__ = ["AnnotationFormatError", "ADE20K_CLASSES", "SPLITS", "SegmentationFolder", "SegTrainTransform",
           "SegEvalTransform", "LabelCheck", "check_labels", "load_label", "reduce_zero_label", "rescale_size",
           "random_rescale", "random_crop", "photometric_distortion", "normalize", "class_names"]

SPLITS = ("training", "validation")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ANNOTATION_EXTENSION = ".png"
# Modes Pillow gives single-channel label maps: 8-bit (ADE20K), palette indices (VOC style), 16/32-bit integers.
LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
PIXEL_MEAN = tuple(255 * m for m in IMAGENET_DEFAULT_MEAN)  # 123.675, 116.28, 103.53
PIXEL_STD = tuple(255 * s for s in IMAGENET_DEFAULT_STD)  # 58.395, 57.12, 57.375

# ADE20K's 150 classes (SceneParsing objectInfo150), in label order 1..150, i.e. classes 0..149 after reduction.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")


def class_names(root: str, num_classes: int) -> List[str]:
    """Names for the per-class table: ``<root>/classes.txt`` when present (exactly num_classes lines), else
    ADE20K's when num_classes is 150 (its layout's default), else "class 0", "class 1", ..."""
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{path} names {len(names)} classes but the dataset has {num_classes} (--nb_classes)")
        return names
    if num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [f"class {k}" for k in range(num_classes)]


class AnnotationFormatError(ValueError):
    """An annotation decodes but is not a map of class indices: the dataset's format is wrong, not one file."""


def load_label(path: str) -> np.ndarray:
    """A label map as int64 [H, W]. Decoding errors propagate (the dataset skips the file); a multi-channel
    image (e.g. an RGB-coloured annotation) raises AnnotationFormatError."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    if image.mode not in LABEL_MODES:
        raise AnnotationFormatError(f"{path}: annotations must be single-channel maps of class indices (modes "
                         f"{', '.join(LABEL_MODES)}), got mode {image.mode}")
    return np.asarray(image).astype(np.int64)


def reduce_zero_label(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """0 -> ignore_index, k -> k - 1, ignore_index stays (mmseg's reduce_zero_label)."""
    return np.where((label == 0) | (label == ignore_index), ignore_index, label - 1)


def _files_by_stem(folder: str, extensions: Sequence[str]) -> dict:
    by_stem = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        if entry.is_file() and ext.lower() in extensions:
            if stem in by_stem:
                raise ValueError(f"{folder}: two files named {stem!r} ({os.path.basename(by_stem[stem])} and "
                                 f"{entry.name}); pairing is by name without extension")
            by_stem[stem] = entry.path
    return by_stem


def _unpaired_error(kind: str, folder: str, other: str, stems: List[str]) -> FileNotFoundError:
    shown = ", ".join(stems[:5]) + (f" and {len(stems) - 5} more" if len(stems) > 5 else "")
    return FileNotFoundError(f"{len(stems)} {kind} in {folder} have no counterpart in {other}: {shown}")


class SegmentationFolder(torch.utils.data.Dataset):
    """Image / annotation pairs of one split of `<root>/images/<split>` and `<root>/annotations/<split>`.

    Items are `transform(image, label)` with `image` a PIL RGB image and `label` int64 [H, W] (reduced and
    range-checked), or None for a bad pair (see the module docstring). `samples` lists (image, annotation) paths.
    `ignore_index` (255 by default) marks unlabelled pixels; it must lie above the classes.
    """

    def __init__(self, root: str, split: str, num_classes: int, transform: Callable,
                 reduce_zero_label: bool = True, ignore_index: int = IGNORE_INDEX):
        if not 1 <= num_classes <= ignore_index:
            raise ValueError(f"the number of classes must be in [1, {ignore_index}] ({ignore_index} is the ignore "
                             f"index), got {num_classes}")
        image_dir, label_dir = (os.path.join(root, kind, split) for kind in ("images", "annotations"))
        for folder in (image_dir, label_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"no folder {folder}: a segmentation dataset holds images/{split}/ and "
                                        f"annotations/{split}/ (ADE20K's layout) under its root {root!r}")
        images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
        labels = _files_by_stem(label_dir, (ANNOTATION_EXTENSION,))
        if not images:
            raise FileNotFoundError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        missing = sorted(set(images) - set(labels))
        if missing:
            raise _unpaired_error("images", image_dir, label_dir, missing)
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise _unpaired_error("annotations", label_dir, image_dir, orphans)
        self.root, self.split, self.num_classes = root, split, num_classes
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.samples: List[Tuple[str, str]] = [(images[stem], labels[stem]) for stem in sorted(images)]

    def __len__(self) -> int:
        return len(self.samples)

    def load_pair(self, index: int) -> Optional[Tuple[Image.Image, np.ndarray]]:
        """The decoded image and its checked label map, or None (with a warning) for a bad pair."""
        image_path, label_path = self.samples[index]
        pair = []
        for kind, path, load in (("image", image_path, load_rgb), ("annotation", label_path, load_label)):
            try:
                pair.append(load(path))
            except AnnotationFormatError:
                raise
            except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ...) for bad files
                warnings.warn(f"skipping unreadable {kind} {path}: {type(err).__name__}: {err}", UnreadableImageWarning)
                return None
        image, label = pair
        if label.shape != (image.height, image.width):
            warnings.warn(f"skipping mismatched pair {image_path} ({image.width} x {image.height}) and {label_path} "
                          f"({label.shape[1]} x {label.shape[0]})", UnreadableImageWarning)
            return None
        return image, self.checked_label(label, label_path)

    def checked_label(self, label: np.ndarray, label_path: str) -> np.ndarray:
        """`label` (as read from `label_path`) reduced if `reduce_zero_label`; a value that is then neither a class nor
        the ignore index raises ValueError naming the file, the value and the flags that decide it."""
        if self.reduce_zero_label:
            label = reduce_zero_label(label, self.ignore_index)
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            value = int(label[bad].max())
            found = f" (the file's {value + 1}, less one by --reduce_zero_label)" if self.reduce_zero_label else ""
            raise ValueError(f"{label_path}: label {value} is outside the {self.num_classes} classes{found} and is "
                             f"not the ignore index {self.ignore_index}; check --nb_classes {self.num_classes}, "
                             f"--{'' if self.reduce_zero_label else 'no-'}reduce_zero_label and --ignore_index "
                             f"{self.ignore_index}")
        return label

    @property
    def annotation_folder(self) -> str:
        return os.path.join(self.root, "annotations", self.split)

    def __getitem__(self, index: int):
        pair = self.load_pair(index)
        return None if pair is None else self.transform(*pair)


# An evaluation set's annotations are all read at start when there are at most this many: at about 2 ms per
# ADE20K-sized PNG (one core, warm disk cache) ADE20K's 2000 take about 4 s and 5000 about 10 s, little beside a
# run's first interval. A larger set is checked on a fixed random sample, which finds a wrong --nb_classes or
# --reduce_zero_label (they touch most images) in about a second.
FULL_LABEL_CHECK_LIMIT = 5000
LABEL_CHECK_SAMPLE = 500
# Training annotations are checked on a small sample only: the loader checks every one as it reads it.
TRAINING_LABEL_CHECK_SAMPLE = 100


@dataclass(frozen=True)
class LabelCheck:
    """What `check_labels` read of a split: `checked` of its `total` annotations (all of them, or a fixed random
    sample), of which `unreadable` could not be decoded; `labelled_pixels`: the pixels of the others that are not
    the ignore index."""
    split: str
    checked: int
    total: int
    unreadable: int
    labelled_pixels: int

    def describe(self) -> str:
        """"all 2000 validation images", or "a sample of 500 of 20000 validation images"."""
        if self.checked == self.total:
            return f"all {self.total} {self.split} images"
        return f"a sample of {self.checked} of {self.total} {self.split} images"


def check_labels(dataset: SegmentationFolder, full_up_to: int, sample_size: int, seed: int = 0) -> LabelCheck:
    """Reads the annotations of `dataset`, every one when there are at most `full_up_to`, else a fixed random sample
    of `sample_size` (the same at every start and on every process), and checks each as training and evaluation
    will (`SegmentationFolder.checked_label`): a label outside the classes raises ValueError naming the file, the
    value and the flags; a colour annotation raises AnnotationFormatError. An annotation that cannot be decoded is
    named in a warning and counted (training and evaluation skip its pair). Returns what was read."""
    total = len(dataset)
    if total <= full_up_to:
        indices = range(total)
    else:
        indices = sorted(np.random.default_rng(seed).choice(total, min(sample_size, total), replace=False).tolist())
    unreadable = labelled = 0
    for index in indices:
        path = dataset.samples[index][1]
        try:
            label = load_label(path)
        except AnnotationFormatError:
            raise
        except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ...) for bad files
            warnings.warn(f"unreadable annotation {path}: {type(err).__name__}: {err}", UnreadableImageWarning)
            unreadable += 1
            continue
        labelled += int(np.count_nonzero(dataset.checked_label(label, path) != dataset.ignore_index))
    return LabelCheck(dataset.split, len(indices), total, unreadable, labelled)


# -- transforms -------------------------------------------------------------------------------------------------------
def rescale_size(size: Tuple[int, int], scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv's keep-ratio rule: the (h, w) that fits `size` (h, w) inside `scale` = (long edge, short edge) bounds,
    i.e. factor = min(max(scale) / long side, min(scale) / short side), each side rounded half up."""
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize_pair(image: Image.Image, label: Optional[np.ndarray], size: Tuple[int, int]):
    """Bilinear image (Pillow's, which low-pass filters when shrinking), nearest label; both with pixel centres
    mapped the same way, so that they stay aligned."""
    h, w = size
    if (image.height, image.width) == (h, w):
        return image, label
    image = image.resize((w, h), Image.BILINEAR)
    if label is not None:
        rows = np.minimum(((np.arange(h) + 0.5) * label.shape[0] / h).astype(np.int64), label.shape[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * label.shape[1] / w).astype(np.int64), label.shape[1] - 1)
        label = label[rows[:, None], cols[None, :]]
    return image, label


def random_rescale(image: Image.Image, label: np.ndarray, scale: Tuple[int, int],
                   ratio_range: Tuple[float, float]):
    """Resizes to `scale` x r (r uniform in ratio_range) with the keep-ratio rule (mmseg's Resize with
    ratio_range)."""
    ratio = np.random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return _resize_pair(image, label, rescale_size((image.height, image.width), target))


def random_crop(image: np.ndarray, label: np.ndarray, crop_size: Tuple[int, int], cat_max_ratio: float = 1.0,
                tries: int = 10, ignore_index: int = IGNORE_INDEX):
    """A random crop of at most crop_size (h, w) (a smaller side is kept whole). With cat_max_ratio < 1 a crop is
    drawn again, up to `tries` times, while one class covers more than that share of its labelled pixels (those
    not `ignore_index`) or it holds fewer than two classes; after the last try the next draw is kept (mmseg's
    RandomCrop)."""
    h, w = label.shape
    crop_h, crop_w = min(crop_size[0], h), min(crop_size[1], w)

    def draw():
        y = np.random.randint(0, h - crop_h + 1)
        x = np.random.randint(0, w - crop_w + 1)
        return y, x

    y, x = draw()
    if cat_max_ratio < 1:
        for _ in range(tries):
            counts = np.bincount(label[y:y + crop_h, x:x + crop_w].ravel(), minlength=ignore_index + 1)
            counts = counts[np.arange(len(counts)) != ignore_index]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return image[y:y + crop_h, x:x + crop_w], label[y:y + crop_h, x:x + crop_w]


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0, 255] -> H in [0, 360), S in [0, 1], V in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    s = np.where(v > 0, delta / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(delta, 1e-12)
    h = np.where(v == r, (g - b) / safe % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    h = np.where(delta > 0, h, 0.0)
    return np.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] % 360, hsv[..., 1], hsv[..., 2]
    k = np.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6], axis=-1)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 255).astype(np.uint8)  # truncates, as mmseg's convert()


def photometric_distortion(image: np.ndarray, brightness_delta: float = 32,
                           contrast_range: Tuple[float, float] = (0.5, 1.5),
                           saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 RGB [H, W, 3] image; each step with probability 1/2:
    brightness + U(-delta, delta); contrast x U(range), either second or last (a coin decides); saturation
    x U(range); hue + an integer in [-hue_delta, hue_delta] in OpenCV's half-degree units (±36° by default).
    Every step rounds back to uint8, as the original does."""
    img = image
    if np.random.randint(2):
        img = _to_uint8(img.astype(np.float32) + np.random.uniform(-brightness_delta, brightness_delta))
    contrast_last = np.random.randint(2) == 0
    if not contrast_last and np.random.randint(2):
        img = _to_uint8(img.astype(np.float32) * np.random.uniform(*contrast_range))
    if np.random.randint(2):
        hsv = _rgb_to_hsv(img.astype(np.float64))
        hsv[..., 1] = np.clip(hsv[..., 1] * np.random.uniform(*saturation_range), 0, 1)
        img = _to_uint8(np.round(_hsv_to_rgb(hsv)))
    if np.random.randint(2):
        hsv = _rgb_to_hsv(img.astype(np.float64))
        hsv[..., 0] += 2 * np.random.randint(-hue_delta, hue_delta + 1)
        img = _to_uint8(np.round(_hsv_to_rgb(hsv)))
    if contrast_last and np.random.randint(2):
        img = _to_uint8(img.astype(np.float32) * np.random.uniform(*contrast_range))
    return img


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 [3, H, W] normalised with the ImageNet mean and std."""
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


class SegTrainTransform:
    """The recipe's training pipeline: random rescale of `scale` (long, short edge bounds) by a ratio in
    ratio_range keeping the aspect ratio, random crop (cat_max_ratio), horizontal flip, photometric distortion,
    normalisation, padding to crop_size (image 0, label `ignore_index`). Returns (float32 [3, h, w],
    int64 [h, w])."""

    def __init__(self, crop_size: Tuple[int, int] = (512, 512), scale: Tuple[int, int] = (2048, 512),
                 ratio_range: Tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, ignore_index: int = IGNORE_INDEX):
        self.crop_size = tuple(crop_size)
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = random_rescale(image, label, self.scale, self.ratio_range)
        image, label = random_crop(np.asarray(image), label, self.crop_size, self.cat_max_ratio,
                                   ignore_index=self.ignore_index)
        if np.random.rand() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image)
        x = normalize(image)
        y = torch.from_numpy(np.ascontiguousarray(label))
        pad_h, pad_w = self.crop_size[0] - y.shape[0], self.crop_size[1] - y.shape[1]
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = torch.nn.functional.pad(y, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return x, y

    def __repr__(self):
        return (f"{type(self).__name__}(crop_size={self.crop_size}, scale={self.scale}, ratio_range="
                f"{self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
                f"photometric={self.photometric}, ignore_index={self.ignore_index})")


class SegEvalTransform:
    """Resize to `scale` keeping the aspect ratio (bilinear), normalisation; the label stays at the original size
    for scoring. Returns (float32 [3, h, w], int64 [H, W])."""

    def __init__(self, scale: Tuple[int, int] = (2048, 512)):
        self.scale = tuple(scale)

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        image, _ = _resize_pair(image, None, rescale_size((image.height, image.width), self.scale))
        return normalize(np.asarray(image)), torch.from_numpy(np.ascontiguousarray(label))

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale})"
