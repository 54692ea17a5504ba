"""Detection transforms of ConvMAE / ViTDet's recipe: large-scale jitter for training, a longest-side resize for
evaluation. They take `(image, target)` as util.coco.CocoDetection gives them (a PIL image, or a uint8 [3, H, W]
tensor) and return a uint8 [3, H, W] tensor with the target moved along; the target gains `size`, the (height,
width) of the transformed image, which evaluation needs to map results back to `orig_size`.

Training (detectron2's `RandomFlip`, `ResizeScale`, `FixedSizeCrop`, then `recompute_boxes` and
`filter_empty_instances`): flip horizontally with probability 0.5; resize, keeping the aspect ratio, so that the
image fits in a square of side `scale * image_size` with `scale` uniform in `scale_range`; crop an `image_size`
square at a random place (padding at the bottom and right when the image is smaller). Boxes are then the tight boxes
of the cropped masks, so a box follows the visible part of its object rather than the crop of its old box, and an
instance the crop leaves without a pixel is dropped. Draws come from torch's global generator, which the training
loader seeds for each sample (training.data.SeededSamples).
"""
from typing import Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from util.seg_datasets import PIXEL_MEAN

__all__ = ["DetTrainTransform", "DetEvalTransform", "masks_to_boxes", "resize", "rescale", "crop_and_pad", "hflip"]

# Padding in the mean colour becomes zero once the model normalises the image: the same value that Mask R-CNN's
# own batching pads with, so padded regions look alike whichever step added them.
PAD_FILL = tuple(round(m) for m in PIXEL_MEAN)
INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area")


def as_tensor(image) -> torch.Tensor:
    return F.pil_to_tensor(image) if isinstance(image, Image.Image) else image


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight float32 boxes [N, 4] (x1, y1, x2, y2) around uint8 masks [N, H, W], with x2 = last column + 1 as
    detectron2's BitMasks.get_bounding_boxes; an empty mask gives a box of zeros."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32)
    rows, cols = (masks > 0).any(dim=2), (masks > 0).any(dim=1)
    for i in range(masks.shape[0]):
        ys, xs = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        if len(xs):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def resize(image: torch.Tensor, target: dict, size: Tuple[int, int]) -> Tuple[torch.Tensor, dict]:
    """Resizes image (bilinear, antialiased), masks (nearest pixel centre: legacy nearest would shift them by up to
    a pixel against the image) and boxes to `size` (height, width)."""
    height, width = image.shape[-2:]
    image = F.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)
    target = dict(target)
    scale = torch.tensor([size[1] / width, size[0] / height] * 2, dtype=torch.float32)
    target["boxes"] = target["boxes"] * scale
    if "masks" in target:
        masks = target["masks"]
        target["masks"] = (F.resize(masks, list(size), InterpolationMode.NEAREST_EXACT) if len(masks)
                           else masks.new_zeros(0, *size))
    return image, target


def rescale(image: torch.Tensor, target: dict, factor: float) -> Tuple[torch.Tensor, dict]:
    """`resize` by `factor` on both sides (keeping the aspect ratio; at least one pixel)."""
    height, width = image.shape[-2:]
    return resize(image, target, (max(1, round(height * factor)), max(1, round(width * factor))))


def crop_and_pad(image: torch.Tensor, target: dict, top: int, left: int, size: int,
                 fill: Sequence[int] = PAD_FILL) -> Tuple[torch.Tensor, dict]:
    """The `size` square from (top, left), padded at the bottom and right where the image ends (image with
    `fill`, masks with 0); boxes are shifted and clipped."""
    height, width = image.shape[-2:]
    bottom, right = min(top + size, height), min(left + size, width)
    out = torch.tensor(fill, dtype=image.dtype).view(-1, 1, 1).repeat(1, size, size)
    out[:, :bottom - top, :right - left] = image[:, top:bottom, left:right]
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    target["boxes"] = torch.stack([boxes[:, 0::2].clamp(0, right - left), boxes[:, 1::2].clamp(0, bottom - top)],
                                  dim=2).flatten(1)
    if "masks" in target:
        masks = target["masks"].new_zeros(len(target["masks"]), size, size)
        masks[:, :bottom - top, :right - left] = target["masks"][:, top:bottom, left:right]
        target["masks"] = masks
    return out, target


def hflip(image: torch.Tensor, target: dict) -> Tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [width, 0, width, 0])
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def keep_instances(target: dict, keep: torch.Tensor) -> dict:
    return {key: value[keep] if key in INSTANCE_KEYS else value for key, value in target.items()}


class DetTrainTransform:
    """Large-scale jitter (see the module's notes); the target must have masks. `area` becomes the masks' pixel
    counts after the crop."""

    def __init__(self, image_size: int = 1024, scale_range: Tuple[float, float] = (0.1, 2.0),
                 flip_prob: float = 0.5, fill: Sequence[int] = PAD_FILL):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.image_size, self.scale_range, self.flip_prob, self.fill = image_size, scale_range, flip_prob, fill

    def __call__(self, image, target: dict) -> Tuple[torch.Tensor, dict]:
        if "masks" not in target:
            raise ValueError("the training transform recomputes boxes from masks: build the dataset with masks")
        image = as_tensor(image)
        if torch.rand(()) < self.flip_prob:
            image, target = hflip(image, target)
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand(()))
        height, width = image.shape[-2:]
        factor = min(scale * self.image_size / height, scale * self.image_size / width)
        image, target = rescale(image, target, factor)
        height, width = image.shape[-2:]
        # One draw for both axes, as detectron2's FixedSizeCrop: the crop's corner lies on the line from the
        # top-left to the bottom-right placement, the distribution the published recipe trained with.
        where = float(torch.rand(()))
        top = round(where * max(0, height - self.image_size))
        left = round(where * max(0, width - self.image_size))
        image, target = crop_and_pad(image, target, top, left, self.image_size, self.fill)
        target["boxes"] = masks_to_boxes(target["masks"])
        target["area"] = target["masks"].flatten(1).sum(1).to(torch.float32)
        target = keep_instances(target, (target["masks"].flatten(1) > 0).any(1))
        target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return image, target


class DetEvalTransform:
    """Resizes so that the longer side is `image_size` (detectron2's ResizeShortestEdge with `max_size`), keeping
    the aspect ratio; boxes and masks follow."""

    def __init__(self, image_size: int = 1024):
        self.image_size = image_size

    def __call__(self, image, target: dict) -> Tuple[torch.Tensor, dict]:
        image = as_tensor(image)
        height, width = image.shape[-2:]
        image, target = rescale(image, target, self.image_size / max(height, width))
        target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return image, target
