"""Encoders for masked image modeling: ConViT (ConvMAE's hybrid conv + transformer) and a plain ViT.

Both expose one interface used by pre-training, fine-tuning and linear probing:

- `forward_features(x, mask=None, visible_ids=None)`: `x` [N, 3, H, W] normalised images, `mask` bool [N, L] with
  True = masked (every row masking the same number of tokens). Returns the final-norm tokens at the VISIBLE
  positions, in raster order, [N, L_visible, D]. Masked tokens are dropped before the transformer, as in MAE.
  `visible_ids` (from `visible_token_ids`) saves recomputing them when the caller has them. With a mask, ConViT's
  conv stages run at the visible tokens only (`sparse_stages=True`, the default): the same values as the dense
  masked stages, for a quarter fewer FLOPs per pre-training step of ConViT-B at the released mask ratio.
- `forward(x)`: classification (global average pool, `fc_norm`, `head`) when built with `num_classes > 0`.

Parameter names follow the released ConvMAE/DMJD checkpoints (`patch_embed1..4`, `blocks1..3`, `norm`,
`stage1_output_decode`, `stage2_output_decode`) so that loading them needs no renaming. Shapes follow the input
size and the patch sizes; nothing assumes 224 pixels.
"""
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import Block

from util.misc import check_model_name
from util.pos_embed import sincos_pos_embed_2d

__all__ = ["ConvViT", "ViT", "LinearProbe", "gather_tokens", "visible_token_ids", "init_linear_and_norm"]

BlockNorm = partial(nn.LayerNorm, eps=1e-6)


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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


