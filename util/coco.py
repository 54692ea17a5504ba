"""COCO-format instance data for Mask R-CNN: COCO 2017 as distributed, or any dataset given by an annotation file
and an image folder.

    <data_path>/annotations/instances_train2017.json    <data_path>/train2017/<file_name>
    <data_path>/annotations/instances_val2017.json      <data_path>/val2017/<file_name>

Each sample is `(image, target)`: the image as the transform leaves it (a PIL RGB image without one), and the
target as torchvision's Mask R-CNN reads it: `boxes` float32 [N, 4] (x1, y1, x2, y2 in pixels), `labels` int64
[N] in 1..C (0 is the background), `masks` uint8 [N, H, W], and for evaluation `image_id`, `iscrowd`, `area` and
`orig_size` (height, width of the file). Classes come from the annotation file's categories, sorted by id and
numbered 1..C; `category_ids[label - 1]` maps a label back to the file's category id for results.

Training (`train=True`) follows detectron2: crowd regions are left out of the targets (they mark areas a detector
is neither rewarded nor penalised for, which COCOeval honours at evaluation), and images without a non-crowd
instance are left out. Evaluation keeps every image of the file, crowd annotations included.

What stops a run, before any training, with a ValueError naming the file and the entry (`read_coco_json`): a wrong
layout (a missing annotation file or image folder, a file that is not COCO's JSON, an entry without an `id`, an
image without `file_name`, `height` or `width`), and the entries that decide which objects and images are counted:
an id of an image, an annotation or a category, or an annotation's `image_id` or `category_id`, that is not a JSON
integer (pycocotools would not match "7" or 7.0 with 7); an id that appears twice among the images, the annotations
or the categories (pycocotools indexes them by id: a repeat loses an entry or counts it twice); an image whose
`height` or `width` is not a positive integer or whose `file_name` is not a non-empty string.

What is skipped and counted: an annotation that cannot describe an instance (no `bbox`, one that is not four finite
numbers or of zero area; no `segmentation`, a polygon with a coordinate that is not a finite number, polygons outside
its image or none with three points, an RLE whose `size` is not two integers or not its image's, or whose `counts`
are neither a string nor a list of non-negative integers; an `area` that is not a finite number; an `iscrowd` other
than 0 or 1; a category or image the file does not list) is skipped when the dataset is built (a polygon of fewer
than three points is dropped from an object that has others, as detectron2 does), with an
`InvalidAnnotationWarning` naming the file and the annotation id; the dataset keeps them in `invalid_annotations` so
that a script can report the count. Evaluation scores against `CocoDetection.ground_truth_data()`, the file with
the annotations the dataset keeps, so that a skipped annotation is neither an object to find nor one COCOeval fails
on. An image that cannot be decoded, or whose size differs from the file's, is skipped with an
`UnreadableImageWarning` naming the file: the dataset returns None for it and `detection_collate` drops and counts
it, as util.datasets.skip_bad_collate does for classification; `CocoDetection.check_images()` lists those images
from the files' headers, without decoding, before a run.
"""
import json
import math
import os
import warnings
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from util.datasets import UnreadableImageWarning, load_rgb
from util.layouts import coco_split_paths

__all__ = ["CocoDetection", "InvalidAnnotationWarning", "coco_split", "coco_split_paths", "detection_collate",
           "annotation_mask", "invalid_reason", "read_coco_json"]

COCO_KEYS = ("images", "annotations", "categories")
ENTRY_NAMES = {"images": "image", "annotations": "annotation", "categories": "category"}


class InvalidAnnotationWarning(UserWarning):
    """An annotation of the file could not describe an instance; it was skipped."""


def read_coco_json(annotation_file: str) -> dict:
    """The parsed annotation file, checked to be COCO's instance format with ids, references and image fields that
    pycocotools and this module can use (see the module's notes); raises FileNotFoundError or a ValueError naming the
    file, and the first bad entry with how to fix it, otherwise."""
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"annotation file {annotation_file} not found")
    try:
        with open(annotation_file) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{annotation_file} is not a JSON file: {err}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(key), list) for key in COCO_KEYS):
        raise ValueError(f"{annotation_file} is not a COCO annotation file: it needs the lists "
                         f"{', '.join(repr(k) for k in COCO_KEYS)}")
    for key in COCO_KEYS:
        if not all(isinstance(entry, dict) and "id" in entry for entry in data[key]):
            raise ValueError(f"{annotation_file}: every entry of {key!r} needs an 'id'")
    for image in data["images"]:
        if not all(key in image for key in ("file_name", "height", "width")):
            raise ValueError(f"{annotation_file}: image {image['id']} lacks 'file_name', 'height' or 'width'")
    problem = _entry_problem(data)
    if problem is not None:
        raise ValueError(f"{annotation_file}: {problem}")
    return data


