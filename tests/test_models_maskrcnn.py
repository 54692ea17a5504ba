"""models_maskrcnn: Mask R-CNN on the encoders' features (tiny sizes: the recipe's heads are for GPUs)."""
import pytest
import torch

import models_convvit  # noqa: F401  (registers the encoders)
from models_maskrcnn import LOSS_NAMES, RoIAlignV2, create_mask_rcnn, detection_loss
from torchvision.ops import roi_align


def tiny(num_classes=3):
    torch.manual_seed(0)
    return create_mask_rcnn("convvit_tiny_patch16", num_classes, 64, fpn_channels=16, rois_per_image=16,
                            img_size=64, dynamic_img_size=True)


def test_training_gives_every_loss_and_evaluation_gives_detections_at_the_image_size():
    model = tiny()
    assert model.backbone.strides == [4, 8, 16, 32] and model.backbone.out_channels == 16
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]  # an image without instances trains too
    model.train()
    loss, parts = detection_loss(model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets))
    assert set(parts) == set(LOSS_NAMES[1:]) and torch.isfinite(loss)
    assert torch.allclose(loss.detach(), sum(parts.values()))
    loss.backward()
    assert model.backbone.body.model.patch_embed1.proj.weight.grad is not None  # the encoder trains
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 48)])[0]  # test images keep their aspect ratio
    assert out["masks"].shape[1:] == (1, 64, 48) and len(out["boxes"]) == len(out["scores"]) <= 100
    assert out["labels"].min() >= 1 if len(out["labels"]) else True


def test_roi_align_v2_pools_each_box_from_the_level_of_its_size_with_half_pixel_alignment():
    pool = RoIAlignV2(["0", "1", "2", "3"], [4, 8, 16, 32], 7)
    small, large = torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[0.0, 0.0, 448.0, 448.0]])
    assert pool.levels(small).item() == 0 and pool.levels(large).item() == 3  # 224 px -> level 4 (stride 16)
    assert pool.levels(torch.tensor([[0.0, 0.0, 224.0, 224.0]])).item() == 2
    features = {str(k): torch.randn(1, 2, 128 // s, 128 // s) for k, s in enumerate([4, 8, 16, 32])}
    pooled = pool(features, [small], [(128, 128)])
    expected = roi_align(features["0"], torch.tensor([[0.0, 0.0, 0.0, 32.0, 32.0]]), 7, spatial_scale=0.25,
                         sampling_ratio=0, aligned=True)
    assert torch.equal(pooled, expected)


def test_an_encoder_without_four_levels_is_refused_naming_them():
    with pytest.raises(ValueError, match="feature levels"):
        create_mask_rcnn("convvit_tiny_patch16", 3, 64, img_size=64, out_indices=(1, 2))
