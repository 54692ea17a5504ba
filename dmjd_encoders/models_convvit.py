"""Encoders for masked image modeling, as timm models: ConViT (ConvMAE's hybrid conv + transformer) and a plain ViT.

Both follow timm's model contract (`pretrained_cfg`, `forward_features` / `forward_head`, `reset_classifier`,
`features_only` / `forward_intermediates` / `prune_intermediate_layers`, `set_grad_checkpointing`,
`dynamic_img_size`) and add the masked entry point that pre-training uses:

- `forward_masked(x, mask, visible_ids=None)`: `x` [N, 3, H, W] normalised images at the built size, `mask` bool
  [N, L] with True = masked (every row masking the same number of tokens). Returns the final-norm tokens at the
  VISIBLE positions, in raster order, [N, L_visible, D] (a class token, if any, is used but not returned). Masked
  tokens are dropped before the transformer, as in MAE. `visible_ids` (from `visible_token_ids`) saves recomputing
  them. With a mask, ConViT's conv stages run at the visible tokens only (`sparse_stages=True`, the default): the
  same values as the dense masked stages, for a quarter fewer FLOPs per pre-training step of ConViT-B at the
  released mask ratio. It is a separate name because timm's `forward_features` takes no token mask.
- `forward_features(x)`: timm's meaning, the final-norm tokens [N, L, D] of the whole image (a ConViT built with
  `fuse_stages=True`, as in pre-training, adds its stage-1 and stage-2 projections before the norm).

Built with the defaults, a registered model is the pre-trained encoder as it is exported and shared: no classifier
(`num_classes=0`), the final norm, then the mean of the tokens (`global_pool="avg"`). Fine-tuning builds it with
`num_classes=N, fc_norm=True`: the mean of the tokens, then a fresh norm and the head (MAE / ConvMAE fine-tuning).

ConViT's parameter names follow the released ConvMAE/DMJD checkpoints (`patch_embed1..4`, `blocks1..3`, `norm`,
`stage1_output_decode`, `stage2_output_decode`) so that loading them needs no renaming. The ViT is timm's
`VisionTransformer` (no class token, average pooling, sin-cos initialised positions): timm's and MAE's ViT
checkpoints load with keys and values unchanged (with a class token, built with `class_token=True`). Shapes follow
the input size and the patch sizes; nothing assumes 224 pixels.
"""
import contextlib
import dataclasses
import difflib
import inspect
import logging
import math
import os
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, global_pool_nlc, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import (build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model,
                         register_model_deprecations)
from timm.models._features import feature_take_indices  # timm has no public import path for it
from timm.models.vision_transformer import VisionTransformer

from .checkpoint import LEGACY_KEY_RENAMES, load_checkpoint, rename_legacy_keys
from .dense import DenseOptions, SimpleFeaturePyramid, VITDET_PYRAMID_CHANNELS, set_token_grid
from .errors import UnknownModelError
from .model_card import ARXIV_ID, PAPER_NAME
from .names import ENCODER_NAMES, ENCODER_OF
from .pretrained import (adapt_first_conv, checkpoint_filter_fn, export_architecture, first_conv_key,
                         only_input_channels_differ, resample_pos_embed)
from .pos_embed import sincos_pos_embed_2d

_logger = logging.getLogger(__name__)

# timm files registered models under the last part of their module's name: timm.list_models(module=TIMM_MODULE).
TIMM_MODULE = __name__.rsplit(".", 1)[-1]

__all__ = ["ConvViT", "ViT", "LinearProbe", "PROBE_FEATURES", "gather_tokens", "visible_token_ids",
           "init_linear_and_norm", "checkpoint_filter_fn", "create_encoder", "ENCODER_ARCHS", "ENCODER_OF",
           "ENCODER_NAMES"]


BlockNorm = partial(nn.LayerNorm, eps=1e-6)


def visible_token_ids(mask: torch.Tensor, num_visible: Optional[int] = None) -> torch.Tensor:
    """Indices of the visible tokens of each row of a bool mask [N, L], in raster order: [N, L_visible].

    Every row must hide the same number of tokens (the masking functions guarantee it). Pass `num_visible` when it
    is known: counting it reads the mask back to the host, which stalls a GPU step.
    """
    if num_visible is None:
        num_visible = mask.shape[1] - int(mask[0].sum())
    # A stable sort of the 0/1 mask puts visible tokens first and keeps their raster order.
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [N, L, *rest], ids [N, M] -> [N, M, *rest]."""
    index = ids.reshape(*ids.shape, *([1] * (tokens.dim() - 2))).expand(-1, -1, *tokens.shape[2:])
    return torch.gather(tokens, 1, index)


def init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)  # as MAE / the JAX ViT
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_global_pool(global_pool, class_token: bool) -> None:
    if isinstance(global_pool, bool):
        raise ValueError(f"global_pool={global_pool}: it takes timm's pooling names ('avg', 'max', 'avgmax', '' for "
                         "none); the former True / False is now fc_norm=True (pool, then norm) / False (norm, then "
                         "pool)")
    allowed = ("", "avg", "max", "avgmax") + (("token",) if class_token else ())
    if global_pool not in allowed:
        raise ValueError(f"global_pool={global_pool!r}: this model pools with one of {allowed}")


class ConvPatchEmbed(nn.Module):
    """Non-overlapping convolution (kernel = stride = patch), then LayerNorm and GELU, on [N, C, H, W] maps."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(x)


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """ConvMAE's conv block: a 5x5 depth-wise "token mixer" between 1x1 convs, then a 1x1-conv MLP.

    With `visible` (float [N, 1, H, W], 1 = visible) the mixer's input is zeroed at masked positions, so the
    depth-wise conv never carries masked pixels into visible positions; every other op is per position.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    @staticmethod
    def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv1(self._norm(self.norm1, x))
        if visible is not None:
            y = y * visible
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(self._norm(self.norm2, x)))

    def forward_visible(self, x: torch.Tensor, ids: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """The same block on the visible positions only: `x` [N, M, S * S, C] holds, for each of the M visible
        tokens `ids` [N, M] of a `grid`, its S x S positions with channels last. Every op but the depth-wise mixer is
        per position, so it runs on these rows alone (1x1 convs as matmuls); the mixer sees them on a zero map,
        which is exactly the masked map of `forward`."""
        y = _pointwise(self.conv1, self.norm1(x))
        y = _depthwise_on_visible(self.attn, y, ids, grid)
        x = x + self.drop_path(_pointwise(self.conv2, y))
        h = _pointwise(self.mlp.fc2, self.mlp.act(_pointwise(self.mlp.fc1, self.norm2(x))))
        return x + self.drop_path(h)


def _weight_matrix(conv: nn.Conv2d) -> Tuple[torch.Tensor, bool]:
    """A conv weight [O, C, kh, kw] as a matrix [O, C * kh * kw] that is a view of it (so its gradient comes back
    with the parameter's own strides, which DDP's gradient buckets expect), and whether its columns run
    channels-last, (ky, kx, C), as with a channels-last weight, or (C, ky, kx)."""
    w = conv.weight
    if _channels_last_strides(w):
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), True
    return w.reshape(w.shape[0], -1), False


def _channels_last_strides(t: torch.Tensor) -> bool:
    """Exactly the strides of a channels-last [N, C, H, W] tensor (size-1 dims included, as DDP compares them)."""
    _, c, h, w = t.shape
    return t.stride() == (h * w * c, 1, w * c, c)


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv on channels-last rows [..., C_in] -> [..., C_out]."""
    return F.linear(x, _weight_matrix(conv)[0], conv.bias)


