"""models_maskrcnn: Mask R-CNN on the encoders' features (tiny sizes: the recipe's heads are for GPUs): ConvMAE's and
ViTDet's detectors, fp32 boxes under autocast, one test geometry, detectron2's losses and mask targets."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import roi_align

import dmjd_encoders  # noqa: F401  (registers the encoders)
from models_maskrcnn import (LOSS_NAMES, ROI_BOX_WEIGHTS, DetectronRPN, Fp32BoxCoder, RoIAlignV2, box_losses,
                             create_mask_rcnn, detection_loss, mask_targets)
from util.det_metrics import coco_evaluate
from util.det_transforms import detections_in

CONVVIT, VIT = "convvit_tiny_patch16", "vit_test_patch16_gap_sincos"
# the detection backbone of each family, at the tests' size (windows of 2 tokens, block 1 global)
DETECTION = dict(window_size=2, global_blocks=(1,), rel_pos_bias=True)
LAYOUT = {CONVVIT: "shared", VIT: "decomposed"}


def tiny(name=CONVVIT, num_classes=3, seed=0):
    torch.manual_seed(seed)
    return create_mask_rcnn(name, num_classes, 64, fpn_channels=16, rois_per_image=16, img_size=64,
                            rel_pos_layout=LAYOUT[name], **DETECTION)


def one_object(size=64):
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    return [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, size, size, dtype=torch.uint8)}]  # an image without instances trains too


@pytest.mark.parametrize("name", [CONVVIT, VIT])
def test_training_gives_every_loss_and_evaluation_gives_detections_at_the_image_size(name):
    model = tiny(name)
    assert model.backbone.strides == [4, 8, 16, 32] and model.backbone.out_channels == 16
    model.train()
    loss, parts = detection_loss(model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], one_object()))
    assert set(parts) == set(LOSS_NAMES[1:]) and torch.isfinite(loss)
    assert torch.allclose(loss.detach(), sum(parts.values()))
    loss.backward()
    first = "patch_embed1" if name == CONVVIT else "patch_embed"
    assert getattr(model.backbone.body.model, first).proj.weight.grad is not None  # the encoder trains
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 48)])[0]  # test images keep their aspect ratio
    assert out["masks"].shape[1:] == (1, 28, 28) and len(out["boxes"]) == len(out["scores"]) <= 100
    shown = detections_in(out, (64, 48), (64, 48))  # masks pasted at the image's size
    assert shown["masks"].shape[1:] == (64, 48) and shown["masks"].dtype == torch.bool
    assert out["labels"].min() >= 1 if len(out["labels"]) else True


def test_convvit_gets_convmaes_detector_and_vit_vitdets():
    convmae, vitdet = tiny(CONVVIT), tiny(VIT)
    # ConvMAE's DET: the stride-32 level max pooled from the stride-16 map (no parameters), FPN and heads with BN
    assert isinstance(convmae.backbone.body.model.downsample32, nn.MaxPool2d)
    assert convmae.backbone.fpn is not None
    assert any(isinstance(m, nn.BatchNorm2d) for m in convmae.roi_heads.box_head.modules())
    assert "rel_pos_tables.window" in dict(convmae.backbone.body.model.named_modules())
    # ViTDet: the simple pyramid at the FPN's width with no top-down merge, LayerNorm in the RoI heads' convs, the RPN
    # head's convs without norm (StandardRPNHead, conv_dims [-1, -1], as both configs)
    assert vitdet.backbone.fpn is None and vitdet.backbone.body.model.pyramid.out_channels == 16
    for head in (vitdet.roi_heads.box_head, vitdet.roi_heads.mask_head):
        norms = [type(m) for m in head.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
        assert norms and set(norms) == {LayerNorm2d}
    for rpn in (convmae.rpn.head, vitdet.rpn.head):
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for m in rpn.modules())
    levels = vitdet.backbone(torch.randn(1, 3, 64, 64))
    assert list(levels) == ["0", "1", "2", "3", "pool"] and levels["pool"].shape[-1] == 1


def test_anchors_and_the_heads_initialisation_are_detectron2s():
    model = tiny()
    wide, square, tall = model.rpn.anchor_generator.cell_anchors[0]  # 32 px: sqrt(area), height / width 0.5, 1, 2
    torch.testing.assert_close(wide, torch.tensor([-16 * 2 ** 0.5, -8 * 2 ** 0.5, 16 * 2 ** 0.5, 8 * 2 ** 0.5]))
    assert square.tolist() == [-16, -16, 16, 16] and tall[3] == wide[2]  # not rounded to whole pixels
    heads = model.roi_heads
    for layer, std in ((heads.box_predictor.cls_score, 0.01), (heads.box_predictor.bbox_pred, 0.001),
                       (heads.mask_predictor.mask_fcn_logits, 0.001)):
        assert layer.weight.std().item() == pytest.approx(std, rel=0.1) and not layer.bias.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_anchors_proposals_boxes_scores_and_masks_are_fp32_under_autocast(dtype):
    model = tiny()
    seen = {}
    model.roi_heads.register_forward_pre_hook(lambda m, args: seen.update(proposals=args[1][0].dtype))
    model.rpn.anchor_generator.register_forward_hook(lambda m, args, anchors: seen.update(anchors=anchors[0].dtype))
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss, _ = detection_loss(model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], one_object()))
    assert seen == {"proposals": torch.float32, "anchors": torch.float32}
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model([torch.rand(3, 64, 48), torch.rand(3, 37, 64)])
    for image in out:
        assert {image[k].dtype for k in ("boxes", "scores", "masks")} == {torch.float32}
    boxes = torch.cat([image["boxes"] for image in out]).flatten()
    # a box rounded to bf16 would sit on its grid (steps of 0.25 between 32 and 64 pixels, ...)
    assert (boxes.to(torch.bfloat16).float() != boxes).float().mean() > 0.5


def test_a_perfect_detectors_boxes_decoded_from_bf16_deltas_score_100_at_the_recipes_scale():
    """The audit's case: proposals near the ground truth of 640 x 480 images resized to 1024, the box head's deltas
    as its bf16 linear layer gives them. torchvision's coder rounds the boxes to bf16 (edges 4 px apart at 1024):
    COCO's AP drops far below 100; decoded in fp32 it stays 100."""
    torch.manual_seed(0)
    truth = torch.rand(100, 2) * torch.tensor([900.0, 600.0])  # COCO's AP takes 100 detections per image
    truth = torch.cat([truth, truth + 20 + torch.rand(100, 2) * 100], dim=1)
    proposals = truth + torch.randn_like(truth) * 5
    deltas = BoxCoder(ROI_BOX_WEIGHTS).encode_single(truth, proposals).to(torch.bfloat16)
    ours = Fp32BoxCoder(ROI_BOX_WEIGHTS).decode(deltas, [proposals]).reshape(-1, 4)
    theirs = BoxCoder(ROI_BOX_WEIGHTS).decode(deltas, [proposals]).reshape(-1, 4)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    scale = 640 / 1024  # back to the original image

    def ap(boxes):
        def xywh(b):
            return [b[0], b[1], b[2] - b[0], b[3] - b[1]]
        gt = {"images": [{"id": 1, "height": 480, "width": 640}], "categories": [{"id": 1}],
              "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": xywh(b), "area": 1.0,
                               "iscrowd": 0} for i, b in enumerate((truth * scale).tolist())]}
        records = [{"image_id": 1, "category_id": 1, "bbox": xywh(b), "score": 1.0 - i / 1000}
                   for i, b in enumerate((boxes.float() * scale).tolist())]
        return coco_evaluate(gt, records, iou_types=("bbox",))["bbox"]["AP"]

    assert ap(ours) == 100.0 and ap(theirs) < 90  # (87.1)


