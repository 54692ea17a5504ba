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

Bad data does not stop a run. An annotation that cannot describe an instance (a box of zero area, polygons outside
its image or none with three points, a category or image the file does not list) is skipped when the dataset is
built (a polygon of fewer than three points is dropped from an object that has others, as detectron2 does), with an
`InvalidAnnotationWarning` naming the file and the annotation id; the dataset keeps them in `invalid_annotations` so
that a script can report the count. An image that cannot be decoded, or whose size differs from the file's, is
skipped with an `UnreadableImageWarning` naming the file: the dataset returns None for it and `detection_collate`
drops and counts it, as util.datasets.skip_bad_collate does for classification. A wrong layout (a missing annotation
file or image folder, a file that is not COCO's JSON) fails at once, naming the file.
"""
import json
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils

from util.datasets import UnreadableImageWarning, load_rgb

__all__ = ["CocoDetection", "InvalidAnnotationWarning", "coco_split", "coco_split_paths", "detection_collate",
           "annotation_mask", "invalid_reason"]

COCO_KEYS = ("images", "annotations", "categories")


class InvalidAnnotationWarning(UserWarning):
    """An annotation of the file could not describe an instance; it was skipped."""


def coco_split_paths(data_path: str, split: str) -> Tuple[str, str]:
    """(image folder, annotation file) of `split` ("train" or "val") in COCO 2017's layout."""
    return (os.path.join(data_path, f"{split}2017"),
            os.path.join(data_path, "annotations", f"instances_{split}2017.json"))


def read_coco_json(annotation_file: str) -> dict:
    """The parsed annotation file, checked to be COCO's instance format; raises naming the file otherwise."""
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
    return data


def _full_polygons(segmentation: list) -> list:
    """The polygons with three points or more (pycocotools would read one of two points as a box)."""
    return [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def _polygon_reason(segmentation: list, height: int, width: int) -> Optional[str]:
    polygons = _full_polygons(segmentation)
    if not polygons:  # as detectron2, an object keeps its good polygons and is skipped when none is left
        return "no polygon with three points or more"
    xs = [x for polygon in polygons for x in polygon[0::2]]
    ys = [y for polygon in polygons for y in polygon[1::2]]
    if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
        return "a polygon outside its image"
    return None


def invalid_reason(annotation: dict, image: Optional[dict], category_ids: set) -> Optional[str]:
    """Why `annotation` cannot describe an instance of `image` (None: it can)."""
    if image is None:
        return f"image {annotation.get('image_id')!r} is not in the file"
    if annotation.get("category_id") not in category_ids:
        return f"category {annotation.get('category_id')!r} is not in the file"
    box = annotation.get("bbox")
    if not isinstance(box, list) or len(box) != 4 or not box[2] > 0 or not box[3] > 0:
        return f"a box of zero area {box!r}"
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        return _polygon_reason(segmentation, image["height"], image["width"])
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        return "no polygon or RLE segmentation"
    if list(segmentation["size"]) != [image["height"], image["width"]]:
        return f"an RLE of size {segmentation['size']} in an image of {image['height']} x {image['width']}"
    return None


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """uint8 [height, width] mask of a COCO segmentation: polygons, uncompressed or compressed RLE."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(_full_polygons(segmentation), height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def _annotations_by_image(data: dict, annotation_file: str) -> Tuple[Dict[int, List[dict]], List[tuple]]:
    """The valid annotations of each image, and (annotation id, reason) of those skipped, each warned about."""
    images = {image["id"]: image for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    by_image = {image_id: [] for image_id in images}
    invalid = []
    for annotation in data["annotations"]:
        reason = invalid_reason(annotation, images.get(annotation.get("image_id")), category_ids)
        if reason is None:
            by_image[annotation["image_id"]].append(annotation)
            continue
        invalid.append((annotation["id"], reason))
        warnings.warn(f"{annotation_file}: skipping annotation {annotation['id']}: {reason}",
                      InvalidAnnotationWarning)
    return by_image, invalid


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
    `label_of` (category id -> label), `invalid_annotations` ((id, reason) pairs), `coco_data` (the parsed file).
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
        self.annotations, self.invalid_annotations = _annotations_by_image(self.coco_data, annotation_file)
        if train:
            self.annotations = {image_id: [a for a in annotations if not a.get("iscrowd", 0)]
                                for image_id, annotations in self.annotations.items()}
        self.ids = [image["id"] for image in self.coco_data["images"] if not train or self.annotations[image["id"]]]

    def __len__(self) -> int:
        return len(self.ids)

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
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in annotations], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in annotations], dtype=torch.float32),
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
        if image.size != (info["width"], info["height"]):
            warnings.warn(f"skipping image {path}: it is {image.width} x {image.height} but its annotation file "
                          f"says {info['width']} x {info['height']}", UnreadableImageWarning)
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
