"""Image folders and transforms. Pre-training batches are uint8 crops: they travel to the device once and are
normalised there, next to the HOG target that needs the raw pixel values.

Bad files do not stop a run. An image that cannot be read (zero bytes, truncated, not an image at all) is skipped
with an `UnreadableImageWarning` naming the file: the dataset returns None for it, and `skip_bad_collate` drops the
Nones and counts them, so every batch is `(images, labels, num_bad)`. Images in other modes than RGB (grayscale,
alpha, palette, CMYK, 16-bit) are converted to RGB.
"""
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

# Transparent pixels are shown over white, as an image viewer would show them.
ALPHA_BACKGROUND = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageWarning(UserWarning):
    """A file in the dataset could not be decoded; it was skipped."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    Alpha (RGBA, LA, PA, palettes or grayscale with a transparent colour) is composited over white. 16-bit images
    (I;16*, and I, which is how Pillow may open them) are scaled from 0-65535 to 0-255: Pillow's own convert()
    clips them at 255, which turns most 16-bit images white. Float images (F) are taken to be in [0, 1].
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        gray = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if "A" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, ALPHA_BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")  # L, P, 1, CMYK, YCbCr; a mode Pillow cannot convert raises (a bad image)


def load_rgb(path: str) -> Image.Image:
    """Decodes the whole file now (Pillow is lazy), so that truncation is found here, and returns RGB."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return to_rgb(image)


class RobustImageFolder(datasets.ImageFolder):
    """ImageFolder (same `classes`, `class_to_idx`, `samples`, `targets`) whose unreadable files give None.

    Use it with `skip_bad_collate`. Only decoding is guarded: an error in the transform is a bug and is raised.
    `classes`: the labels' names in index order, to label this folder as another was labelled (an evaluation set by
    its training set's classes); a class may then have no folder or no image here, and a folder that is not one of
    them is not read (`image_folder` refuses it first). Without it, the folder's own class folders, sorted.
    """

    def __init__(self, root: str, transform=None, target_transform=None, classes: Optional[Sequence[str]] = None):
        self.given_classes = list(classes) if classes is not None else None
        super().__init__(root, transform=transform, target_transform=target_transform, loader=load_rgb,
                         allow_empty=classes is not None)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        if self.given_classes is None:
            return super().find_classes(directory)
        return self.given_classes, {name: index for index, name in enumerate(self.given_classes)}

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}",
                          UnreadableImageWarning)
            return None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def skip_bad_collate(batch: List[Optional[tuple]]):
    """Collates the readable samples of a batch and counts the skipped ones.

    Returns `(images, labels, num_bad)`. A batch with bad files is smaller than `batch_size`; when none of its files
    could be read, images and labels are None (the training engines then still take their step, see
    training.loop.train_round). num_bad is a plain int: counting needs no device sync.
    """
    good = [sample for sample in batch if sample is not None]
    num_bad = len(batch) - len(good)
    if not good:
        return None, None, num_bad
    images, labels = default_collate(good)
    return images, labels, num_bad


def pretrain_transform(input_size: int, min_crop_scale: float = 0.5) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


def class_folders(root: str) -> List[str]:
    """The class folders of an ImageFolder root, sorted: ImageFolder's `classes` of it."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def image_folder(data_path: str, split: str, transform, classes: Optional[Sequence[str]] = None,
                 classes_of: str = "") -> RobustImageFolder:
    """`<data_path>/<split>/<class>/<image>` as a RobustImageFolder; a missing folder, or one without images, fails
    here. `classes`: label it with these class names in index order instead of its own folders, those of
    `classes_of` (what the messages call their source: a training folder, a checkpoint). A class folder that they
    lack fails here, naming it, since its images would be scored against another class's label; a class without
    images here is allowed (`classes_without_images`)."""
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no '{split}/' folder under --data_path {data_path!r}: expected an ImageFolder "
                                f"tree {root}/<class>/<image>")
    if classes is not None:
        known = set(classes)
        unknown = [name for name in class_folders(root) if name not in known]
        if unknown:
            one = len(unknown) == 1
            raise ValueError(f"{root} has {'a class' if one else 'classes'} {', '.join(map(repr, unknown))} that "
                             f"{classes_of} has not: {'its' if one else 'their'} images would be scored against "
                             f"another class's label")
    try:
        dataset = RobustImageFolder(root, transform=transform, classes=classes)
    except FileNotFoundError as err:  # no class folders, or class folders without images
        raise FileNotFoundError(f"{root} holds no images in class sub-folders: {err}") from None
    if len(dataset) == 0:  # labelled by given classes, whose folders may be missing or empty
        raise FileNotFoundError(f"{root} holds no image of any of the {len(dataset.classes)} classes of {classes_of} "
                                f"(a folder per class, named as there)")
    return dataset


def build_pretrain_dataset(data_path: str, input_size: int, min_crop_scale: float = 0.5) -> RobustImageFolder:
    return image_folder(data_path, "train", pretrain_transform(input_size, min_crop_scale))


def sample_images(data_path: str, split: str, input_size: int, num_images: int) -> torch.Tensor:
    """Centre crops of `num_images` readable images spread evenly over the folder (so over its classes), for
    pictures: uint8 [N, 3, S, S]."""
    transform = transforms.Compose([
        transforms.Resize(input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.PILToTensor(),
    ])
    dataset = image_folder(data_path, split, transform)
    step = max(1, len(dataset) // max(1, num_images))
    picked = []
    for index in list(range(0, len(dataset), step)) + list(range(len(dataset))):
        sample = dataset[index]
        if sample is not None:
            picked.append(sample[0])
        if len(picked) == num_images:
            break
    if not picked:
        raise ValueError(f"no readable image in {data_path}/{split}")
    return torch.stack(picked)


def classes_without_images(dataset: RobustImageFolder) -> List[str]:
    """The classes of `dataset` (in index order) that none of its images has."""
    present = set(dataset.targets)
    return [name for index, name in enumerate(dataset.classes) if index not in present]


def classification_folders(data_path: str, train_transform, val_transform, nb_classes: int, with_train: bool = True,
                           classes: Optional[Sequence[str]] = None, classes_of: str = ""):
    """`train/` (unless `with_train` is False: then None) and `val/` ImageFolders for classification, labelled alike:
    val/ takes train/'s class-to-index mapping (its class folders, sorted, as ImageFolder does), or without train/
    `classes` (those a checkpoint was trained on; `classes_of` names it), or else its own folders. A val/ class that
    the mapping lacks fails here, naming both; a training class without images in val/ is allowed (its accuracy then
    covers the others: `classes_without_images`). An empty val/, or more classes than `nb_classes`, fails here,
    naming the folder."""
    train_set = image_folder(data_path, "train", train_transform) if with_train else None
    if train_set is not None:
        classes, classes_of = train_set.classes, os.path.join(data_path, "train")
    val_set = image_folder(data_path, "val", val_transform, classes, classes_of)
    for name, dataset in (("train", train_set), ("val", val_set)):
        if dataset is not None and len(dataset.classes) > nb_classes:
            raise ValueError(f"{data_path}/{name} has {len(dataset.classes)} classes but --nb_classes is {nb_classes}")
    return train_set, val_set