def _is_int(value) -> bool:
    """A JSON integer. bool is an int to Python but no id or size."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """An int or float (not bool) that is a finite float: json.load reads NaN and Infinity, which Python's json.dump
    writes by default, and an int of 400 digits overflows a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _all_numbers(values: list) -> bool:
    """Whether every value is a number (`_is_number`). Quick for the many coordinates of a large file: a sum is
    finite when its terms are, so each is looked at only when the sum is not (a bad value or an overflow)."""
    if not set(map(type, values)) <= {int, float}:
        return False
    try:
        if math.isfinite(sum(values)):
            return True
    except OverflowError:
        pass
    return all(_is_number(value) for value in values)


def _shown(value) -> str:
    """A JSON value in a message, with its type: "7" and 7.0 read as 7 without it."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{value!r} ({'an' if name[0] in 'aeiou' else 'a'} {name})"


def _entry_problem(data: dict) -> Optional[str]:
    """The first entry whose id, references or image fields would mislead pycocotools or this module, and how to fix
    it, in words (None: there is none). The entries have an `id`, and images their fields (read_coco_json)."""
    for key in COCO_KEYS:
        name, seen = ENTRY_NAMES[key], set()
        for index, entry in enumerate(data[key]):
            id = entry["id"]
            if not _is_int(id):
                return (f"{name} id {_shown(id)}, entry {index} of {key!r}, is not an integer; write ids as JSON "
                        f"integers (7, not \"7\", 7.0 or true), as pycocotools matches them by value")
            if id in seen:
                return (f"{name} id {id} appears twice; give each {name} an id of its own (pycocotools indexes "
                        f"{key} by id, so a repeat loses one or counts it twice)")
            seen.add(id)
            if key == "annotations":
                for field, listed in (("image_id", "images"), ("category_id", "categories")):
                    if not _is_int(entry.get(field)):
                        what = f"{field} {_shown(entry[field])}, not an integer" if field in entry else f"no {field}"
                        return (f"annotation {id} has {what}; give each annotation the integer {field} of an entry "
                                f"of {listed!r}")
            if key == "images":
                for field in ("height", "width"):
                    if not _is_int(entry[field]) or entry[field] <= 0:
                        return (f"image {id} has {field} {_shown(entry[field])}, not a positive integer; write "
                                f"the image's height and width in pixels as JSON integers")
                if not isinstance(entry["file_name"], str) or not entry["file_name"]:
                    return (f"image {id} has file_name {_shown(entry['file_name'])}, not a non-empty string; "
                            f"write the image's path relative to the image folder")
    return None


def _full_polygons(segmentation: list) -> list:
    """The polygons with three points or more (pycocotools would read one of two points as a box)."""
    return [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def _polygon_reason(segmentation: list, height: int, width: int) -> Optional[str]:
    for polygon in segmentation:  # pycocotools would fail on them, or rasterise garbage from NaN
        if isinstance(polygon, list) and not _all_numbers(polygon):
            bad = next(x for x in polygon if not _is_number(x))
            return f"a polygon with a coordinate that is not a finite number: {_shown(bad)}"
    polygons = _full_polygons(segmentation)
    if not polygons:  # as detectron2, an object keeps its good polygons and is skipped when none is left
        return "no polygon with three points or more"
    xs = [x for polygon in polygons for x in polygon[0::2]]
    ys = [y for polygon in polygons for y in polygon[1::2]]
    if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
        return "a polygon outside its image"
    return None


def _box_reason(box) -> Optional[str]:
    if box is None:
        return "no bbox"
    if not isinstance(box, list) or len(box) != 4:
        return f"a bbox that is not a list of 4 numbers: {box!r}"
    if not _all_numbers(box):
        return f"a bbox with a value that is not a finite number: {box!r}"
    if not box[2] > 0 or not box[3] > 0:
        return f"a box of zero area {box!r}"
    return None


def _rle_reason(segmentation: dict, height: int, width: int) -> Optional[str]:
    size, counts = segmentation["size"], segmentation["counts"]
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size):
        return f"an RLE whose size is not two integers: {size!r}"
    if not isinstance(counts, str) and not (isinstance(counts, list) and set(map(type, counts)) <= {int}
                                            and min(counts, default=0) >= 0):
        return f"an RLE whose counts are neither a string nor a list of non-negative integers: {_shown(counts)}"
    if size != [height, width]:
        return f"an RLE of size {size} in an image of {height} x {width}"
    return None


def invalid_reason(annotation: dict, image: Optional[dict], category_ids: set) -> Optional[str]:
    """Why `annotation` cannot describe an instance of `image` (None: it can). The file has passed read_coco_json."""
    if image is None:
        return f"image {annotation.get('image_id')!r} is not in the file"
    if annotation.get("category_id") not in category_ids:
        return f"category {annotation.get('category_id')!r} is not in the file"
    reason = _box_reason(annotation.get("bbox"))
    if reason is not None:
        return reason
    segmentation = annotation.get("segmentation")
    if segmentation is None:
        return "no segmentation"
    if isinstance(segmentation, list):
        reason = _polygon_reason(segmentation, image["height"], image["width"])
    elif not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        return "no polygon or RLE segmentation"
    else:
        reason = _rle_reason(segmentation, image["height"], image["width"])
    if reason is not None:
        return reason
    # COCOeval sizes objects by `area` (APs, APm, APl) and ignores detections in crowd regions by `iscrowd`
    if "area" in annotation and not _is_number(annotation["area"]):
        return f"an area that is not a finite number: {_shown(annotation['area'])}"
    iscrowd = annotation.get("iscrowd", 0)
    if not isinstance(iscrowd, int) or iscrowd not in (0, 1):
        return f"an iscrowd that is not 0 or 1: {_shown(iscrowd)}"
    return None


def _rle(segmentation, height: int, width: int) -> dict:
    """The compressed RLE of a COCO segmentation (polygons of fewer than three points left out)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(_full_polygons(segmentation), height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """uint8 [height, width] mask of a COCO segmentation: polygons, uncompressed or compressed RLE."""
    return mask_utils.decode(_rle(segmentation, height, width))


def _as_kept(annotation: dict, image: dict) -> dict:
    """A valid annotation as the dataset and evaluation read it: itself, or a copy without its polygons of fewer than
    three points (pycocotools reads a list whose first polygon has two points as boxes), with the `iscrowd` and `area`
    that COCOeval needs where the file leaves them out (not a crowd; the mask's pixels, as COCO defines area)."""
    changes = {}
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list) and len(_full_polygons(segmentation)) != len(segmentation):
        changes["segmentation"] = _full_polygons(segmentation)
    if "iscrowd" not in annotation:
        changes["iscrowd"] = 0
    if "area" not in annotation:
        changes["area"] = float(mask_utils.area(_rle(segmentation, image["height"], image["width"])))
    return {**annotation, **changes} if changes else annotation


