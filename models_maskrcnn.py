"""Mask R-CNN with FPN on the encoders' multi-scale features, as ConvMAE's DET and ViTDet build it in detectron2, from
torchvision's detection parts (the improved heads of its `maskrcnn_resnet50_fpn_v2`, the ViTDet benchmark's).

    backbone   a ConViT, as ConvMAE's DET: the encoder's four levels (strides 4, 8, 16 and 32, the last one max
               pooled from the stride-16 map) through an FPN of 256 channels with BatchNorm (SyncBN when the run has
               several processes: training.sync_batchnorm), P6 by max pooling;
               a plain ViT, as ViTDet: the encoder's simple feature pyramid (its own 1 x 1 and 3 x 3 convs with
               LayerNorm, 256 channels each, dmjd_encoders.dense.SimpleFeaturePyramid), no top-down merge, P6 by
               subsampling P5 (detectron2's LastLevelMaxPool)
    RPN        2 convs (no norm, as both configs), anchors 32 to 512 at strides 4 to 64, aspect ratios 0.5 / 1 / 2
    box head   4 convs + 1 fc of 1024 on 7 x 7 RoIAlign (aligned: ROIAlignV2); BatchNorm (ConvMAE) or LayerNorm
               (ViTDet) after each conv
    mask head  4 convs (same norm) + a transposed conv on 14 x 14 RoIAlign (aligned)

The sampling and NMS numbers are ConvMAE's config's (`DET/configs/convmae/convmae_base_mask_rcnn_FPN_100ep.py`,
detectron2's defaults where it keeps them), which ViTDet's (`mask_rcnn_vitdet_b_100ep.py`) shares.

Losses and targets are detectron2's (torchvision's differ): L1 box regression (smooth-L1 with beta 0) in the RPN and
the box head; the RPN's two losses summed over the sampled anchors and divided by 256 x images; mask targets the
ground-truth masks cropped into each box with aligned RoIAlign at 28 x 28 and binarised at 0.5 (BitMasks
.crop_and_resize), where torchvision takes unaligned, soft targets.

Precision is detectron2's under autocast: the heads compute in the autocast dtype, but what they give (objectness,
box deltas, class logits, mask logits) is fp32, anchors are fp32, and boxes are decoded in fp32 (`Fp32BoxCoder`):
proposals in training, detections in evaluation. torchvision decodes in the deltas' dtype and makes anchors in the
features', which under bf16 puts every box edge on bf16's grid, 4 px apart at 1024 px.

Geometry is ConvMAE's and ViTDet's test geometry, in training and evaluation alike: every image (an already resized
test image, a large-scale-jitter crop) is padded at the bottom and right to one square of `image_size`
(`SquareTransform`), so that an image's token grid, position embeddings and global attention never depend on the
other images of its batch; proposals and detections are clipped to the unpadded image. The model does not resize
(util.det_transforms does). In evaluation it returns boxes in the input image's pixels and masks as [N, 1, 28, 28]
probabilities within their boxes; util.det_transforms.detections_in maps both to any size of the image (the original
one for COCO's AP), pasting the masks there with aligned sampling.
"""
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from dmjd_encoders.models_convvit import is_plain_vit

FPN_CHANNELS = 256
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one per level, strides 4 to 64
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# ImageNet's mean and std for images in [0, 1] (the config's 123.675, ... in [0, 255])
PIXEL_MEAN, PIXEL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the config's RPN and RoI heads (detectron2's StandardRPNHead / StandardROIHeads numbers)
RPN = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
           pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=1000, testing=1000),
           nms_thresh=0.7)
ROI = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
           score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
RPN_BOX_WEIGHTS, ROI_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)  # Box2BoxTransform's weights
MASK_SIZE = 28  # the mask head's output side: 14 x 14 RoIAlign, doubled by its transposed conv
LOSS_NAMES = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


