"""UperNet for semantic segmentation on an encoder's multi-scale features, as MMSegmentation builds it for ADE20K.

The backbone is any module that follows timm's `features_only` contract: `backbone(images)` returns a list of NCHW
maps, fine to coarse, and `backbone.feature_info.channels()` / `.reduction()` give their widths and strides. With
`timm.create_model(name, features_only=True, out_indices=...)` that is every timm encoder; for ConViT the four
levels are strides 4, 8, 16 and 32 (ConvMAE-B: 256, 384, 768, 768 channels).

    backbone maps --> UPerHead (PPM on the last map + FPN, fused at the first map's stride) --> logits at 1/4
                 \\-> FCNHead on the stride-16 map (auxiliary loss, training only)

`UperNet.forward` gives the training logits; `segmentation_loss` the loss; `UperNet.predict` the evaluation
probabilities at the label size (whole image or sliding window, optional multi-scale and flip augmentation).
Inputs are normalised images (ImageNet mean/std, as the encoders expect): normalisation belongs to the data.

The heads use BatchNorm; under DDP the caller converts them (and the backbone's) with
`training.sync_batchnorm.convert_sync_batchnorm`, so that their statistics span the batches of all processes, as the
recipe trains with SyncBN at 2 images per GPU: torch's SyncBatchNorm on CUDA, and on the CPU (gloo) the project's
`AllReduceBatchNorm`, which sums the statistics with one differentiable all-reduce.
"""
import re
from typing import List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from torchvision.ops import Conv2dNormActivation

from dmjd_encoders.models_convvit import matcher_without_tail
from util.seg_labels import IGNORE_INDEX

__all__ = ["PPM", "UPerHead", "FCNHead", "UperNet", "create_upernet", "segmentation_loss"]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    # align_corners=False throughout, as the ADE20K recipe (and the CSAIL reference UperNet) use.
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    """conv (no bias) -> BatchNorm -> ReLU, padded to keep the size."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=nn.BatchNorm2d,
                                activation_layer=nn.ReLU)


class _Classifier(nn.Sequential):
    """Dropout2d then a 1x1 conv to the classes (mmseg's `cls_seg`)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


def _init_head(module: nn.Module) -> None:
    """mmseg's initialisation: Kaiming-normal (fan_out, ReLU) convs, unit BatchNorm, classifier N(0, 0.01)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, _Classifier):
            nn.init.normal_(m[1].weight, std=0.01)
            nn.init.zeros_(m[1].bias)


class PPM(nn.Module):
    """Pyramid pooling: the map, and its average pools to s x s bins (each 1x1 conv-BN-ReLU to `channels`,
    upsampled back), concatenated and fused by a 3x3 conv-BN-ReLU to `channels`."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_bn_relu(in_channels, channels, 1))
                                    for scale in pool_scales)
        self.bottleneck = _conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.bottleneck(torch.cat([x] + [_resize(stage(x), size) for stage in self.stages], dim=1))