def _embed_within_tokens(conv: nn.Conv2d, x: torch.Tensor, side: int) -> torch.Tensor:
    """A non-overlapping conv (kernel = stride = k) inside each token: `x` [N, M, side * side, C] (each token's
    positions in raster order, channels last) -> [N, M, (side / k)^2, C_out]. Since k divides `side`, no window
    crosses a token's border, so the visible tokens alone give the conv's output at visible tokens."""
    n, m, _, c = x.shape
    k = conv.kernel_size[0]
    r = side // k
    weight, channels_last = _weight_matrix(conv)
    x = x.reshape(n, m, r, k, r, k, c)
    # each window's values in the weight's column order
    x = x.permute(0, 1, 2, 4, 3, 5, 6) if channels_last else x.permute(0, 1, 2, 4, 6, 3, 5)
    return F.linear(x.reshape(n, m, r * r, k * k * c), weight, conv.bias)


def _depthwise_on_visible(conv: nn.Conv2d, y: torch.Tensor, ids: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """The depth-wise conv of the map that holds `y` [N, M, S * S, C] at the visible tokens `ids` and zeros
    elsewhere, read back at the visible tokens."""
    n, _, s2, c = y.shape
    side, (gh, gw) = int(round(s2 ** 0.5)), grid
    dense = y.new_zeros(n, gh * gw, s2, c).scatter(1, ids[:, :, None, None].expand(-1, -1, s2, c), y)
    image = dense.reshape(n, gh, gw, side, side, c).permute(0, 1, 3, 2, 4, 5).reshape(n, gh * side, gw * side, c)
    image = image.permute(0, 3, 1, 2)  # an NCHW view of channels-last memory
    if not _channels_last_strides(conv.weight):
        image = image.contiguous()  # the conv then gives the weight's gradient in the weight's own layout
    out = conv(image)
    out = out.permute(0, 2, 3, 1).reshape(n, gh, side, gw, side, c).permute(0, 1, 3, 2, 4, 5)
    return gather_tokens(out.reshape(n, gh * gw, s2, c), ids)


@contextlib.contextmanager
def built_on(model: nn.Module, device=None, dtype: Optional[torch.dtype] = None):
    """timm's factory arguments, `create_model(name, device=..., dtype=...)`: the parameters and buffers made inside
    the `with` are made on `device` (the meta device builds shapes alone), and `model` is cast to `dtype` (a floating
    point type) at its end."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        yield
    if dtype is not None:
        model.to(dtype=dtype)


# torch.fx traces forward() with symbolic shapes, on which Python cannot branch: these two functions are leaves of
# any traced graph (torch.fx.wrap; timm's FX feature extraction included), run as they are.
@torch.fx.wrap
def check_input_size(x: torch.Tensor, stride: int, img_size: Tuple[int, int], dynamic: bool) -> None:
    height, width = x.shape[-2:]
    if dynamic:
        if height % stride or width % stride:
            raise ValueError(f"input of {(height, width)} pixels: both sides must be multiples of the model's "
                             f"stride {stride}")
    elif (height, width) != tuple(img_size):
        raise ValueError(f"input of {(height, width)} pixels, the model was built for {tuple(img_size)} "
                         "(build it with that img_size, or with dynamic_img_size=True)")


@torch.fx.wrap
def pos_embed_for_grid(pos_embed: torch.Tensor, tokens_map: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    """The position embedding for the token grid of `tokens_map` [N, D, gh, gw], resampled from the built
    `grid_size` when it differs (dynamic_img_size)."""
    grid = tuple(tokens_map.shape[-2:])
    if grid == tuple(grid_size):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=grid, old_size=grid_size, num_prefix_tokens=0)


class ConvViT(nn.Module):
    """ConViT: two conv stages (strides 4 and 2 by default) and a transformer stage on the visible tokens.

    `fuse_stages=True` (pre-training) adds projections of the stage-1 and stage-2 maps to the token width, gathered
    at the visible tokens and added after the transformer blocks, before the final norm (ConvMAE's multi-scale
    decoder input). `stride32_level` adds a fourth feature level at stride 32 from the stage-3 map: True or "conv" (set
    by `features_only=True`) ConvMAE's segmentation backbone's, a stride-2 3x3 conv, BatchNorm and GELU; "maxpool"
    its detection backbone's, 2 x 2 max pooling (ConvViTDet's `ms_adaptor`), with no parameters.

    Feature levels (`feature_info`, `forward_intermediates`): the stage-1 and stage-2 maps, the stage-3 tokens as a
    map (before the final norm unless `norm=True`), and the stride-32 level when built.
    """

    FIRST_CONV = "patch_embed1.proj"  # the conv that takes the image (timm's `first_conv`)

    def __init__(self, img_size=224, patch_size: Sequence[int] = (4, 2, 2), in_chans: int = 3,
                 embed_dim: Sequence[int] = (256, 384, 768), depth: Sequence[int] = (2, 2, 11), num_heads: int = 12,
                 mlp_ratio: Sequence[float] = (8.0, 8.0, 4.0), num_classes: int = 0, global_pool: str = "avg",
                 fc_norm: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 learnable_pos_embed: bool = False, dynamic_img_size: bool = False,
                 stride32_level: Union[bool, str] = False, fuse_stages: bool = False, sparse_stages: bool = True,
                 rel_pos_bias: bool = False, layer_scale: Optional[float] = None, window_size: int = 0,
                 global_blocks: Sequence[int] = (), rel_pos_layout: str = "per_block", device=None, dtype=None):
        super().__init__()
        if not (len(patch_size) == len(embed_dim) == len(depth) == len(mlp_ratio) == 3):
            raise ValueError("ConvViT takes three stages: patch_size, embed_dim, depth and mlp_ratio need 3 values")
        _check_global_pool(global_pool, class_token=False)
        self._set_geometry(img_size, patch_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim[2]
        self.num_prefix_tokens = 0
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.fuse_stages = fuse_stages
        self.sparse_stages = sparse_stages
        # dense transfer's options of the transformer blocks (dmjd_encoders.dense)
        self.dense = DenseOptions(rel_pos_bias, layer_scale, window_size, tuple(global_blocks), rel_pos_layout)
        self.dense.check(depth[2])
        self.dense_blocks = self.dense.per_block  # a plain bool for forward (TorchScript)

        with built_on(self, device, dtype):  # timm's factory arguments
            # Fixed sin-cos during pre-training (as MAE); a parameter so that fine-tuning can learn and resize it.
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim[2], self.grid_size).unsqueeze(0),
                                          requires_grad=learnable_pos_embed)
            self._build_stages(in_chans, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, fuse_stages)
            self._build_outputs(embed_dim[2], num_classes, fc_norm, drop_rate, stride32_level)
            self.feature_info = self._feature_levels(embed_dim, depth, stride32_level)
            self._init_weights(num_classes)

        self.register_load_state_dict_pre_hook(_resample_pos_embed_hook)
        self.register_load_state_dict_pre_hook(_adapt_first_conv_hook)

    def _set_geometry(self, img_size, patch_size: Sequence[int]) -> None:
        """The stage strides, the total stride (`patch_size`), the built input size and its token grid."""
        self.stage_strides = tuple(int(p) for p in patch_size)
        s1, s2, s3 = self.stage_strides
        self.patch_size = s1 * s2 * s3  # total stride from pixels to tokens
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"input size {self.img_size} must be divisible by the model's stride {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def _build_stages(self, in_chans: int, embed_dim: Sequence[int], depth: Sequence[int], num_heads: int,
                      mlp_ratio: Sequence[float], drop_path_rate: float, fuse_stages: bool) -> None:
        """The three stages' patch embeddings and blocks, and with `fuse_stages` the projections of the stage-1 and
        stage-2 maps to the token width."""
        s1, s2, s3 = self.stage_strides
        # stochastic depth rising linearly over all blocks (on the CPU, also when built under torch.device("meta"))
        dpr = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.patch_embed1 = ConvPatchEmbed(in_chans, embed_dim[0], s1)
        self.patch_embed2 = ConvPatchEmbed(embed_dim[0], embed_dim[1], s2)
        self.patch_embed3 = ConvPatchEmbed(embed_dim[1], embed_dim[2], s3)
        self.patch_embed4 = nn.Linear(embed_dim[2], embed_dim[2])
        self.blocks1 = nn.ModuleList([ConvBlock(embed_dim[0], mlp_ratio[0], dpr[i]) for i in range(depth[0])])
        self.blocks2 = nn.ModuleList([ConvBlock(embed_dim[1], mlp_ratio[1], dpr[depth[0] + i])
                                      for i in range(depth[1])])
        block = self.dense.block_fn(self.grid_size)
        self.blocks3 = nn.ModuleList([
            block(embed_dim[2], num_heads, mlp_ratio=mlp_ratio[2], qkv_bias=True, norm_layer=BlockNorm,
                  init_values=self.dense.layer_scale, drop_path=dpr[depth[0] + depth[1] + i], depth=i)
            for i in range(depth[2])])
        self.rel_pos_tables = self.dense.shared_tables(self.blocks3, self.grid_size, num_heads)
        if fuse_stages:
            self.stage1_output_decode = nn.Conv2d(embed_dim[0], embed_dim[2], s2 * s3, stride=s2 * s3)
            self.stage2_output_decode = nn.Conv2d(embed_dim[1], embed_dim[2], s3, stride=s3)

    def _build_outputs(self, width: int, num_classes: int, fc_norm: bool, drop_rate: float,
                       stride32_level: Union[bool, str]) -> None:
        """The final norm, the stride-32 level when asked for, and the classifier (pooled norm, dropout, head)."""
        # Global pooling with fc_norm replaces the final norm by a norm after pooling (MAE / ConvMAE fine-tuning).
        self.norm = nn.Identity() if fc_norm else BlockNorm(width)
        if stride32_level not in (False, None, True, "conv", "maxpool"):
            raise ValueError(f"stride32_level must be False, True / 'conv' or 'maxpool', got {stride32_level!r}")
        if stride32_level == "maxpool":
            # ConvMAE's detection backbone: MaxPool2d(2) of the stride-16 map (rounding up here, so that any multiple
            # of 16 gives a level, as the conv's padding below does; the same at multiples of 32)
            self.downsample32 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        elif stride32_level:
            # ConvMAE's segmentation backbone has no padding here (3x3 / 2 gives 15 x 15 from 32 x 32); padding 1
            # keeps the level at exactly a 32nd of an input that is a multiple of 32, and defined for any multiple of
            # 16.
            self.downsample32 = nn.Sequential(
                nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.GELU())
        else:
            self.downsample32 = None
        self.fc_norm = BlockNorm(width) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def _feature_levels(self, embed_dim: Sequence[int], depth: Sequence[int], stride32_level: bool) -> List[dict]:
        """timm's `feature_info`: each level's width, stride and `module`, the last block of each stage, which torch.fx
        feature extraction (feature_cls="fx") takes as the level (the stage-3 level then as its [N, L, D] tokens, as
        timm's ViTs give theirs)."""
        s1, s2, _ = self.stage_strides
        levels = [dict(num_chs=embed_dim[0], reduction=s1, module=f"blocks1.{depth[0] - 1}"),
                  dict(num_chs=embed_dim[1], reduction=s1 * s2, module=f"blocks2.{depth[1] - 1}"),
                  dict(num_chs=embed_dim[2], reduction=self.patch_size, module=f"blocks3.{depth[2] - 1}")]
        if stride32_level:
            levels.append(dict(num_chs=embed_dim[2], reduction=2 * self.patch_size, module="downsample32"))
        return levels

    def _init_weights(self, num_classes: int) -> None:
        self.apply(init_linear_and_norm)
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the last embed acts as a linear patch projection
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=2e-5)

    # -- timm's model interface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"} | _rel_pos_tables(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer groups for layer-wise lr decay: the conv stages, every patch embedding and the position embedding
        are layer 0, transformer block i is layer i + 1, the final norms and the head come last."""
        return dict(stem=r"^(?:pos_embed|patch_embed\d|blocks1\.|blocks2\.|stage\d_output_decode)",
                    blocks=[(r"^blocks3\.(\d+)", None), (r"^(?:norm|downsample32)", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every conv and transformer block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            _check_global_pool(global_pool, class_token=False)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.patch_embed1.proj.weight
        head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0
                else nn.Identity())
        self.head = head.train(self.training)  # a new head follows the model's mode, as every other module does

    def set_input_size(self, img_size) -> None:
        """Rebuilds for another input size: the position embedding is resampled to the new token grid."""
        img_size = to_2tuple(img_size)
        if img_size[0] % self.patch_size or img_size[1] % self.patch_size:
            raise ValueError(f"input size {img_size} must be divisible by the model's stride {self.patch_size}")
        grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        if grid != self.grid_size:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(self.pos_embed.data, new_size=grid,
                                                                 old_size=self.grid_size, num_prefix_tokens=0),
                                          requires_grad=self.pos_embed.requires_grad)
        self.img_size, self.grid_size, self.num_patches = img_size, grid, grid[0] * grid[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.patch_size, self.img_size, self.dynamic_img_size)
        self._check_not_pruned()
        stage1 = x = self._conv_blocks(self.blocks1, self.patch_embed1(x))
        stage2 = x = self._conv_blocks(self.blocks2, self.patch_embed2(x))
        x = self._transformer(self._tokens(x))
        if self.fuse_stages:
            x = x + self._fused_stages(stage1, stage2)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=0)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The feature levels `indices` (an int n: the last n; None: all) as NCHW maps (or NLC tokens), and unless
        `intermediates_only`, `forward_features`' output first: `(features, [maps])`. `norm` applies the final norm
        to the stage-3 level; `stop_early` (or `intermediates_only`) skips the stages after the last level taken."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.feature_info), indices)
        if not intermediates_only:
            last = max(last, 2) if stop_early else len(self.feature_info) - 1
            self._check_not_pruned()
        n = x.shape[0]
        grid = self._token_grid(x)

        def as_map(tokens):
            return tokens.transpose(1, 2).reshape(n, -1, *grid)

        def as_fmt(feature_map):
            return feature_map if output_fmt == "NCHW" else feature_map.flatten(2).transpose(1, 2)

        maps = []
        stage1 = x = self._conv_blocks(self.blocks1, self.patch_embed1(x))
        if 0 in take:
            maps.append(as_fmt(x))
        if last >= 1:
            stage2 = x = self._conv_blocks(self.blocks2, self.patch_embed2(x))
            if 1 in take:
                maps.append(as_fmt(x))
        if last >= 2:
            x = self._transformer(self._tokens(x))
            if 2 in take:
                level = self.norm(x) if norm else x
                maps.append(level if output_fmt == "NLC" else as_map(level))
            if 3 in take:
                maps.append(as_fmt(self.downsample32(as_map(x))))
        if intermediates_only:
            return maps
        if self.fuse_stages:
            x = x + self._fused_stages(stage1, stage2)
        return self.norm(x), maps

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops what the feature levels `indices` do not need (later stages, the stride-32 level, the pre-training
        fusion, the norm with `prune_norm`, the head with `prune_head`), so that every parameter left is used."""
        take, last = feature_take_indices(len(self.feature_info), indices)
        self.feature_info = self.feature_info[:last + 1]
        if last < 3:
            self.downsample32 = None
        if last < 2:
            self.patch_embed3 = self.patch_embed4 = self.pos_embed = None
            self.blocks3 = nn.ModuleList()
            self.norm = nn.Identity()
        if last < 1:
            self.patch_embed2 = None
            self.blocks2 = nn.ModuleList()
        if self.fuse_stages:
            self.fuse_stages = False
            del self.stage1_output_decode, self.stage2_output_decode
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    # -- the stages -------------------------------------------------------------------------------------------------
    def _token_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        check_input_size(x, self.patch_size, self.img_size, self.dynamic_img_size)
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def _check_not_pruned(self) -> None:
        if self.patch_embed3 is None:
            raise RuntimeError("the transformer stage was pruned (prune_intermediate_layers): only "
                               "forward_intermediates(..., intermediates_only=True) runs")

    def _conv_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, visible: Optional[torch.Tensor] = None):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            if visible is None:
                return checkpoint_seq(blocks, x)
            for blk in blocks:
                x = checkpoint(blk, x, visible)
            return x
        for blk in blocks:
            x = blk(x, visible)
        return x

    def _transformer(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks3, x)
        for blk in self.blocks3:
            x = blk(x)
        return x

    def _tokens(self, stage2: torch.Tensor) -> torch.Tensor:
        """Stage-3 patch embedding of the stage-2 map, as tokens [N, L, D] with their position embedding."""
        embedded = self.patch_embed3(stage2)
        if self.dense_blocks and not torch.jit.is_scripting():  # (a default model traces and scripts unchanged)
            set_token_grid(self.blocks3, embedded.shape[-2:])
        x = self.patch_embed4(embedded.flatten(2).transpose(1, 2))
        return x + pos_embed_for_grid(self.pos_embed, embedded, self.grid_size)

    def _fused_stages(self, stage1: torch.Tensor, stage2: torch.Tensor) -> torch.Tensor:
        return (self.stage1_output_decode(stage1).flatten(2).transpose(1, 2)
                + self.stage2_output_decode(stage2).flatten(2).transpose(1, 2))

    # -- pre-training: the masked entry point -----------------------------------------------------------------------
    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor,
                       visible_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final-norm tokens at the visible positions of `mask` [N, L] (True = masked), in raster order."""
        _check_masked_input(self, x, mask)
        ids = visible_token_ids(mask) if visible_ids is None else visible_ids
        if self.sparse_stages:
            return self._forward_visible(x, ids)
        return self._forward_masked_dense(x, mask, ids)

    def _visible_map(self, mask: torch.Tensor, scale: int) -> torch.Tensor:
        """Token mask [N, L] -> float visibility map [N, 1, gh * scale, gw * scale], 1 = visible."""
        visible = (~mask).reshape(-1, 1, *self.grid_size).float()
        return visible.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)

    def _forward_masked_dense(self, x: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The released masked path: the conv stages on the whole map, their mixers' inputs zeroed at masked tokens;
        the transformer on the visible tokens."""
        _, s2, s3 = self.stage_strides
        vis1 = self._visible_map(mask, s2 * s3).to(x.dtype)
        vis2 = self._visible_map(mask, s3).to(x.dtype)
        stage1 = x = self._conv_blocks(self.blocks1, self.patch_embed1(x), vis1)
        stage2 = x = self._conv_blocks(self.blocks2, self.patch_embed2(x), vis2)
        x = self._transformer(gather_tokens(self._tokens(x), ids))
        if self.fuse_stages:
            x = x + gather_tokens(self._fused_stages(stage1, stage2), ids)
        return self.norm(x)

    def _forward_visible(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`forward_masked` computing the conv stages at the visible tokens only.

        In the masked conv stages a masked position never reaches a visible one: the patch embeddings do not cross
        token borders, the mixers' inputs are zeroed at masked positions and every other op is per position. So
        the visible tokens' outputs need only their own positions: each visible token's pixels go through the
        stages as a [S x S, C] block of rows (the 1x1 convs and the MLP become matmuls on those rows), and the
        depth-wise mixers run on a map that is zero at the masked tokens. Same values as the dense path (a test
        checks outputs and gradients), with the conv stages' FLOPs cut by the mask ratio.
        """
        n = ids.shape[0]
        p, (gh, gw) = self.patch_size, self.grid_size
        _, s2, s3 = self.stage_strides
        # Each visible token's p x p pixels, channels last, in raster order: [N, M, p * p, 3].
        pixels = x.permute(0, 2, 3, 1).reshape(n, gh, p, gw, p, -1).permute(0, 1, 3, 2, 4, 5)
        pixels = gather_tokens(pixels.reshape(n, gh * gw, p * p, -1), ids)

        embed = self.patch_embed1
        x = embed.act(embed.norm(_embed_within_tokens(embed.proj, pixels, p)))
        x = self._visible_blocks(self.blocks1, x, ids)
        stage1 = x  # [N, M, (s2 * s3)^2, C1]
        embed = self.patch_embed2
        x = embed.act(embed.norm(_embed_within_tokens(embed.proj, x, s2 * s3)))
        x = self._visible_blocks(self.blocks2, x, ids)
        stage2 = x  # [N, M, s3^2, C2]
        embed = self.patch_embed3
        x = embed.act(embed.norm(_embed_within_tokens(embed.proj, x, s3))).squeeze(2)
        x = self.patch_embed4(x) + gather_tokens(self.pos_embed.expand(n, -1, -1), ids)
        x = self._transformer(x)
        if self.fuse_stages:
            x = x + _embed_within_tokens(self.stage1_output_decode, stage1, s2 * s3).squeeze(2)
            x = x + _embed_within_tokens(self.stage2_output_decode, stage2, s3).squeeze(2)
        return self.norm(x)

    def _visible_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk.forward_visible, x, ids, self.grid_size)
            else:
                x = blk.forward_visible(x, ids, self.grid_size)
        return x


def _check_masked_input(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    if model.dense.per_block:
        raise ValueError("a model built with rel_pos_bias or window_size is for dense transfer: its blocks take the "
                         "whole token grid, not the visible tokens of a mask")
    if tuple(x.shape[-2:]) != tuple(model.img_size):
        raise ValueError(f"input of {tuple(x.shape[-2:])} pixels, the model was built for {tuple(model.img_size)}")
    if mask.shape != (x.shape[0], model.num_patches):
        raise ValueError(f"mask of shape {tuple(mask.shape)}, expected {(x.shape[0], model.num_patches)}")


def _rel_pos_tables(model: nn.Module) -> set:
    """The names of the relative position tables (no weight decay on them, as ConvMAE's detection config)."""
    return {name for name, _ in model.named_parameters() if name.endswith("relative_position_bias_table")}


def _resample_pos_embed_hook(module, state_dict, prefix, *args) -> None:
    """Weights saved at another input size load into this model's grid on any load_state_dict (timm's
    `checkpoint_path` included, which has no filter function): their position embedding is resampled, as the pretrained
    path's checkpoint_filter_fn resamples it. Any other difference of shape still fails."""
    key, own = prefix + "pos_embed", module.pos_embed
    theirs = state_dict.get(key)
    if (own is not None and isinstance(theirs, torch.Tensor) and theirs.dim() == 3 and theirs.shape != own.shape
            and theirs.shape[-1] == own.shape[-1]):
        state_dict[key] = resample_pos_embed(theirs, module)


def _adapt_first_conv_hook(module, state_dict, prefix, *args) -> None:
    """RGB weights load into a model of other input channels (`in_chans`) on any load_state_dict (timm's
    `checkpoint_path` and dmjd_encoders.load_pretrained included), adapted as timm's pretrained path adapts them
    (adapt_first_conv). Any other difference of shape still fails."""
    key = prefix + first_conv_key(module)
    theirs, own = state_dict.get(key), module.get_submodule(module.FIRST_CONV).weight
    if only_input_channels_differ(theirs, own):
        state_dict[key] = adapt_first_conv(theirs, own.shape[1], key)


def _legacy_vit_keys_hook(module, state_dict, prefix, *args) -> None:
    rename_legacy_keys(state_dict, [prefix + new for new in LEGACY_KEY_RENAMES.values()])


class ViT(VisionTransformer):
    """timm's VisionTransformer as MAE / MaskFeat pre-train it: no class token, the mean of the tokens, a sin-cos
    initialised position embedding (fixed in pre-training, learnable with `learnable_pos_embed=True`), Xavier init.

    `class_token=True` builds MAE's layout (a class token with its own position, pooling still over the patch
    tokens, as MAE fine-tunes), in which timm's and MAE's ViT checkpoints load unchanged.

    Dense transfer (dmjd_encoders.dense): `rel_pos_bias`, `layer_scale`, `window_size` and `global_blocks` in every
    block; `simple_pyramid=True` makes the feature levels (`feature_info`, `forward_intermediates`, features_only)
    ViTDet's four, strides 4, 8, 16 and 32 of `pyramid_channels` each, from the last block's map; a registered ViT
    built with `features_only=True` takes it unless given `simple_pyramid=False` (then: blocks at stride 16).
    """

    FIRST_CONV = "patch_embed.proj"  # the conv that takes the image (timm's `first_conv`)

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 global_pool: str = "avg", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, class_token: bool = False, fc_norm: bool = False,
                 learnable_pos_embed: bool = False, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, dynamic_img_size: bool = False,
                 rel_pos_bias: bool = False, layer_scale: Optional[float] = None, window_size: int = 0,
                 global_blocks: Sequence[int] = (), simple_pyramid: bool = False,
                 pyramid_channels: int = VITDET_PYRAMID_CHANNELS, rel_pos_layout: str = "per_block", device=None,
                 dtype=None):
        _check_global_pool(global_pool, class_token)
        size = to_2tuple(img_size)
        if size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"input size {size} must be divisible by the model's stride {patch_size}")
        dense = DenseOptions(rel_pos_bias, layer_scale, window_size, tuple(global_blocks), rel_pos_layout)
        dense.check(depth)
        grid = (size[0] // patch_size, size[1] // patch_size)
        with built_on(self, device, dtype):  # timm's factory arguments
            super().__init__(img_size=size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio, qkv_bias=True, class_token=class_token, fc_norm=fc_norm,
                             dynamic_img_size=dynamic_img_size, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
                             attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, weight_init="skip",
                             init_values=layer_scale, block_fn=dense.block_fn(grid, int(class_token)))
            self.dense = dense
            self.rel_pos_tables = dense.shared_tables(self.blocks, grid, num_heads)
            if dense.per_block:
                self.patch_embed.register_forward_hook(self._grid_to_blocks)
            with torch.no_grad():
                grid = sincos_pos_embed_2d(embed_dim, self.patch_embed.grid_size)
                prefix = grid.new_zeros(self.num_prefix_tokens, embed_dim)  # MAE: a zero position for the class token
                self.pos_embed.copy_(torch.cat([prefix, grid]).unsqueeze(0))
            self.pos_embed.requires_grad_(learnable_pos_embed)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=0.02)
            self.apply(init_linear_and_norm)
            w = self.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if num_classes > 0:
                trunc_normal_(self.head.weight, std=2e-5)
            self.register_load_state_dict_pre_hook(_legacy_vit_keys_hook)
            self.register_load_state_dict_pre_hook(_resample_pos_embed_hook)
            self.register_load_state_dict_pre_hook(_adapt_first_conv_hook)
            self.pyramid = SimpleFeaturePyramid(embed_dim, pyramid_channels) if simple_pyramid else None
            if simple_pyramid:
                self.feature_info = [dict(num_chs=pyramid_channels, reduction=int(patch_size / scale),
                                          module=f"pyramid.outputs.{i}")
                                     for i, scale in enumerate(SimpleFeaturePyramid.SCALES)]

    @torch.jit.ignore
    def no_weight_decay(self):
        return set(super().no_weight_decay()) | _rel_pos_tables(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's layer groups; the simple pyramid goes after the last block, as the final norm does (a UperNet puts
        both with its heads, as it puts ConViT's stride-32 level)."""
        matcher = super().group_matcher(coarse)
        if self.pyramid is not None:
            matcher["blocks"] = list(matcher["blocks"]) + [(r"^pyramid\.", (99999,))]
        return matcher

    def _grid_to_blocks(self, module: nn.Module, inputs, tokens: torch.Tensor) -> None:
        """patch_embed's forward hook in a model with DenseBlocks: tells them the token grid, [N, H, W, D] tokens'
        with dynamic_img_size, else the built one (a hook, so that a default model traces and scripts unchanged)."""
        set_token_grid(self.blocks, tokens.shape[1:3] if self.dynamic_img_size else self.grid_size)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, **kwargs):
        """timm's, or with the simple pyramid its levels `indices` (of the four) from the last block's map."""
        if self.pyramid is None:
            return super().forward_intermediates(x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                                 intermediates_only=intermediates_only, **kwargs)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        out = super().forward_intermediates(x, [len(self.blocks) - 1], norm=norm, output_fmt="NCHW",
                                            intermediates_only=intermediates_only, **kwargs)
        last = out[0] if intermediates_only else out[1][0]
        maps = self.pyramid.levels(last, take)
        if output_fmt == "NLC":
            maps = [m.flatten(2).transpose(1, 2) for m in maps]
        return maps if intermediates_only else (out[0], maps)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's, or with the simple pyramid: every block is kept (the pyramid takes the last), the norm and head
        pruned as asked; returns the pyramid levels taken."""
        if self.pyramid is None:
            return super().prune_intermediate_layers(indices, prune_norm, prune_head)
        take, _ = feature_take_indices(len(self.feature_info), indices)
        levels = self.feature_info
        super().prune_intermediate_layers([len(self.blocks) - 1], prune_norm, prune_head)
        self.feature_info = levels
        return take

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            _check_global_pool(global_pool, self.has_class_token)
        super().reset_classifier(num_classes, global_pool)
        # where the model is, in its dtype and mode, as ConvViT's (timm 1.0.26 makes it on the default device, training)
        ref = self.patch_embed.proj.weight
        self.head = self.head.to(device=ref.device, dtype=ref.dtype).train(self.training)

    @property
    def patch_size(self) -> int:
        """Total stride from pixels to tokens."""
        return self.patch_embed.patch_size[0]

    @property
    def img_size(self) -> Tuple[int, int]:
        return tuple(self.patch_embed.img_size)

    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor,
                       visible_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final-norm tokens at the visible positions of `mask` [N, L] (True = masked), in raster order; a class
        token takes part in the attention but is not returned."""
        _check_masked_input(self, x, mask)
        ids = visible_token_ids(mask) if visible_ids is None else visible_ids
        x = self._pos_embed(self.patch_embed(x))
        prefix = self.num_prefix_tokens
        x = torch.cat([x[:, :prefix], gather_tokens(x[:, prefix:], ids)], dim=1)
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)[:, prefix:]