class _Encoder(nn.Module):
    """What ConViT and ViT share: the token grid, the position embedding, the transformer stage and the head."""

    def _init_common(self, img_size, patch_size: int, embed_dim: int, num_classes: int, global_pool: bool,
                     learnable_pos_embed: bool) -> None:
        self.img_size = _pair(img_size)
        self.patch_size = patch_size  # total stride from pixels to tokens
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"input size {self.img_size} must be divisible by the model's stride {patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.global_pool = global_pool
        # Fixed sin-cos during pre-training (as MAE); a parameter so that fine-tuning can learn and resize it.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0),
                                      requires_grad=learnable_pos_embed)

    def _build_head(self, norm_layer) -> None:
        # Global pooling replaces the final norm with a norm after pooling (as MAE / ConvMAE fine-tuning).
        self.norm = nn.Identity() if self.global_pool else norm_layer(self.embed_dim)
        self.fc_norm = norm_layer(self.embed_dim) if self.global_pool else nn.Identity()
        self.head = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def check_input(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input of {tuple(x.shape[-2:])} pixels, the model was built for {self.img_size}")
        if mask is not None and mask.shape != (x.shape[0], self.num_patches):
            raise ValueError(f"mask of shape {tuple(mask.shape)}, expected {(x.shape[0], self.num_patches)}")

    def no_weight_decay(self):
        return {"pos_embed"}

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(tokens.mean(dim=1)) if self.global_pool else tokens.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvViT(_Encoder):
    """ConViT: two conv stages (strides 4 and 2 by default) and a transformer stage on the visible tokens.

    `fuse_stages=True` (pre-training) adds projections of the stage-1 and stage-2 maps to the token width, gathered
    at the visible tokens and added after the transformer blocks, before the final norm (ConvMAE's multi-scale
    decoder input).
    """

    def __init__(self, img_size=224, patch_size: Sequence[int] = (4, 2, 2), in_chans: int = 3,
                 embed_dim: Sequence[int] = (256, 384, 768), depth: Sequence[int] = (2, 2, 11), num_heads: int = 12,
                 mlp_ratio: Sequence[float] = (8.0, 8.0, 4.0), num_classes: int = 0, global_pool: bool = False,
                 drop_path_rate: float = 0.0, fuse_stages: bool = False, learnable_pos_embed: bool = False,
                 sparse_stages: bool = True):
        super().__init__()
        if not (len(patch_size) == len(embed_dim) == len(depth) == len(mlp_ratio) == 3):
            raise ValueError("ConvViT takes three stages: patch_size, embed_dim, depth and mlp_ratio need 3 values")
        self.stage_strides = tuple(int(p) for p in patch_size)
        stride = self.stage_strides[0] * self.stage_strides[1] * self.stage_strides[2]
        self._init_common(img_size, stride, embed_dim[2], num_classes, global_pool, learnable_pos_embed)
        dpr = torch.linspace(0, drop_path_rate, sum(depth)).tolist()

        self.patch_embed1 = ConvPatchEmbed(in_chans, embed_dim[0], patch_size[0])
        self.patch_embed2 = ConvPatchEmbed(embed_dim[0], embed_dim[1], patch_size[1])
        self.patch_embed3 = ConvPatchEmbed(embed_dim[1], embed_dim[2], patch_size[2])
        self.patch_embed4 = nn.Linear(embed_dim[2], embed_dim[2])
        self.blocks1 = nn.ModuleList([ConvBlock(embed_dim[0], mlp_ratio[0], dpr[i]) for i in range(depth[0])])
        self.blocks2 = nn.ModuleList([ConvBlock(embed_dim[1], mlp_ratio[1], dpr[depth[0] + i])
                                      for i in range(depth[1])])
        self.blocks3 = nn.ModuleList([
            Block(embed_dim[2], num_heads, mlp_ratio[2], qkv_bias=True, norm_layer=BlockNorm,
                  drop_path=dpr[depth[0] + depth[1] + i]) for i in range(depth[2])])
        self.fuse_stages = fuse_stages
        self.sparse_stages = sparse_stages
        if fuse_stages:
            s23 = patch_size[1] * patch_size[2]
            self.stage1_output_decode = nn.Conv2d(embed_dim[0], embed_dim[2], s23, stride=s23)
            self.stage2_output_decode = nn.Conv2d(embed_dim[1], embed_dim[2], patch_size[2], stride=patch_size[2])
        self._build_head(BlockNorm)

        self.apply(init_linear_and_norm)
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the last embed acts as a linear patch projection
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=2e-5)

    def _visible_map(self, mask: torch.Tensor, scale: int) -> torch.Tensor:
        """Token mask [N, L] -> float visibility map [N, 1, gh * scale, gw * scale], 1 = visible."""
        visible = (~mask).reshape(-1, 1, *self.grid_size).float()
        return visible.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         visible_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_input(x, mask)
        if mask is not None and self.sparse_stages:
            return self._forward_visible(x, visible_token_ids(mask) if visible_ids is None else visible_ids)
        s1, s2, s3 = self.stage_strides
        vis1 = vis2 = None
        if mask is not None:
            vis1 = self._visible_map(mask, s2 * s3).to(x.dtype)
            vis2 = self._visible_map(mask, s3).to(x.dtype)

        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x, vis1)
        stage1 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, vis2)
        stage2 = x
        x = self.patch_embed3(x).flatten(2).transpose(1, 2)
        x = self.patch_embed4(x) + self.pos_embed

        ids = None
        if mask is not None:
            ids = visible_token_ids(mask) if visible_ids is None else visible_ids
            x = gather_tokens(x, ids)
        for blk in self.blocks3:
            x = blk(x)
        if self.fuse_stages:
            for decode, feat in ((self.stage1_output_decode, stage1), (self.stage2_output_decode, stage2)):
                feat = decode(feat).flatten(2).transpose(1, 2)
                x = x + (gather_tokens(feat, ids) if ids is not None else feat)
        return self.norm(x)

    def _forward_visible(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`forward_features` with a mask, computing the conv stages at the visible tokens only.

        In the masked conv stages a masked position never reaches a visible one: the patch embeddings do not cross
        token borders, the mixers' inputs are zeroed at masked positions and every other op is per position. So
        the visible tokens' outputs need only their own positions: each visible token's pixels go through the
        stages as a [S x S, C] block of rows (the 1x1 convs and the MLP become matmuls on those rows), and the
        depth-wise mixers run on a map that is zero at the masked tokens. Same values as the dense path (a test
        checks outputs and gradients), with the conv stages' FLOPs cut by the mask ratio.
        """
        n = ids.shape[0]
        p, (gh, gw) = self.patch_size, self.grid_size
        s1, s2, s3 = self.stage_strides
        # Each visible token's p x p pixels, channels last, in raster order: [N, M, p * p, 3].
        pixels = x.permute(0, 2, 3, 1).reshape(n, gh, p, gw, p, -1).permute(0, 1, 3, 2, 4, 5)
        pixels = gather_tokens(pixels.reshape(n, gh * gw, p * p, -1), ids)

        embed = self.patch_embed1
        x = embed.act(embed.norm(_embed_within_tokens(embed.proj, pixels, p)))
        for blk in self.blocks1:
            x = blk.forward_visible(x, ids, self.grid_size)
        stage1 = x  # [N, M, (s2 * s3)^2, C1]
        embed = self.patch_embed2
        x = embed.act(embed.norm(_embed_within_tokens(embed.proj, x, s2 * s3)))
        for blk in self.blocks2:
            x = blk.forward_visible(x, ids, self.grid_size)
        stage2 = x  # [N, M, s3^2, C2]
        embed = self.patch_embed3
        x = embed.act(embed.norm(_embed_within_tokens(embed.proj, x, s3))).squeeze(2)
        x = self.patch_embed4(x) + gather_tokens(self.pos_embed.expand(n, -1, -1), ids)
        for blk in self.blocks3:
            x = blk(x)
        if self.fuse_stages:
            x = x + _embed_within_tokens(self.stage1_output_decode, stage1, s2 * s3).squeeze(2)
            x = x + _embed_within_tokens(self.stage2_output_decode, stage2, s3).squeeze(2)
        return self.norm(x)

    def group_matcher(self, coarse: bool = False):
        """Layer groups for layer-wise lr decay: the conv stages, every patch embedding and the position embedding
        are layer 0, transformer block i is layer i + 1, the final norms and the head come last."""
        return dict(stem=r"^(?:pos_embed|patch_embed\d|blocks1\.|blocks2\.|stage\d_output_decode)",
                    blocks=[(r"^blocks3\.(\d+)", None), (r"^norm", (99999,))])


class ViT(_Encoder):
    """Plain ViT without class token (MaskFeat-style backbone): patch embedding, sin-cos positions, blocks."""

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 0, global_pool: bool = False,
                 drop_path_rate: float = 0.0, learnable_pos_embed: bool = False):
        super().__init__()
        self._init_common(img_size, int(patch_size), embed_dim, num_classes, global_pool, learnable_pos_embed)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=BlockNorm, drop_path=dpr[i])
            for i in range(depth)])
        self._build_head(BlockNorm)

        self.apply(init_linear_and_norm)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=2e-5)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         visible_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_input(x, mask)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        if mask is not None:
            x = gather_tokens(x, visible_token_ids(mask) if visible_ids is None else visible_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^(?:pos_embed|patch_embed)", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


class LinearProbe(nn.Module):
    """A frozen encoder (no gradients, always in eval mode), the mean of its final-norm tokens, then BatchNorm
    without affine and a linear classifier: the only parameters that learn are the classifier's."""

    def __init__(self, encoder: _Encoder, num_classes: int):
        super().__init__()
        if encoder.global_pool or encoder.num_classes:
            raise ValueError("the probe takes an encoder built with global_pool=False and num_classes=0")
        self.encoder = encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6),
                                  nn.Linear(encoder.embed_dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder.forward_features(x).mean(dim=1)
        return self.head(features)


# ---------------------------------------------------------------------------------------------------------------------
# Named architectures. `*_encoder_args` are shared with the DMJD factories in models_dmjd.py.

CONVVIT_ARCHS = {
    # stride 8 (2 x 2 x 2) for 32-pixel images such as Fashion-MNIST in the demo
    "mini": dict(patch_size=(2, 2, 2), embed_dim=(32, 64, 128), depth=(1, 1, 3), num_heads=4,
                 mlp_ratio=(4.0, 4.0, 4.0)),
    "tiny": dict(embed_dim=(32, 48, 64), depth=(1, 1, 2), num_heads=2, mlp_ratio=(4.0, 4.0, 2.0)),
    "small": dict(embed_dim=(128, 256, 384), depth=(2, 2, 11), num_heads=6, mlp_ratio=(4.0, 4.0, 4.0)),
    "base": dict(embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12, mlp_ratio=(8.0, 8.0, 4.0)),
    "large": dict(embed_dim=(384, 768, 1024), depth=(2, 2, 23), num_heads=16, mlp_ratio=(8.0, 8.0, 4.0)),
}
VIT_ARCHS = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
}