class UPerHead(nn.Module):
    """UperNet's decoder (Xiao et al., 2018): PPM on the coarsest map, an FPN top-down pathway over the others.

    Lateral 1x1 conv-BN-ReLU of every map but the last to `channels`; the PPM output is the top of the pyramid; each
    level adds its upsampled coarser neighbour, then a 3x3 conv-BN-ReLU (not on the PPM level); all levels are
    upsampled to the finest one, concatenated, fused by a 3x3 conv-BN-ReLU, and classified (dropout, 1x1 conv).
    Returns logits at the finest map's size.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        if not in_channels:
            raise ValueError("UPerHead needs at least one feature map")
        self.ppm = PPM(in_channels[-1], channels, pool_scales)
        self.lateral_convs = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = _conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.classifier = _Classifier(channels, num_classes, dropout)
        _init_head(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)] + [self.ppm(features[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down, out of place: the ReLU outputs are saved for backward
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.classifier(self.fpn_bottleneck(torch.cat([_resize(x, size) for x in outs], dim=1)))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv-BN-ReLU to `channels`, dropout, 1x1 conv to the classes (mmseg's FCNHead
    with num_convs=1, concat_input=False)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = _conv_bn_relu(in_channels, channels, 3)
        self.classifier = _Classifier(channels, num_classes, dropout)
        _init_head(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class UperNet(nn.Module):
    """backbone (timm `features_only` contract) + UPerHead + optional auxiliary FCNHead.

    Args:
        backbone: returns a list of NCHW maps; `backbone.feature_info.channels()` / `.reduction()` describe them.
        num_classes: classes predicted (ADE20K: 150, after reduce_zero_label).
        channels: width of the UPerHead (mmseg's default 512; ConvMAE-B's ADE20K config uses 768).
        aux_in_index: which map feeds the auxiliary FCN head (2: the stride-16 map of a 4-level backbone);
            None builds no auxiliary head.
        size_divisor: inference pads its inputs (bottom/right, zeros: the mean colour after normalisation) to a
            multiple of this, so that every map covers the image exactly; default: the coarsest map's stride.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_in_index: Optional[int] = 2, aux_channels: int = 256,
                 dropout: float = 0.1, size_divisor: Optional[int] = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.in_channels = list(backbone.feature_info.channels())
        reductions = list(backbone.feature_info.reduction())
        if aux_in_index is not None and not -len(self.in_channels) <= aux_in_index < len(self.in_channels):
            raise ValueError(f"aux_in_index {aux_in_index} is not one of the backbone's {len(self.in_channels)} maps")
        self.num_classes = num_classes
        self.aux_in_index = aux_in_index
        self.size_divisor = max(reductions) if size_divisor is None else size_divisor
        self.decode_head = UPerHead(self.in_channels, num_classes, channels, pool_scales, dropout)
        self.auxiliary_head = None if aux_in_index is None else \
            FCNHead(self.in_channels[aux_in_index], num_classes, aux_channels, dropout)

    # -- optimizer groups ---------------------------------------------------------------------------------------------
    def _encoder(self) -> nn.Module:
        """The encoder inside a timm features_only wrapper (FeatureGetterNet keeps it as `.model`)."""
        encoder = getattr(self.backbone, "model", None)
        if encoder is None or not hasattr(encoder, "group_matcher"):
            raise TypeError(f"layer groups need a timm encoder wrapped by features_only=True with a group_matcher; "
                            f"the backbone is a {type(self.backbone).__name__}")
        return encoder

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise lr decay (timm.optim.param_groups_layer_decay), as ConvMAE's segmentation
        optimizer makes them: the encoder's own groups (its `group_matcher`, under `backbone.model.`), except that
        what the encoder puts with its last block (timm's MATCH_PREV_GROUP: a final norm, ConViT's stride-32 level)
        joins both heads in a last layer of their own. For ConViT-B: stages 1-2, the patch embeddings and the
        position embedding are layer 0, stage-3 block i is layer i + 1, the rest layer 12 (13 layers)."""
        prefix = r"^" + re.escape("backbone.model.")
        matcher, after_blocks = matcher_without_tail(self._encoder().group_matcher(coarse))

        def scoped(pattern: str) -> str:
            return prefix + "(?:" + pattern.removeprefix("^") + ")"

        return dict(stem=scoped(matcher["stem"]), blocks=[(scoped(p), suffix) for p, suffix in matcher["blocks"]],
                    last="|".join([scoped(p) for p in after_blocks] + [r"^(?:decode_head|auxiliary_head)\."]))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The encoder's parameters without weight decay (e.g. its position embedding), by their names here."""
        encoder = self._encoder()
        names = encoder.no_weight_decay() if hasattr(encoder, "no_weight_decay") else set()
        return {f"backbone.model.{name}" for name in names}

    def extract_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        features = list(self.backbone(images))
        if len(features) != len(self.in_channels):
            raise ValueError(f"the backbone returned {len(features)} maps, but its feature_info describes "
                             f"{len(self.in_channels)}")
        return features

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """images [N, 3, H, W] -> (logits at the finest map's size, auxiliary logits at the aux map's size).

        The auxiliary logits are computed in training mode only (they only feed the loss); in eval mode, None."""
        features = self.extract_features(images)
        logits = self.decode_head(features)
        aux = self.auxiliary_head(features[self.aux_in_index]) \
            if self.auxiliary_head is not None and self.training else None
        return logits, aux

    # -- inference ----------------------------------------------------------------------------------------------------
    def logits_at_input_size(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder logits upsampled to the input's size, float32 [N, C, H, W] (the input is padded to a multiple of
        `size_divisor` for the forward pass and the padding cropped off again)."""
        h, w = images.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = -h % d, -w % d
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        logits = self.decode_head(self.extract_features(images)).float()
        return _resize(logits, images.shape[-2:])[..., :h, :w]

    def slide_logits(self, images: torch.Tensor, crop_size: Union[int, Sequence[int]],
                     stride: Union[int, Sequence[int]]) -> torch.Tensor:
        """Sliding-window logits at the input size, float32 [N, C, H, W], as mmseg's slide inference.

        Windows of `crop_size` every `stride` pixels; the last row/column of windows is shifted back to end at the
        border; logits are averaged where windows overlap. A side shorter than the crop is taken whole (no padding
        to the crop size)."""
        (crop_h, crop_w), (stride_h, stride_w) = to_2tuple(crop_size), to_2tuple(stride)
        if min(crop_h, crop_w, stride_h, stride_w) < 1:
            raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
        n, _, h, w = images.shape
        rows = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
        cols = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
        total = images.new_zeros((n, self.num_classes, h, w), dtype=torch.float32)
        count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride_h + crop_h, h), min(c * stride_w + crop_w, w)
                y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
                total[:, :, y1:y2, x1:x2] += self.logits_at_input_size(images[:, :, y1:y2, x1:x2])
                count[:, :, y1:y2, x1:x2] += 1
        return total / count

    @torch.no_grad()
    def predict(self, images: torch.Tensor, out_size: Sequence[int], mode: str = "whole",
                crop_size: Union[int, Sequence[int]] = 512, stride: Union[int, Sequence[int]] = 341,
                ratios: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
        """Class probabilities [N, C, *out_size] (float32) for normalised images [N, 3, H, W].

        mode "whole" runs the image at once, "slide" by overlapping windows (`crop_size`, `stride`). For each ratio
        in `ratios` the input is rescaled (bilinear) to round(ratio x its size), and with `flip` also run mirrored;
        each run's logits are resized to `out_size` (the original label size) and turned into probabilities, which
        are averaged over the runs, as mmseg's multi-scale + flip test. Images of a batch share one size: evaluate
        images of different sizes one at a time. Call it on the model in eval mode (BatchNorm and dropout).
        """
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if not ratios or min(ratios) <= 0:
            raise ValueError(f"ratios must be positive, got {list(ratios)}")
        out_size = tuple(int(s) for s in out_size)
        h, w = images.shape[-2:]
        probs = None
        runs = 0
        for ratio in ratios:
            scaled = images if ratio == 1 else _resize(images, (max(1, int(h * ratio + 0.5)),
                                                                max(1, int(w * ratio + 0.5))))
            for flipped in ((False, True) if flip else (False,)):
                x = scaled.flip(-1) if flipped else scaled
                logits = self.slide_logits(x, crop_size, stride) if mode == "slide" else self.logits_at_input_size(x)
                p = _resize(logits, out_size).softmax(dim=1)
                p = p.flip(-1) if flipped else p
                probs = p if probs is None else probs + p
                runs += 1
        return probs / runs


def create_upernet(encoder: str, num_classes: int, out_indices: Optional[Sequence[int]] = None,
                   channels: int = 512, aux_in_index: Optional[int] = 2, aux_channels: int = 256,
                   pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, **encoder_kwargs) -> UperNet:
    """UperNet on `timm.create_model(encoder, features_only=True, out_indices=...)`; encoder_kwargs go to timm
    (e.g. img_size, drop_path_rate). out_indices None takes the encoder's default levels."""
    if out_indices is not None:
        encoder_kwargs["out_indices"] = tuple(out_indices)
    backbone = timm.create_model(encoder, features_only=True, **encoder_kwargs)
    return UperNet(backbone, num_classes, channels=channels, pool_scales=pool_scales, aux_in_index=aux_in_index,
                   aux_channels=aux_channels, dropout=dropout)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels, on logits upsampled (bilinear) to the label size; 0 (with a
    gradient path) when every pixel is ignored, rather than PyTorch's NaN."""
    logits = _resize(logits.float(), labels.shape[-2:])
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, aux_logits: Optional[torch.Tensor] = None,
                      aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX) -> dict:
    """{"loss": decode + aux_weight x aux, "loss_decode", "loss_aux" (when aux_logits is given)}.

    labels: int64 [N, H, W] in [0, num_classes) or `ignore_index`. The mean runs over the labelled pixels only
    (PyTorch's convention; mmseg's default also divides by the ignored ones, which under AdamW only rescales a
    step's gradient).
    """
    if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [N, H, W] for logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    losses = {"loss_decode": _cross_entropy(logits, labels, ignore_index)}
    losses["loss"] = losses["loss_decode"]
    if aux_logits is not None:
        losses["loss_aux"] = _cross_entropy(aux_logits, labels, ignore_index)
        losses["loss"] = losses["loss"] + aux_weight * losses["loss_aux"]
    return losses
