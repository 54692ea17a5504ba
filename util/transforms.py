"""Classification transforms for fine-tuning, linear probing and evaluation (ImageNet normalisation, bicubic)."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
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


def finetune_transform(input_size: int, auto_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                       remode: str = "pixel", recount: int = 1, color_jitter=None):
    """timm's training transform: RandomResizedCrop, flip, RandAugment, normalisation, random erasing."""
    return create_transform(input_size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
                            interpolation="bicubic", re_prob=reprob, re_mode=remode, re_count=recount,
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def linprobe_transform(input_size: int, min_crop_scale: float = 0.08) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