def _classifier_defaults(kwargs):
    kwargs.setdefault("num_classes", 1000)
    kwargs.setdefault("global_pool", True)
    kwargs.setdefault("learnable_pos_embed", True)
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    return kwargs


def _no_pretrained(pretrained: bool, name: str):
    if pretrained:
        raise ValueError(f"{name}: no hub weights; load a checkpoint with util.checkpoint instead")


@register_model
def convvit_mini_patch8(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "convvit_mini_patch8")
    return ConvViT(**CONVVIT_ARCHS["mini"], **_classifier_defaults(kwargs))


@register_model
def convvit_tiny_patch16(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "convvit_tiny_patch16")
    return ConvViT(**CONVVIT_ARCHS["tiny"], **_classifier_defaults(kwargs))


@register_model
def convvit_small_patch16(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "convvit_small_patch16")
    return ConvViT(**CONVVIT_ARCHS["small"], **_classifier_defaults(kwargs))


@register_model
def convvit_base_patch16(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "convvit_base_patch16")
    return ConvViT(**CONVVIT_ARCHS["base"], **_classifier_defaults(kwargs))


@register_model
def convvit_large_patch16(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "convvit_large_patch16")
    return ConvViT(**CONVVIT_ARCHS["large"], **_classifier_defaults(kwargs))