# What the linear probe classifies (main_linprobe.py --probe_features):
# - "pool_then_fresh_norm" (default): the authors' release (MAE's `--global_pool` probe): the mean of the last block's
#   tokens, BEFORE the pre-trained final norm, through a fresh LayerNorm that stays at weight 1 / bias 0 (so it has
#   no parameters here);
# - "final_norm_then_pool": the mean of the pre-trained final norm's tokens, what this project's probe took before it
#   followed the release; kept so that probe checkpoints trained that way resume and evaluate on their own features.
PROBE_FEATURES = ("pool_then_fresh_norm", "final_norm_then_pool")


class LinearProbe(nn.Module):
    """A frozen encoder (no gradients, always in eval mode), its pooled features (see PROBE_FEATURES), then BatchNorm
    without affine and a linear classifier: the only parameters that learn are the classifier's."""

    def __init__(self, encoder: nn.Module, num_classes: int, features: str = "pool_then_fresh_norm"):
        super().__init__()
        if features not in PROBE_FEATURES:
            raise ValueError(f"features must be one of {PROBE_FEATURES}, got {features!r}")
        if encoder.num_classes or encoder.global_pool != "avg" or not isinstance(encoder.fc_norm, nn.Identity):
            raise ValueError("the probe takes an encoder built with its defaults: num_classes=0, global_pool='avg', "
                             "fc_norm=False")
        if encoder.feature_info[-1]["reduction"] != encoder.patch_size:
            raise ValueError("the probe takes an encoder whose last feature level is its token grid (a ConViT "
                             "built without stride32_level)")
        self.features = features
        self.encoder = encoder.requires_grad_(False)
        # MAE's probe: a fresh LayerNorm frozen at weight 1 / bias 0, i.e. one without affine parameters
        self.feature_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6, elementwise_affine=False)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6),
                                  nn.Linear(encoder.embed_dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.features == "final_norm_then_pool":
            return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        # the last level is the last block's output before the final norm, patch tokens only
        tokens = self.encoder.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)[0]
        return self.feature_norm(tokens.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled_features(x))


