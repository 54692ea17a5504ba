"""Image folders and transforms. Pre-training batches are uint8 crops: they travel to the device once and are
normalised there, next to the HOG target that needs the raw pixel values."""
import os

import torch
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode


def pretrain_transform(input_size: int, min_crop_scale: float = 0.5) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


def image_folder(data_path: str, split: str, transform) -> datasets.ImageFolder:
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no '{split}/' folder under --data_path {data_path!r}: expected an ImageFolder "
                                f"tree {root}/<class>/<image>")
    try:
        dataset = datasets.ImageFolder(root, transform=transform)
    except FileNotFoundError as err:  # no class folders, or class folders without images
        raise FileNotFoundError(f"{root} holds no images in class sub-folders: {err}") from None
    return dataset


def build_pretrain_dataset(data_path: str, input_size: int, min_crop_scale: float = 0.5) -> datasets.ImageFolder:
    return image_folder(data_path, "train", pretrain_transform(input_size, min_crop_scale))