# -- fp32 where detectron2 computes in fp32 ---------------------------------------------------------------------------
class Fp32BoxCoder(BoxCoder):
    """torchvision's box coder, decoding in fp32 whatever the deltas' dtype (detectron2's Box2BoxTransform
    .apply_deltas: `deltas.float()`): torchvision's casts the reference boxes to the deltas' dtype."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


class Fp32AnchorGenerator(AnchorGenerator):
    """detectron2's anchors (DefaultAnchorGenerator, offset 0): torchvision's, with their corners not rounded to whole
    pixels, and in fp32 whatever the features' dtype (torchvision's take the features' dtype: bf16 anchors under
    autocast). Only the maps' sizes and device are read, so it is given empty stand-ins of them."""

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """Anchors of each size (sqrt of the area) and aspect ratio (height / width) centred on 0: w = s / sqrt(a),
        h = s * sqrt(a)."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device).sqrt()
        widths, heights = (scales[None, :] / ratios[:, None]).flatten(), (scales[None, :] * ratios[:, None]).flatten()
        return torch.stack([-widths, -heights, widths, heights], dim=1) / 2

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        grids = [torch.empty((0, 0, *f.shape[-2:]), device=f.device) for f in feature_maps]
        return super().forward(image_list, grids)


class Fp32RPNHead(RPNHead):
    """torchvision's RPN head (convs without norm), its objectness logits and box deltas in fp32."""

    def forward(self, x: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Fp32BoxPredictor(FastRCNNPredictor):
    """Class logits and per-class box deltas, in fp32."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class Fp32MaskPredictor(MaskRCNNPredictor):
    """The mask head's transposed conv and per-class logits, in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).float()


# -- detectron2's losses ----------------------------------------------------------------------------------------------
class DetectronRPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's losses: objectness BCE and L1 box regression (smooth-L1 with beta 0),
    each summed over the sampled anchors and divided by the anchors sampled per image x images."""

    def compute_loss(self, objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor, labels: List[torch.Tensor],
                     regression_targets: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive))[0]
        sampled = torch.cat([positive, torch.where(torch.cat(negative))[0]])
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled],
                                                             reduction="sum")
        box_loss = F.l1_loss(pred_bbox_deltas[positive], regression_targets[positive], reduction="sum")
        return objectness_loss / normalizer, box_loss / normalizer


def box_losses(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: List[torch.Tensor],
               regression_targets: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The box head's losses, as detectron2's FastRCNNOutputLayers: cross-entropy over the sampled proposals, and the
    L1 distance of the ground-truth class's deltas to their targets, summed over the foreground and divided by all
    sampled proposals."""
    labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
    foreground = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(len(labels), -1, 4)[foreground, labels[foreground]]
    box_loss = F.l1_loss(deltas, regression_targets[foreground], reduction="sum") / max(labels.numel(), 1)
    return {"loss_classifier": F.cross_entropy(class_logits, labels), "loss_box_reg": box_loss}


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int) -> torch.Tensor:
    """bool [N, size, size]: the ground-truth masks `gt_masks[matched]` [G, H, W] cropped into `boxes` [N, 4] with
    aligned RoIAlign (half-pixel centres) and binarised at 0.5, as detectron2's BitMasks.crop_and_resize."""
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    crops = roi_align(gt_masks[:, None].to(boxes.dtype), rois, (size, size), 1.0, sampling_ratio=0, aligned=True)
    return crops[:, 0] >= 0.5


def mask_loss(mask_logits: torch.Tensor, boxes: List[torch.Tensor], gt_masks: List[torch.Tensor],
              labels: List[torch.Tensor], matched: List[torch.Tensor]) -> torch.Tensor:
    """Per-pixel BCE of the ground-truth class's mask logits [N, C + 1, M, M] against `mask_targets`, averaged over
    the foreground proposals (detectron2's mask_rcnn_loss); 0, with gradients, when an image has none."""
    size = mask_logits.shape[-1]
    targets = torch.cat([mask_targets(m, b, i, size) for m, b, i in zip(gt_masks, boxes, matched)])
    labels = torch.cat(labels)
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


class DetectronRoIHeads(RoIHeads):
    """torchvision's box and mask RoI heads with detectron2's losses (`box_losses`, `mask_loss`). In evaluation each
    detection gets the mask probabilities of its class within its box, [N, 1, M, M] (not pasted into the image:
    util.det_transforms.detections_in pastes them at the size asked for)."""

    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training:
            proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if not self.training:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            probabilities = self._mask_logits(features, boxes, image_shapes).sigmoid()
            classes = torch.cat(labels)
            probabilities = probabilities[torch.arange(len(classes), device=classes.device), classes][:, None]
            return [{"boxes": b, "labels": l, "scores": s, "masks": m}
                    for b, l, s, m in zip(boxes, labels, scores, probabilities.split([len(b) for b in boxes]))], {}
        losses = box_losses(class_logits, box_regression, labels, regression_targets)
        foreground = [torch.where(image_labels > 0)[0] for image_labels in labels]
        mask_boxes = [p[i] for p, i in zip(proposals, foreground)]
        losses["loss_mask"] = mask_loss(self._mask_logits(features, mask_boxes, image_shapes), mask_boxes,
                                        [t["masks"] for t in targets], [l[i] for l, i in zip(labels, foreground)],
                                        [m[i] for m, i in zip(matched, foreground)])
        return [], losses

    def _mask_logits(self, features, boxes: List[torch.Tensor], image_shapes) -> torch.Tensor:
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))