@register_model
def vit_tiny_patch16(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "vit_tiny_patch16")
    return ViT(**VIT_ARCHS["tiny"], **_classifier_defaults(kwargs))


@register_model
def vit_base_patch16(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "vit_base_patch16")
    return ViT(**VIT_ARCHS["base"], **_classifier_defaults(kwargs))


@register_model
def vit_large_patch16(pretrained=False, **kwargs):
    _no_pretrained(pretrained, "vit_large_patch16")
    return ViT(**VIT_ARCHS["large"], **_classifier_defaults(kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# What the training scripts ask of the registry and of the models.

CLASSIFIER_PATTERNS = ["convvit_*", "vit_*_patch16"]


def check_classifier_name(name: str) -> None:
    """Exits naming --model and the closest classifier names when `name` is not a classifier of this project."""
    check_model_name(name, timm.list_models(CLASSIFIER_PATTERNS), "a classifier of this project")


def conv_weights_channels_last(model: nn.Module) -> nn.Module:
    """`model` with its conv weights stored channels-last when it has ConViT conv stages: their LayerNorms leave the
    maps channels-last, so the convs give channels-last weight gradients, which is what DDP's gradient buckets then
    expect (no copy, no layout warning), and the conv kernels need no format conversion. In place: the same
    parameters, so an optimizer's references stay valid."""
    if any(isinstance(m, ConvBlock) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model
