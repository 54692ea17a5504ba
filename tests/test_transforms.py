"""Every augmentation the scripts enable by default, at the extremes of its range, with the installed Pillow."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup

from util.datasets import pretrain_transform
from util.transforms import _augment_ops, eval_transform, finetune_transform, linprobe_transform, posterize

DEFAULT_AA = "rand-m9-mstd0.5-inc1"  # main_finetune.py's --aa


def seed(value=0):
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def noise_image(height=40, width=40, value_seed=0):
    return Image.fromarray(np.random.default_rng(value_seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_posterize_keeps_the_top_bits_and_zero_bits_is_black():
    img = noise_image()
    pixels = np.asarray(img)
    for bits in range(9):
        kept = np.asarray(posterize(img, bits))
        assert np.array_equal(kept, pixels & (0xFF ^ ((1 << (8 - bits)) - 1))), bits
    assert not np.asarray(posterize(img, 0)).any()


def test_default_finetune_transform_runs_through_the_zero_bit_posterize(monkeypatch):
    """About 1.5 images in 1000 get posterize with 0 bits (magnitude noise above 10), which Pillow 13 rejects."""
    transform = finetune_transform(32, DEFAULT_AA)
    asked = []
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = lambda img, bits, fn=op.aug_fn, **kw: asked.append(bits) or fn(img, bits, **kw)
    seed()
    img = noise_image()
    for _ in range(2000):
        out = transform(img)
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    assert 0 in asked  # the failing case was met, and passed


@pytest.mark.parametrize("magnitude", [0.0, 10.0])
@pytest.mark.parametrize("size", [(40, 40), (3, 5)])
def test_every_default_randaugment_op_works_at_both_ends_of_its_range(magnitude, size):
    transform = finetune_transform(32, DEFAULT_AA)
    ops = list(_augment_ops(transform))
    assert len(ops) == 15
    img = noise_image(*size)
    for op in ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
        for s in range(4):  # some ops negate their level at random: both signs
            seed(s)
            out = op(img)
            assert out.mode == "RGB" and out.size == img.size, op.name


@pytest.mark.parametrize("size", [(32, 32), (1, 1), (7, 300)])
def test_crops_and_random_erasing_work_on_tiny_and_thin_images(size):
    img = noise_image(*size)
    seed()
    for _ in range(50):
        assert finetune_transform(32, DEFAULT_AA, reprob=1.0)(img).shape == (3, 32, 32)
        assert linprobe_transform(32)(img).shape == (3, 32, 32)
        assert pretrain_transform(32, 0.08)(img).shape == (3, 32, 32)


def test_mixup_and_cutmix_defaults_give_valid_soft_targets_on_small_images():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1,
                  num_classes=10)
    seed()
    for _ in range(200):
        images, targets = mixup(torch.rand(2, 3, 8, 8), torch.tensor([1, 2]))
        assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
        assert torch.allclose(targets.sum(1), torch.ones(2)) and (targets >= 0).all()


def test_eval_transform_resizes_to_input_over_0875():
    img = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    tf = eval_transform(224)
    assert tf.transforms[0].size == 256 and tf(img).shape == (3, 224, 224)
