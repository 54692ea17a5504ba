"""Detection transforms of ConvMAE / ViTDet's recipe: large-scale jitter for training, a longest-side resize for
evaluation, and the way back: detections mapped from the transformed image to any size of it. The transforms take
`(image, target)` as util.coco.CocoDetection gives them (a PIL image, or a uint8 [3, H, W] tensor) and return a
uint8 [3, H, W] tensor with the target moved along; the target gains `size`, the (height, width) of the transformed
image, which evaluation needs to map results back to `orig_size` (`detections_in`). The model pads every image to
one square itself (models_maskrcnn.SquareTransform).

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
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from util.seg_datasets import PIXEL_MEAN

__all__ = ["DetTrainTransform", "DetEvalTransform", "masks_to_boxes", "resize", "rescale", "crop_and_pad", "hflip",
           "paste_masks", "detections_in"]

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


# -- detections back in the image -------------------------------------------------------------------------------------
MASK_THRESHOLD = 0.5
PASTE_CHUNK_PIXELS = 2 ** 26  # pixels of pasted masks per chunk (256 MB in fp32), whatever the image size


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int],
                threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """bool [N, H, W]: mask probabilities [N, 1, M, M], each covering its box [N, 4] (x1, y1, x2, y2 in the pixels of
    an image of `size` (H, W)), sampled at the image's pixel centres and thresholded (>= `threshold`), as
    detectron2's paste_masks_in_image: the mask's M x M cells span the box exactly, sampled bilinearly
    (align_corners=False), zero outside it. In fp32 on the masks' device, in chunks of at most PASTE_CHUNK_PIXELS."""
    height, width = size
    out = torch.zeros(len(masks), height, width, dtype=torch.bool, device=masks.device)
    if len(masks) == 0 or height == 0 or width == 0:
        return out
    masks, boxes = masks.float(), boxes.to(masks.device, torch.float32)
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    chunk = max(1, PASTE_CHUNK_PIXELS // (height * width))
    for start in range(0, len(masks), chunk):
        x1, y1, x2, y2 = boxes[start:start + chunk].unbind(1)
        # each pixel centre in the box's normalised coordinates: -1 at its left / top edge, 1 at its right / bottom
        gx = (xs[None, :] - x1[:, None]) / (x2 - x1).clamp(min=1e-6)[:, None] * 2 - 1
        gy = (ys[None, :] - y1[:, None]) / (y2 - y1).clamp(min=1e-6)[:, None] * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=3)
        sampled = nnf.grid_sample(masks[start:start + chunk], grid, mode="bilinear", align_corners=False)
        out[start:start + chunk] = sampled[:, 0] >= threshold
    return out


def detections_in(output: dict, size: Tuple[int, int], target_size: Tuple[int, int],
                  threshold: float = MASK_THRESHOLD) -> dict:
    """Mask R-CNN's detections of an image of `size` (H, W) as they are in the same image at `target_size`: boxes
    scaled on each axis (fp32), clipped to the image and those left empty dropped (detectron2's
    detector_postprocess), masks ([N, 1, M, M] probabilities in their boxes) pasted at `target_size` and
    thresholded (`paste_masks`): bool [N, H', W']. The original image's size gives COCO's results."""
    (height, width), (target_h, target_w) = size, target_size
    boxes = output["boxes"].float() * torch.tensor([target_w / width, target_h / height] * 2,
                                                   device=output["boxes"].device)
    boxes = torch.stack([boxes[:, 0::2].clamp(0, target_w), boxes[:, 1::2].clamp(0, target_h)], dim=2).flatten(1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    result = {key: value[keep] for key, value in output.items() if key != "masks"}
    result["boxes"] = boxes[keep]
    if "masks" in output:
        result["masks"] = paste_masks(output["masks"][keep], boxes[keep], target_size, threshold)
    return result
