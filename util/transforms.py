"""Classification transforms for fine-tuning, linear probing and evaluation (ImageNet normalisation, bicubic)."""
from typing import Iterator

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment
from torchvision import transforms
from torchvision.transforms import InterpolationMode

EVAL_CROP_PCT = 0.875  # resize to input / 0.875 (256 for 224), then centre crop


def eval_transform(input_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(int(round(input_size / EVAL_CROP_PCT)), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keeps the `bits_to_keep` (0-8) most significant bits of every channel; 0 bits gives a black image.

    timm's RandAugment asks for 0 bits at the top of its magnitude range ('PosterizeIncreasing' at magnitude 10,
    which `mstd0.5` noise reaches for about 2% of its draws). Pillow up to 12 returned a black image for that, and
    the released recipes were trained so; Pillow 13 raises ValueError instead, which kills a data-loading worker.
    This is the same lookup table for every bit count, on any Pillow version.
    """
    if bits_to_keep >= 8:
        return img
    mask = 0xFF ^ ((1 << (8 - max(0, int(bits_to_keep)))) - 1)
    return img.point([value & mask for value in range(256)] * len(img.getbands()))


def _augment_ops(transform) -> Iterator[AugmentOp]:
    """The AugmentOps inside a (composed) timm transform: RandAugment, AutoAugment and AugMix policies."""
    if isinstance(transform, transforms.Compose):
        for t in transform.transforms:
            yield from _augment_ops(t)
    elif isinstance(transform, (RandAugment, AugMixAugment)):
        yield from transform.ops
    elif isinstance(transform, AutoAugment):
        for sub_policy in transform.policy:
            yield from sub_policy


def finetune_transform(input_size: int, auto_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                       remode: str = "pixel", recount: int = 1, color_jitter=None):
    """timm's training transform: RandomResizedCrop, flip, RandAugment, normalisation, random erasing; posterize
    done by `posterize` above, so that every magnitude works with every Pillow."""
    transform = create_transform(input_size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
                                 interpolation="bicubic", re_prob=reprob, re_mode=remode, re_count=recount,
                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform


def linprobe_transform(input_size: int, min_crop_scale: float = 0.08) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