def _valid_annotations(data: dict, annotation_file: str) -> Tuple[List[dict], List[tuple]]:
    """The valid annotations in the file's order, as kept (`_as_kept`), and (annotation id, reason) of those
    skipped, each warned about."""
    images = {image["id"]: image for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    kept, invalid = [], []
    for annotation in data["annotations"]:
        image = images.get(annotation["image_id"])
        reason = invalid_reason(annotation, image, category_ids)
        if reason is None:
            kept.append(_as_kept(annotation, image))
            continue
        invalid.append((annotation["id"], reason))
        warnings.warn(f"{annotation_file}: skipping annotation {annotation['id']}: {reason}",
                      InvalidAnnotationWarning)
    return kept, invalid


def _size_reason(size: Tuple[int, int], info: dict) -> Optional[str]:
    """Why an image of `size` (width, height) does not match its entry `info` (None: it does)."""
    if size == (info["width"], info["height"]):
        return None
    return f"it is {size[0]} x {size[1]} but its annotation file says {info['width']} x {info['height']}"


class CocoDetection(torch.utils.data.Dataset):
    """The images of a COCO annotation file with their instances (see the module's notes); use it with
    `detection_collate`.

    Args:
        image_dir: the folder that `file_name`s are relative to.
        annotation_file: COCO's instance JSON.
        transform: called as `transform(image, target)` on the PIL image and its target; returns both.
        train: leave crowd annotations and images without instances out (detectron2's training data).
        with_masks: decode the masks (evaluation compares results with the file, so it can go without).
    Attributes: `ids` (image ids, in sample order), `category_ids` (label - 1 -> category id), `class_names`,
    `label_of` (category id -> label), `invalid_annotations` ((id, reason) pairs), `coco_data` (the parsed file, as
    written: evaluation reads `ground_truth_data()`).
    Raises FileNotFoundError or ValueError naming the file for a wrong layout or a bad entry (read_coco_json).
    """

    def __init__(self, image_dir: str, annotation_file: str, transform: Optional[Callable] = None,
                 train: bool = False, with_masks: bool = True):
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder {image_dir} not found (for {annotation_file})")
        self.coco_data = read_coco_json(annotation_file)
        self.image_dir, self.transform, self.train, self.with_masks = image_dir, transform, train, with_masks
        categories = sorted(self.coco_data["categories"], key=lambda category: category["id"])
        self.category_ids = [category["id"] for category in categories]
        self.class_names = [str(category.get("name", category["id"])) for category in categories]
        self.label_of = {category_id: label for label, category_id in enumerate(self.category_ids, start=1)}
        self.images = {image["id"]: image for image in self.coco_data["images"]}
        self._kept, self.invalid_annotations = _valid_annotations(self.coco_data, annotation_file)
        self.annotations = {image_id: [] for image_id in self.images}
        for annotation in self._kept:
            if not (train and annotation["iscrowd"]):
                self.annotations[annotation["image_id"]].append(annotation)
        self.ids = [image["id"] for image in self.coco_data["images"] if not train or self.annotations[image["id"]]]

    def __len__(self) -> int:
        return len(self.ids)

    def ground_truth_data(self) -> dict:
        """The parsed file as evaluation should score against it (util.det_metrics.coco_ground_truth of the
        dataset): every image and category, and the annotations the dataset keeps as it reads them (`_as_kept`),
        crowd ones included even for training, since COCOeval ignores the detections in them. `coco_data` still
        holds the skipped annotations, which COCOeval would count as objects to find, or fail on (a null box, a
        polygon of two points). The annotations are the dataset's own: copy one before changing it."""
        return {**self.coco_data, "annotations": list(self._kept)}

    def check_images(self) -> List[Tuple[str, str]]:
        """(path, reason) of each image of the dataset that `__getitem__` would skip: missing, unreadable, or of
        another size than the file's. Only the headers are read (no pixel is decoded), so it is quick enough to
        run on an evaluation set before a run; a file damaged after its header passes here and is still skipped
        when it is read. Never raises for a bad image."""
        bad = []
        for image_id in self.ids:
            info = self.images[image_id]
            path = os.path.join(self.image_dir, info["file_name"])
            if not os.path.isfile(path):
                bad.append((path, "not found"))
                continue
            try:
                with Image.open(path) as image:  # lazy: reads the format's header alone
                    size = image.size
            except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
                bad.append((path, f"unreadable: {type(err).__name__}: {err}"))
                continue
            reason = _size_reason(size, info)
            if reason is not None:
                bad.append((path, reason))
        return bad

    def target(self, image_id: int) -> dict:
        """The target of image `image_id` at the file's size (see the module's notes)."""
        image = self.images[image_id]
        height, width = image["height"], image["width"]
        annotations = self.annotations[image_id]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.int64),
            "image_id": image_id,
            "iscrowd": torch.tensor([int(a["iscrowd"]) for a in annotations], dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in annotations], dtype=torch.float32),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.with_masks:
            masks = [annotation_mask(a["segmentation"], height, width) for a in annotations]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros(0, height, width, dtype=torch.uint8))
        return target

    def __getitem__(self, index: int) -> Optional[Tuple[object, dict]]:
        image_id = self.ids[index]
        info = self.images[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            image = load_rgb(path)
        except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", UnreadableImageWarning)
            return None
        reason = _size_reason(image.size, info)
        if reason is not None:
            warnings.warn(f"skipping image {path}: {reason}", UnreadableImageWarning)
            return None
        target = self.target(image_id)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def coco_split(data_path: str, split: str, transform: Optional[Callable] = None, train: Optional[bool] = None,
               with_masks: bool = True) -> CocoDetection:
    """`split` ("train" or "val") of a dataset in COCO 2017's layout; `train` defaults to split == "train"."""
    image_dir, annotation_file = coco_split_paths(data_path, split)
    return CocoDetection(image_dir, annotation_file, transform, split == "train" if train is None else train,
                         with_masks)


def detection_collate(batch: List[Optional[tuple]]):
    """Lists of the readable samples of a batch, and the number of skipped ones: `(images, targets, num_bad)`.

    Detection images differ in size, so they stay a list (Mask R-CNN batches them itself). When none of the batch
    could be read, images and targets are None, as with util.datasets.skip_bad_collate."""
    good = [sample for sample in batch if sample is not None]
    num_bad = len(batch) - len(good)
    if not good:
        return None, None, num_bad
    images, targets = (list(column) for column in zip(*good))
    return images, targets, num_bad