def test_an_images_detections_do_not_depend_on_the_other_images_of_its_batch():
    """Every image is padded to the same square: alone or beside images of other aspect ratios, the same grid, the
    same position embeddings and the same detections."""
    model = tiny(VIT).eval()
    images = [torch.rand(3, 64, 40), torch.rand(3, 24, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        together = model(images)
        alone = [model([image])[0] for image in images]
    for a, b in zip(together, alone):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
        assert torch.equal(a["labels"], b["labels"])
    for image, out in zip(images, together):  # clipped to the image, not to the padded square
        assert (out["boxes"][:, 2] <= image.shape[-1]).all() and (out["boxes"][:, 3] <= image.shape[-2]).all()


def test_an_image_larger_than_the_square_is_refused_naming_the_sizes():
    with pytest.raises(ValueError, match="80 x 64 pixels does not fit the model's 64 x 64 square"):
        tiny().eval()([torch.rand(3, 80, 64)])


def test_the_rpn_and_box_head_regress_boxes_with_l1_as_detectron2():
    rpn = tiny().rpn
    torch.manual_seed(0)
    labels = [torch.cat([torch.ones(10), torch.zeros(30), -torch.ones(5)]) for _ in range(2)]  # -1: ignored
    objectness, deltas, targets = torch.randn(90, 1), torch.randn(90, 4), [torch.randn(45, 4), torch.randn(45, 4)]
    objectness_loss, box_loss = DetectronRPN.compute_loss(rpn, objectness, deltas, labels, targets)
    valid = torch.cat(labels) >= 0  # every anchor is sampled here: fewer than 256 per image
    positive = torch.cat(labels) == 1
    normalizer = 256 * 2  # anchors sampled per image x images, not the anchors actually sampled
    expected = F.binary_cross_entropy_with_logits(objectness.flatten()[valid], torch.cat(labels)[valid],
                                                  reduction="sum") / normalizer
    torch.testing.assert_close(objectness_loss, expected)
    torch.testing.assert_close(box_loss, (deltas[positive] - torch.cat(targets)[positive]).abs().sum() / normalizer)
    # the box head: the ground-truth class's deltas, L1 over the foreground / all sampled proposals
    logits, regression = torch.randn(6, 3), torch.randn(6, 12)
    head_labels, head_targets = [torch.tensor([0, 2, 1, 0, 0, 2])], [torch.randn(6, 4)]
    losses = box_losses(logits, regression, head_labels, head_targets)
    chosen = regression.reshape(6, 3, 4)[[1, 2, 5], [2, 1, 2]]
    torch.testing.assert_close(losses["loss_box_reg"], (chosen - head_targets[0][[1, 2, 5]]).abs().sum() / 6)
    torch.testing.assert_close(losses["loss_classifier"], F.cross_entropy(logits, head_labels[0]))


def test_mask_targets_are_the_masks_cropped_with_aligned_roialign_and_binarised():
    gt = torch.zeros(2, 16, 16, dtype=torch.uint8)
    gt[0, :, :8] = 1  # the left half
    gt[1, 4:12, 4:12] = 1
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 4.0, 12.0, 12.0], [3.0, 3.0, 11.0, 11.0]])
    targets = mask_targets(gt, boxes, torch.tensor([0, 1, 1]), 4)
    assert targets.dtype == torch.bool
    assert targets[0, :, :2].all() and not targets[0, :, 2:].any()  # exactly the left half
    assert targets[1].all()  # the box is the square: every cell inside
    # shifted by a pixel: each cell of the first row and column is half outside the square (0.5: kept), the corner
    # cell three quarters (0.25: dropped)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[0, 0] = False
    assert torch.equal(targets[2], expected)
    # torchvision's unaligned soft targets are neither binary nor the left half
    soft = roi_align(gt[:1, None].float(), torch.tensor([[0.0, 0.0, 0.0, 16.0, 16.0]]), (4, 4), 1.0)[0, 0]
    assert not torch.equal(soft, targets[0].float())


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