# ---------------------------------------------------------------------------------------------------------------------
# Loading weights through timm (pretrained_cfg_overlay=dict(file=...), local-dir: and hf-hub: exports); the filter,
# checkpoint_filter_fn, is dmjd_encoders.pretrained's (and answers here too, as timm's model files have it).

_WEIGHT_SOURCES = ("file", "url", "hf_hub_id", "state_dict")


def _check_weight_source(variant: str, pretrained: bool, kwargs: dict) -> None:
    """No weights are published: pretrained=True needs a file, and a file is never ignored."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = kwargs.get("pretrained_cfg")
    cfg = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg if isinstance(cfg, dict) else {}
    given = [k for k in _WEIGHT_SOURCES if overlay.get(k) or cfg.get(k)]
    if pretrained and not given:
        raise ValueError(f"{variant}: no weights of this model are published, so pretrained=True needs a file: "
                         "pretrained_cfg_overlay=dict(file=PATH) (.safetensors or .pth), or 'local-dir:FOLDER' / "
                         "'hf-hub:ID' as the model name for an export of `python export_encoder.py`; or "
                         "checkpoint_path=PATH without pretrained=True")
    if not pretrained and any(overlay.get(k) for k in _WEIGHT_SOURCES):
        raise ValueError(f"{variant}: pretrained_cfg_overlay names weights ({overlay}) but pretrained=False; pass "
                         "pretrained=True to load them")


def create_encoder(name: str, weights: Optional[str] = None, **kwargs) -> nn.Module:
    """The registered encoder `name` (timm.create_model's keyword arguments) with `weights` loaded: an export folder
    of `python export_encoder.py` (built at its input size, with its layout), its model.safetensors, or any checkpoint
    dmjd_encoders.pretrained.load_pretrained takes. What hubconf.py's entry points return."""
    if weights is None:
        return timm.create_model(name, **kwargs)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"weights not found: {weights}")
    if os.path.isdir(weights):
        exported = export_architecture(load_checkpoint(weights))
        if exported != name:
            raise ValueError(f"{weights} holds a {exported} encoder, not {name}: load it as {exported}")
        return timm.create_model(f"local-dir:{weights}", pretrained=True, **kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Named architectures. ENCODER_ARCHS is shared with the DMJD factories in models_dmjd.py.

ENCODER_ARCHS = {
    # ConvMAE's names (small, base, large match its release); mini and tiny are this project's demo and test sizes.
    # mini: stride 8 (2 x 2 x 2) for 32-pixel images such as Fashion-MNIST in the demo
    "convvit_mini_patch8": (ConvViT, dict(patch_size=(2, 2, 2), embed_dim=(32, 64, 128), depth=(1, 1, 3),
                                          num_heads=4, mlp_ratio=(4.0, 4.0, 4.0))),
    "convvit_tiny_patch16": (ConvViT, dict(embed_dim=(32, 48, 64), depth=(1, 1, 2), num_heads=2,
                                           mlp_ratio=(4.0, 4.0, 2.0))),
    "convvit_small_patch16": (ConvViT, dict(embed_dim=(128, 256, 384), depth=(2, 2, 11), num_heads=6,
                                            mlp_ratio=(4.0, 4.0, 4.0))),
    "convvit_base_patch16": (ConvViT, dict(embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12,
                                           mlp_ratio=(8.0, 8.0, 4.0))),
    "convvit_large_patch16": (ConvViT, dict(embed_dim=(384, 768, 1024), depth=(2, 2, 23), num_heads=16,
                                            mlp_ratio=(8.0, 8.0, 4.0))),
    # timm's ViT family names, `gap_sincos`: global average pooling without class token, sin-cos positions.
    # test: a test-size model (timm's vit_tiny is 192 wide and 12 deep).
    "vit_test_patch16_gap_sincos": (ViT, dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)),
    "vit_base_patch16_gap_sincos": (ViT, dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)),
    "vit_large_patch16_gap_sincos": (ViT, dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)),
}
# ENCODER_OF (dmjd_encoders.names): the encoder of each pre-training model, by its name in ENCODER_ARCHS.


