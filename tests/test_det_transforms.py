"""util.det_transforms: large-scale jitter (resize by a random scale, fixed-size crop with padding, flip, boxes from
the cropped masks), the evaluation resize, and detections mapped back to the image (boxes in fp32, masks pasted with
aligned sampling), at small sizes."""
import pytest
import torch

from training.data import SeededSamples
import util.det_transforms as det_transforms
from util.det_transforms import (PAD_FILL, DetEvalTransform, DetTrainTransform, detections_in, masks_to_boxes,
                                  paste_masks)


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


def test_a_mask_filling_its_box_pastes_to_exactly_the_pixels_whose_centres_lie_in_the_box():
    boxes = torch.tensor([[2.0, 3.0, 12.0, 9.0], [0.0, 0.0, 40.0, 30.0], [5.2, 5.2, 6.2, 6.2]])
    pasted = paste_masks(torch.ones(3, 1, 28, 28), boxes, (30, 40))
    assert pasted.dtype == torch.bool and pasted.shape == (3, 30, 40)
    expected = torch.zeros(30, 40, dtype=torch.bool)
    expected[3:9, 2:12] = True
    assert torch.equal(pasted[0], expected)
    assert pasted[1].all()
    assert pasted[2].sum() == 1 and pasted[2, 5, 5] and pasted[2, 6, 6] == 0  # the centre (5.5, 5.5) alone


def test_a_pasted_mask_follows_its_cells_across_the_box_and_chunks_change_nothing(monkeypatch):
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :, :2] = 1.0  # the left half of the box
    masks[1, 0, 2:] = 0.8  # the bottom half
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0], [0.0, 0.0, 16.0, 8.0]])
    whole = paste_masks(masks, boxes, (16, 16))
    assert whole[0, 4:12, 4:8].all() and not whole[0, :, 8:].any() and whole[0].sum() == 32
    # a cell at the box's edge blends with zero beyond it (detectron2's zero padding): the outer pixels of a corner
    # cell, blended on two sides, drop below 0.5
    assert whole[1, 4:8, 1:15].all() and not whole[1, :4].any() and not whole[1, 8:].any()
    assert not whole[1, 4, 0] and not whole[1, 7, 15] and whole[1, 5, 0]
    monkeypatch.setattr(det_transforms, "PASTE_CHUNK_PIXELS", 16 * 16)  # one mask per chunk
    assert torch.equal(paste_masks(masks, boxes, (16, 16)), whole)


def test_detections_map_to_the_original_image_in_fp32_clipped_and_without_empty_boxes():
    output = {"boxes": torch.tensor([[10.0, 5.0, 20.0, 15.0], [25.0, 0.0, 40.0, 12.0], [39.5, 2.0, 45.0, 4.0]]),
              "labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.9, 0.8, 0.7]),
              "masks": torch.ones(3, 1, 28, 28)}
    # the model saw a 20 x 40 image (its longest side resized from 61 x 123, the original)
    shown = detections_in(output, (20, 40), (61, 123))
    assert shown["boxes"].dtype == torch.float32 and shown["labels"].tolist() == [1, 2, 3]
    torch.testing.assert_close(shown["boxes"][0], torch.tensor([10 * 123 / 40, 5 * 61 / 20, 20 * 123 / 40,
                                                               15 * 61 / 20]))
    assert shown["boxes"][2, 2] == 123  # clipped to the original image
    assert shown["masks"].shape == (3, 61, 123)
    outside = {**output, "boxes": torch.tensor([[41.0, 2.0, 45.0, 4.0]]), "labels": torch.tensor([1]),
               "scores": torch.tensor([0.5]), "masks": torch.ones(1, 1, 28, 28)}
    assert len(detections_in(outside, (20, 40), (61, 123))["boxes"]) == 0  # empty once clipped: dropped
