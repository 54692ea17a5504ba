"""Mask R-CNN with FPN on the encoders' multi-scale features, as ConvMAE's DET and ViTDet build it, from torchvision's
detection parts (the improved heads of its `maskrcnn_resnet50_fpn_v2`, the ViTDet benchmark's).

    backbone   the encoder (timm features_only: strides 4, 8, 16, 32), then an FPN of 256 channels with BatchNorm
               (SyncBN when the run has several processes: training.sync_batchnorm) and P6 by max pooling
    RPN        2 convs, anchors 32 to 512 at strides 4 to 64, aspect ratios 0.5 / 1 / 2
    box head   4 convs (BatchNorm) + 1 fc of 1024 on 7 x 7 RoIAlign (aligned: ROIAlignV2)
    mask head  4 convs (BatchNorm) + a transposed conv on 14 x 14 RoIAlign (aligned)

The sampling and NMS numbers are ConvMAE's config's (`DET/configs/convmae/convmae_base_mask_rcnn_FPN_100ep.py`,
detectron2's defaults where it keeps them). Images come already resized and cropped (util's large-scale jitter at
training, longest side --input_size at test); torchvision's own resize is set to leave them as they are.
"""
import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

FPN_CHANNELS = 256
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one per level, strides 4 to 64
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# ImageNet's mean and std for images in [0, 1] (the config's 123.675, ... in [0, 255])
PIXEL_MEAN, PIXEL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the config's RPN and RoI heads (detectron2's StandardRPNHead / StandardROIHeads numbers)
RPN = dict(rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_train=1000,
           rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.7, rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3,
           rpn_batch_size_per_image=256, rpn_positive_fraction=0.5)
ROI = dict(box_batch_size_per_image=512, box_positive_fraction=0.25, box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5,
           box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100)
LOSS_NAMES = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class EncoderFPN(nn.Module):
    """An encoder's feature maps (timm features_only) through an FPN with P6 by max pooling: the torchvision
    detection backbone (an ordered dict of maps, `out_channels` each)."""

    def __init__(self, encoder: nn.Module, out_channels: int = FPN_CHANNELS):
        super().__init__()
        self.body = encoder
        self.strides = list(encoder.feature_info.reduction())
        self.fpn = FeaturePyramidNetwork(list(encoder.feature_info.channels()), out_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


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


def create_mask_rcnn(encoder_name: str, num_classes: int, image_size: int, fpn_channels: int = FPN_CHANNELS,
                     rois_per_image: int = ROI["box_batch_size_per_image"], **encoder_kwargs) -> MaskRCNN:
    """Mask R-CNN on the multi-scale features of `encoder_name` (a timm model of this project's encoders) for
    `num_classes` classes (background excluded), for images resized to at most `image_size` on their longest side.
    `fpn_channels` (256) and `rois_per_image` (512 sampled for the box head in training) are the recipe's; smaller
    ones make the CPU's tests and checks affordable (the box head's 4 convs on 512 RoIs: ~60 G multiply-adds, ~120
    GFLOPs, an image)."""
    encoder = timm.create_model(encoder_name, features_only=True, **encoder_kwargs)
    backbone = EncoderFPN(encoder, fpn_channels)
    if len(backbone.strides) != 4:
        raise ValueError(f"{encoder_name} gives {len(backbone.strides)} feature levels (strides "
                         f"{backbone.strides}); Mask R-CNN's FPN takes four, strides 4 to 32")
    names = [str(i) for i in range(4)]
    anchors = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    box_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [1024], norm_layer=nn.BatchNorm2d)
    mask_head = MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1, norm_layer=nn.BatchNorm2d)
    roi = {**ROI, "box_batch_size_per_image": rois_per_image}
    return MaskRCNN(backbone, num_classes=None, min_size=image_size, max_size=image_size,
                    image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD), rpn_anchor_generator=anchors,
                    rpn_head=RPNHead(fpn_channels, len(ASPECT_RATIOS), conv_depth=2),
                    box_roi_pool=RoIAlignV2(names, backbone.strides, 7), box_head=box_head,
                    box_predictor=FastRCNNPredictor(1024, num_classes + 1),
                    mask_roi_pool=RoIAlignV2(names, backbone.strides, 14), mask_head=mask_head,
                    mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1), **RPN, **roi)


def detection_loss(losses: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(the sum, the named parts detached) of Mask R-CNN's training losses, in LOSS_NAMES' order."""
    total = sum(losses[name] for name in LOSS_NAMES[1:])
    return total, {name: losses[name].detach() for name in LOSS_NAMES[1:]}