# -- geometry ---------------------------------------------------------------------------------------------------------
class SquareTransform(GeneralizedRCNNTransform):
    """torchvision's batching with ConvMAE's / ViTDet's geometry: images are normalised and padded at the bottom and
    right to one `size` x `size` square (zero after normalising: the mean colour), whatever their batch; they are not
    resized (the data transforms resize them), and an image larger than the square is refused. The sizes the RPN and
    RoI heads clip to are the unpadded images'. Evaluation's outputs are left in the input images' pixels
    (see the module's notes)."""

    def __init__(self, size: int):
        super().__init__(size, size, list(PIXEL_MEAN), list(PIXEL_STD), size_divisible=1)
        self.size = size

    def resize(self, image: torch.Tensor, target=None):
        if image.shape[-2] > self.size or image.shape[-1] > self.size:
            raise ValueError(f"an image of {image.shape[-2]} x {image.shape[-1]} pixels does not fit the model's "
                             f"{self.size} x {self.size} square: resize it to a longest side of at most {self.size} "
                             f"(util.det_transforms.DetEvalTransform)")
        return image, target

    def batch_images(self, images: List[torch.Tensor], size_divisible: int = 1) -> torch.Tensor:
        batch = images[0].new_zeros(len(images), images[0].shape[0], self.size, self.size)
        for padded, image in zip(batch, images):
            padded[:, :image.shape[-2], :image.shape[-1]].copy_(image)
        return batch

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


# -- backbone ---------------------------------------------------------------------------------------------------------
class EncoderFPN(nn.Module):
    """An encoder's four feature maps (timm features_only) as the detection backbone: an ordered dict of maps at
    strides 4 to 64 ("0" to "3" and "pool"), `out_channels` each. `top_down`: through an FPN (ConvMAE's: lateral and
    output convs with BatchNorm, nearest-upsampled top-down sums, P6 by max pooling); else the encoder's levels as
    they are (ViTDet's simple pyramid, already `out_channels` wide), P6 by subsampling the last one."""

    def __init__(self, encoder: nn.Module, out_channels: int = FPN_CHANNELS, top_down: bool = True):
        super().__init__()
        self.body = encoder
        self.strides = list(encoder.feature_info.reduction())
        channels = list(encoder.feature_info.channels())
        if not top_down and set(channels) != {out_channels}:
            raise ValueError(f"without an FPN the encoder's levels must be {out_channels} channels wide, got {channels}")
        self.fpn = (FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool(),
                                          norm_layer=nn.BatchNorm2d) if top_down else None)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        levels = OrderedDict((str(i), f) for i, f in enumerate(self.body(images)))
        if self.fpn is not None:
            return self.fpn(levels)
        levels["pool"] = F.max_pool2d(levels[str(len(levels) - 1)], kernel_size=1, stride=2)
        return levels


