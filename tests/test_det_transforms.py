"""util.det_transforms: large-scale jitter (resize by a random scale, fixed-size crop with padding, flip, boxes from
the cropped masks) and the evaluation resize, at small sizes."""
import pytest
import torch

from training.data import SeededSamples
from util.det_transforms import PAD_FILL, DetEvalTransform, DetTrainTransform, masks_to_boxes


def sample(height=40, width=60):
    """A uint8 image with two instances: a block at rows 5-14, columns 10-29, and one at rows 30-37, columns 50-57."""
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 30:38, 50:58] = 1
    target = {"boxes": masks_to_boxes(masks), "labels": torch.tensor([1, 2]), "masks": masks,
              "iscrowd": torch.zeros(2, dtype=torch.int64), "area": torch.tensor([200., 64.]), "image_id": 4,
              "orig_size": torch.tensor([height, width])}
    return image, target


def test_boxes_are_tight_around_masks():
    _, target = sample()
    torch.testing.assert_close(target["boxes"], torch.tensor([[10., 5., 30., 15.], [50., 30., 58., 38.]]))
    assert masks_to_boxes(torch.zeros(1, 4, 4, dtype=torch.uint8)).tolist() == [[0., 0., 0., 0.]]


def test_evaluation_resizes_the_longest_side_and_records_the_size():
    image, target = DetEvalTransform(30)(*sample())
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    assert target["size"].tolist() == [20, 30] and target["orig_size"].tolist() == [40, 60]
    torch.testing.assert_close(target["boxes"], torch.tensor([[5., 2.5, 15., 7.5], [25., 15., 29., 19.]]))
    assert target["masks"].shape == (2, 20, 30)


def test_training_output_is_a_square_whose_boxes_follow_the_cropped_masks():
    transform = DetTrainTransform(32, scale_range=(0.3, 2.0))
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = transform(*sample())
        assert image.shape == (3, 32, 32) and target["masks"].shape[1:] == (32, 32)
        assert target["size"].tolist() == [32, 32]
        torch.testing.assert_close(target["boxes"], masks_to_boxes(target["masks"]))
        assert target["masks"].flatten(1).any(1).all()  # instances the crop emptied are gone
        assert len(target["labels"]) == len(target["boxes"]) == len(target["iscrowd"]) == len(target["area"])
        torch.testing.assert_close(target["area"], target["masks"].flatten(1).sum(1).float())


def test_training_is_reproducible_from_torchs_generator():
    transform = DetTrainTransform(32)
    torch.manual_seed(3)
    first = transform(*sample())
    torch.manual_seed(3)
    again = transform(*sample())
    torch.manual_seed(4)
    other = transform(*sample())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    assert not torch.equal(first[0], other[0])


def test_the_training_loaders_seeding_makes_each_sample_reproducible():
    class Jittered(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return DetTrainTransform(32)(*sample())

    samples = SeededSamples(Jittered(), seed=0)
    first, again, next_epoch = samples[(0, 1)], samples[(0, 1)], samples[(1, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["masks"], again[1]["masks"])
    assert not torch.equal(first[0], next_epoch[0])


def test_a_small_image_is_padded_with_the_mean_colour():
    torch.manual_seed(0)
    image, target = DetTrainTransform(64, scale_range=(0.5, 0.5), flip_prob=0.0)(*sample())
    # 60 pixels wide, scaled to fit 32: 32 x 21, placed top-left, the rest padding
    assert (image[:, 21:, :] == torch.tensor(PAD_FILL, dtype=torch.uint8).view(3, 1, 1)).all()
    assert (image[:, :, 32:] == torch.tensor(PAD_FILL, dtype=torch.uint8).view(3, 1, 1)).all()
    assert not target["masks"][:, 21:].any() and not target["masks"][:, :, 32:].any()


def test_a_large_scale_crops_and_drops_the_instances_outside():
    image, target = sample(40, 40)
    target["masks"][1] = 0
    target["masks"][1, 30:40, 30:40] = 1  # the bottom-right corner
    target["boxes"] = masks_to_boxes(target["masks"])
    torch.manual_seed(0)
    transform = DetTrainTransform(20, scale_range=(2.0, 2.0), flip_prob=0.0)  # 40 x 40 stays, a 20 x 20 crop
    kept = {tuple(transform(image, target)[1]["labels"].tolist()) for _ in range(60)}
    assert {(1,), (2,), (1, 2)} <= kept  # crops with the first block alone, the corner alone, both


def test_flip_mirrors_image_masks_and_boxes():
    image, target = sample(32, 32)
    flipped, out = DetTrainTransform(32, scale_range=(1.0, 1.0), flip_prob=1.0)(image, target)
    # the second block lies outside a 32 x 32 image: its empty mask is dropped
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(out["masks"], target["masks"][:1].flip(-1))
    torch.testing.assert_close(out["boxes"], torch.tensor([[2., 5., 22., 15.]]))


def test_the_training_transform_needs_masks():
    image, target = sample()
    del target["masks"]
    with pytest.raises(ValueError, match="masks"):
        DetTrainTransform(32)(image, target)