def _cfg(first_conv: str, size: int, stride: int):
    # fixed_input_size: built with the defaults, a model takes inputs of its img_size only (dynamic_img_size=True
    # takes any multiple of the stride; its own pretrained_cfg then says so, see _describe_input), and timm builds
    # it at the cfg's input_size. pool_size: the token grid that forward_features returns (as [N, L, D] tokens, as
    # timm's ViTs and hybrids return theirs). license, paper: those of the weights this project makes (an export
    # states its own: export.py). No hf_hub_id: no weights are published (timm sets it when it loads "hf-hub:ID").
    return dict(url="", num_classes=0, input_size=(3, size, size), pool_size=(size // stride, size // stride),
                crop_pct=0.875, interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv=first_conv, classifier="head", license="mit",
                paper_ids=f"arXiv:{ARXIV_ID}", paper_name=PAPER_NAME)


def _stride(cls: type, arch: dict) -> int:
    """The total stride of an encoder built with `arch`: its patch size(s), given or the class's default."""
    patch = arch.get("patch_size", inspect.signature(cls).parameters["patch_size"].default)
    return math.prod(patch) if isinstance(patch, (tuple, list)) else patch  # ConViT: one patch size per stage


# Encoders: no classifier by default (the weights people share are pre-trained encoders), no published weights.
default_cfgs = generate_default_cfgs({
    name: _cfg(cls.FIRST_CONV, 32 if name.endswith("patch8") else 224, _stride(cls, arch))
    for name, (cls, arch) in ENCODER_ARCHS.items()})


def _create(name: str, pretrained: bool, kwargs: dict):
    """The registered encoder `name`, with learnable position embeddings (fine-tuning resizes and trains them)."""
    _check_weight_source(name, pretrained, kwargs)
    model_cls, arch = ENCODER_ARCHS[name]
    kwargs.setdefault("learnable_pos_embed", True)  # img_size: timm passes the cfg's input_size (fixed_input_size)
    if model_cls is ConvViT:
        # the fourth level of ConvMAE's segmentation backbone; not with torch.fx features, which take the modules
        # that forward() runs
        if kwargs.get("features_only") and kwargs.get("feature_cls") != "fx":
            kwargs.setdefault("stride32_level", True)
        out_indices = (0, 1, 2, 3) if kwargs.get("stride32_level") else (0, 1, 2)
    elif kwargs.setdefault("simple_pyramid", bool(kwargs.get("features_only")) and kwargs.get("feature_cls") != "fx"):
        # ViTDet's four levels at strides 4 to 32: by default for features_only, whose users (UperNet, an FPN, smp's
        # tu- encoders) want levels that halve; simple_pyramid=False gives the blocks at stride 16
        out_indices = (0, 1, 2, 3)
    else:  # four blocks spread over the depth, as ViT segmentation backbones take them (e.g. 2, 5, 8, 11 of 12)
        depth = kwargs.get("depth", arch["depth"])
        out_indices = tuple(sorted({max(0, round(depth * (i + 1) / 4) - 1) for i in range(4)}))
    if kwargs.get("features_only") and "out_indices" in kwargs:
        out_indices = kwargs.pop("out_indices")
    model = build_model_with_cfg(model_cls, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 pretrained_strict=False,  # checkpoint_filter_fn checks every key itself
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                 **dict(arch, **kwargs))
    _describe_input(model.pretrained_cfg, model_cls, dict(arch, **kwargs))
    return model


def _describe_input(cfg: dict, model_cls: type, build_kwargs: dict) -> None:
    """Makes a built model's pretrained_cfg say what it takes: its input size (the img_size it was given, else the
    cfg's, which timm built it at), whether only that (fixed_input_size, unless built with dynamic_img_size=True) and
    its token grid (pool_size)."""
    img_size = build_kwargs.get("img_size")
    size = to_2tuple(img_size) if img_size is not None else tuple(cfg["input_size"][-2:])
    stride = _stride(model_cls, build_kwargs)
    cfg["input_size"] = (cfg["input_size"][0], *size)
    cfg["fixed_input_size"] = not build_kwargs.get("dynamic_img_size", False)
    cfg["pool_size"] = (size[0] // stride, size[1] // stride)


@register_model
def convvit_mini_patch8(pretrained=False, **kwargs) -> ConvViT:
    return _create("convvit_mini_patch8", pretrained, kwargs)


@register_model
def convvit_tiny_patch16(pretrained=False, **kwargs) -> ConvViT:
    return _create("convvit_tiny_patch16", pretrained, kwargs)


@register_model
def convvit_small_patch16(pretrained=False, **kwargs) -> ConvViT:
    return _create("convvit_small_patch16", pretrained, kwargs)


@register_model
def convvit_base_patch16(pretrained=False, **kwargs) -> ConvViT:
    return _create("convvit_base_patch16", pretrained, kwargs)


@register_model
def convvit_large_patch16(pretrained=False, **kwargs) -> ConvViT:
    return _create("convvit_large_patch16", pretrained, kwargs)


@register_model
def vit_test_patch16_gap_sincos(pretrained=False, **kwargs) -> ViT:
    return _create("vit_test_patch16_gap_sincos", pretrained, kwargs)


@register_model
def vit_base_patch16_gap_sincos(pretrained=False, **kwargs) -> ViT:
    return _create("vit_base_patch16_gap_sincos", pretrained, kwargs)


@register_model
def vit_large_patch16_gap_sincos(pretrained=False, **kwargs) -> ViT:
    return _create("vit_large_patch16_gap_sincos", pretrained, kwargs)


# The ViTs' former names are MAE's names for another network (with a class token); checkpoints that carry them in
# `args["model"]` and scripts given them still work, and timm says the new name.
register_model_deprecations(__name__, {
    "vit_tiny_patch16": "vit_test_patch16_gap_sincos",
    "vit_base_patch16": "vit_base_patch16_gap_sincos",
    "vit_large_patch16": "vit_large_patch16_gap_sincos",
})


# ---------------------------------------------------------------------------------------------------------------------
# What the training scripts ask of the registry and of the models.

def check_model_name(name: str, candidates, what: str) -> None:
    """Raises UnknownModelError naming --model and the closest registered names when `name` is not among
    `candidates`."""
    candidates = list(candidates)
    if name not in candidates:
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.4)
        raise UnknownModelError(f"--model {name!r} is not {what}" +
                         (f"; did you mean {', '.join(close)}?" if close else f"; choose from {', '.join(candidates)}"))


def is_plain_vit(name: str) -> bool:
    """Whether the registered encoder `name` (or a former name of one) is a plain ViT: one stride, no conv stages
    (its multi-scale levels for dense transfer then come from `simple_pyramid=True`)."""
    name = timm.models.get_deprecated_models(TIMM_MODULE).get(name, name)
    return name in ENCODER_ARCHS and ENCODER_ARCHS[name][0] is ViT


# The suffix with which a group_matcher puts parameters with the block before them (timm's MATCH_PREV_GROUP).
MATCH_PREV_GROUP = (99999,)


def matcher_without_tail(matcher: dict) -> Tuple[dict, List[str]]:
    """A timm group_matcher without the entries that join the last block's group (MATCH_PREV_GROUP: a final norm,
    ConViT's stride-32 level, a ViT's simple pyramid), and their patterns. For layer-wise lr decay in dense transfer,
    what follows the blocks learns at the heads' rate, in a last layer of its own (ConvMAE's segmentation optimizer,
    ViTDet's get_vit_lr_decay_rate), not at the last block's."""
    blocks = matcher["blocks"]
    blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
    tail = [pattern for pattern, suffix in blocks if suffix == MATCH_PREV_GROUP]
    return dict(matcher, blocks=[(p, suffix) for p, suffix in blocks if suffix != MATCH_PREV_GROUP]), tail


def transformer_depth(name: str) -> int:
    """The number of transformer blocks of the registered encoder `name` (or a former name of one): a ViT's blocks, a
    ConViT's stage 3."""
    name = timm.models.get_deprecated_models(TIMM_MODULE).get(name, name)
    model_cls, arch = ENCODER_ARCHS[name]
    return arch["depth"][2] if model_cls is ConvViT else arch["depth"]


def encoder_stride(name: str) -> int:
    """The pixels of one token's side of the registered encoder `name` (a former name, or a pre-training model of
    ENCODER_OF: its encoder's): the multiple that its input sizes must be."""
    name = ENCODER_OF.get(name, name)
    name = timm.models.get_deprecated_models(TIMM_MODULE).get(name, name)
    return _stride(*ENCODER_ARCHS[name])


def check_classifier_name(name: str) -> None:
    """Raises UnknownModelError unless --model names an encoder of this module; a former name works, with a note of
    the new one."""
    renamed = timm.models.get_deprecated_models(TIMM_MODULE)
    if name in renamed:
        _logger.info(f"note: --model {name} is now called {renamed[name]}; the former name still works")
        return
    check_model_name(name, timm.list_models(module=TIMM_MODULE), "a classifier of this project")


def conv_weights_channels_last(model: nn.Module) -> nn.Module:
    """`model` with its conv weights stored channels-last when it has ConViT conv stages: their LayerNorms leave the
    maps channels-last, so the convs give channels-last weight gradients, which is what DDP's gradient buckets then
    expect (no copy, no layout warning), and the conv kernels need no format conversion. In place: the same
    parameters, so an optimizer's references stay valid."""
    if any(isinstance(m, ConvBlock) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model