class RoIAlignV2(MultiScaleRoIAlign):
    """RoIAlign over the FPN levels with half-pixel alignment (detectron2's ROIAlignV2; torchvision's
    MultiScaleRoIAlign, whose place it takes, does not align): each box is pooled from the level of its size,
    k = floor(4 + log2(sqrt(area) / 224)) clamped to the levels given (the FPN paper's rule, as both libraries assign
    them), at the level's known stride."""

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int,
                 canonical_size: float = 224.0, canonical_level: int = 4):
        super().__init__(list(featmap_names), output_size, sampling_ratio=0)
        self.featmap_names, self.strides, self.output_size = list(featmap_names), list(strides), output_size
        self.canonical_size, self.canonical_level = canonical_size, canonical_level
        self.min_level, self.max_level = (int(round(math.log2(s))) for s in (strides[0], strides[-1]))

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
        level = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_size + 1e-8))
        return level.clamp(self.min_level, self.max_level).to(torch.int64) - self.min_level

    def forward(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        maps = [features[name] for name in self.featmap_names]
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], self.output_size, self.output_size))
        levels = self.levels(rois[:, 1:])
        for k, (feature, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(levels == k)[0]
            pooled = roi_align(feature, rois[index], self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=0, aligned=True)
            out.index_copy_(0, index, pooled.to(out.dtype))
        return out


def init_heads_as_detectron2(roi_heads: RoIHeads) -> None:
    """detectron2's initialisation where torchvision's differs: the box head's fully connected layers as
    c2_xavier_fill (Kaiming uniform, a = 1, zero bias), the class scores and box deltas from normal(0, 0.01) and
    normal(0, 0.001) with zero biases (FastRCNNOutputLayers), the mask head's transposed conv as c2_msra_fill and its
    logits from normal(0, 0.001) (MaskRCNNConvUpsampleHead). The convs of both heads and of the RPN already are."""
    for layer in roi_heads.box_head.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=1)
            nn.init.zeros_(layer.bias)
    predictor = roi_heads.box_predictor
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001),
                       (roi_heads.mask_predictor.mask_fcn_logits, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    upsample = roi_heads.mask_predictor.conv5_mask
    nn.init.kaiming_normal_(upsample.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(upsample.bias)


def create_mask_rcnn(encoder_name: str, num_classes: int, image_size: int, fpn_channels: int = FPN_CHANNELS,
                     rois_per_image: int = ROI["batch_size_per_image"], **encoder_kwargs) -> GeneralizedRCNN:
    """Mask R-CNN on the multi-scale features of `encoder_name` (a timm model of this project's encoders) for
    `num_classes` classes (background excluded), on images padded to `image_size` squares. A ConViT gets ConvMAE's
    DET detector (stride-32 level by max pooling, FPN, BatchNorm heads), a plain ViT ViTDet's (simple pyramid of
    `fpn_channels`, no FPN, LayerNorm heads); `encoder_kwargs` (windows, relative positions, ...) go to the encoder.
    `fpn_channels` (256) and `rois_per_image` (512 sampled for the box head in training) are the recipe's; smaller
    ones make the CPU's tests and checks affordable (the box head's 4 convs on 512 RoIs: ~60 G multiply-adds, ~120
    GFLOPs, an image)."""
    vitdet = is_plain_vit(encoder_name)
    if vitdet:
        encoder_kwargs = dict(dict(simple_pyramid=True, pyramid_channels=fpn_channels), **encoder_kwargs)
    else:
        encoder_kwargs = dict(dict(stride32_level="maxpool"), **encoder_kwargs)
    encoder = timm.create_model(encoder_name, features_only=True, **encoder_kwargs)
    strides = list(encoder.feature_info.reduction())
    if len(strides) != 4:
        raise ValueError(f"{encoder_name} gives {len(strides)} feature levels (strides {strides}); Mask R-CNN's FPN "
                         f"takes four, strides 4 to 32")
    backbone = EncoderFPN(encoder, fpn_channels, top_down=not vitdet)
    norm = LayerNorm2d if vitdet else nn.BatchNorm2d
    names = [str(i) for i in range(4)]
    anchors = Fp32AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    rpn = DetectronRPN(anchors, Fp32RPNHead(fpn_channels, len(ASPECT_RATIOS), conv_depth=2), **RPN)
    rpn.box_coder = Fp32BoxCoder(RPN_BOX_WEIGHTS)
    roi_heads = DetectronRoIHeads(
        RoIAlignV2(names, strides, 7), FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [1024], norm),
        Fp32BoxPredictor(1024, num_classes + 1), bbox_reg_weights=ROI_BOX_WEIGHTS,
        mask_roi_pool=RoIAlignV2(names, strides, MASK_SIZE // 2),
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1, norm_layer=norm),
        mask_predictor=Fp32MaskPredictor(fpn_channels, fpn_channels, num_classes + 1),
        **{**ROI, "batch_size_per_image": rois_per_image})
    roi_heads.box_coder = Fp32BoxCoder(ROI_BOX_WEIGHTS)
    init_heads_as_detectron2(roi_heads)
    return GeneralizedRCNN(backbone, rpn, roi_heads, SquareTransform(image_size))


def detection_loss(losses: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(the sum, the named parts detached) of Mask R-CNN's training losses, in LOSS_NAMES' order."""
    total = sum(losses[name] for name in LOSS_NAMES[1:])
    return total, {name: losses[name].detach() for name in LOSS_NAMES[1:]}
