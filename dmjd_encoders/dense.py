"""Build options of the encoders for dense transfer (segmentation, detection): relative position bias, layer scale,
windowed attention and ViTDet's simple feature pyramid. All are off by default, and a model built without them is
exactly the pre-trained encoder; with them, the pre-trained weights still load and the new parameters start fresh
(dmjd_encoders.pretrained.FRESH_KEYS["dense"]).

- `rel_pos_bias`: learned relative positions in the attention of every transformer block, laid out as
  `rel_pos_layout` says:
  - "per_block": a bias per head for every relative offset between two tokens, added to the attention logits, one
    table per block (ConvMAE's segmentation backbone, BEiT's);
  - "shared": the same tables, but one shared by all windowed blocks and one by all global blocks, owned by the
    model as `rel_pos_tables.window` and `rel_pos_tables.global` (ConvMAE's detection backbone, ConvViTDet's
    `windowed_rel_pos_bias` and `global_rel_pos_bias`);
  - "decomposed": ViTDet's (and MViTv2's) decomposed relative positions, per block: an embedding of the head's width
    for each offset along each axis, and the bias of query i on key j is q_i . Rh[hi - hj] + q_i . Rw[wi - wj], so it
    depends on the query.
  A windowed block's table covers its window, a global block's the token grid the model is built for; at another grid
  (any input that is a multiple of the stride) a global table is resampled (bicubic for 2-D tables, as timm resamples
  relative position tables; linear for decomposed ones, as ViTDet's `get_rel_pos`). Tables start at zero (ConvMAE,
  ViTDet), so a new table changes nothing until it learns.
- `layer_scale`: timm's LayerScale (`ls1`, `ls2`: a per-channel scale on the attention and the MLP branch), starting
  at this value (ConvMAE's segmentation config: `init_values=1.`); None: none.
- `window_size`, `global_blocks`: transformer blocks not in `global_blocks` attend within non-overlapping windows of
  window_size x window_size tokens; the grid is padded with zeros to a multiple of the window and cropped back after
  (ViTDet's window_partition). 0: every block attends globally.
- `SimpleFeaturePyramid`: ViTDet's pyramid from the stride-16 map of a plain ViT.
"""
import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.layers.pos_embed_rel import gen_relative_position_index
from timm.models.vision_transformer import Block

# ConvMAE's detection backbone (DET/models/convmae.py, ConvViTDet, with the window of its Mask R-CNN configs
# DET/configs/convmae/convmae_base_mask_rcnn_FPN_{25,50,100}ep.py: window_size=16 at 1024-pixel inputs): its forward
# runs stage-3 blocks 0, 3, 6 and 10 of 11 globally and the others in 16 x 16 windows. (It also sets
# `global_attn_index = [0, 4, 8, 10]`, which its forward never reads.) Build with
# window_size=CONVMAE_DET_WINDOW_SIZE, global_blocks=CONVMAE_DET_GLOBAL_BLOCKS for its detection setting.
CONVMAE_DET_WINDOW_SIZE = 16
CONVMAE_DET_GLOBAL_BLOCKS = (0, 3, 6, 10)

# ViTDet's ViT-B (detectron2 configs/common/models/mask_rcnn_vitdet.py): 14 x 14 windows, blocks 2, 5, 8 and 11
# global, at 1024-pixel inputs (ViT-L: 5, 11, 17, 23 of 24; ViT-H: 7, 15, 23, 31 of 32); its SimpleFeaturePyramid
# gives 256 channels per level (`out_channels`, norm "LN", scale factors 4, 2, 1, 0.5; the stride-64 level of its
# Mask R-CNN is the FPN's LastLevelMaxPool, not the pyramid's).
VITDET_BASE_WINDOW_SIZE = 14
VITDET_BASE_GLOBAL_BLOCKS = (2, 5, 8, 11)
VITDET_PYRAMID_CHANNELS = 256

REL_POS_LAYOUTS = ("per_block", "shared", "decomposed")


def detection_attention(plain_vit: bool, depth: int) -> Tuple[int, Tuple[int, ...]]:
    """(window size, global blocks) of the detection backbone of a transformer stage of `depth` blocks, as its anchor
    places them: ViTDet's for a plain ViT (14 x 14 windows; the last block of each quarter global: 2, 5, 8, 11 of 12,
    5, 11, 17, 23 of 24), ConvMAE's for a ConViT (16 x 16 windows; its blocks 0, 3, 6, 10 of 11, at the same
    fractions of the depth for another depth: 0, 7, 13, 22 of 23)."""
    def nearest(x: float) -> int:  # half up, not to even
        return int(math.floor(x + 0.5))

    if plain_vit:
        return VITDET_BASE_WINDOW_SIZE, tuple(sorted({max(0, nearest((k + 1) * depth / 4) - 1) for k in range(4)}))
    last = max(CONVMAE_DET_GLOBAL_BLOCKS)
    return CONVMAE_DET_WINDOW_SIZE, tuple(sorted({nearest(b * (depth - 1) / last)
                                                  for b in CONVMAE_DET_GLOBAL_BLOCKS}))


class RelPosBias(nn.Module):
    """A learned bias per head for each relative offset within a `size` grid: [heads, L, L] for the L tokens of a
    grid of that size, or of another size through the table resampled to it."""

    def __init__(self, size: Tuple[int, int], num_heads: int):
        super().__init__()
        self.size = tuple(size)
        span = (2 * self.size[0] - 1) * (2 * self.size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(span, num_heads))
        self.register_buffer("relative_position_index", gen_relative_position_index(self.size).view(-1),
                             persistent=False)

    def forward(self, grid: Tuple[int, int]) -> torch.Tensor:
        grid = tuple(grid)
        table, index = self.relative_position_bias_table, self.relative_position_index
        if grid != self.size:
            heads = table.shape[1]
            image = table.t().reshape(1, heads, 2 * self.size[0] - 1, 2 * self.size[1] - 1)
            image = F.interpolate(image, size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bicubic",
                                  align_corners=False)
            table = image.reshape(heads, -1).t()
            index = gen_relative_position_index(grid, device=table.device).view(-1)
        tokens = grid[0] * grid[1]
        return table[index].view(tokens, tokens, -1).permute(2, 0, 1)


class DecomposedRelPos(nn.Module):
    """ViTDet's decomposed relative positions (MViTv2's): an embedding of `head_dim` for every relative offset along
    each axis of a `size` grid (`rel_pos_h`, `rel_pos_w`, zero at the start as ViTDet's `rel_pos_zero_init`). Given
    the queries [N, heads, L, head_dim] of a grid, the bias of query i on key j is q_i . Rh[hi - hj] + q_i . Rw[wi - wj]
    ([N, heads, L, L]); at another grid the embeddings are interpolated linearly to its span, as ViTDet's
    `get_rel_pos`."""

    def __init__(self, size: Tuple[int, int], head_dim: int):
        super().__init__()
        self.size = tuple(size)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.size[1] - 1, head_dim))

    @staticmethod
    def _by_offset(table: torch.Tensor, length: int) -> torch.Tensor:
        """[length, length, head_dim]: the embedding of the offset (i - j) for query i and key j along one axis."""
        span = 2 * length - 1
        if table.shape[0] != span:
            table = F.interpolate(table.t().unsqueeze(0), size=span, mode="linear").squeeze(0).t()
        positions = torch.arange(length, device=table.device)
        return table[positions[:, None] - positions[None, :] + length - 1]

    def forward(self, q: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        n, heads, tokens, dim = q.shape
        rows, cols = grid
        along_h = self._by_offset(self.rel_pos_h, rows).to(q.dtype)
        along_w = self._by_offset(self.rel_pos_w, cols).to(q.dtype)
        q = q.reshape(n, heads, rows, cols, dim)
        bias_h = torch.einsum("nahwd,hkd->nahwk", q, along_h)  # query (h, w) on key row k
        bias_w = torch.einsum("nahwd,wkd->nahwk", q, along_w)  # query (h, w) on key column k
        return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(n, heads, tokens, tokens)


def window_partition(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """[N, H, W, C] -> ([N * windows, window * window, C], the padded (H, W)): zero padding to a multiple of the
    window at the bottom and right, as ViTDet's."""
    n, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(n, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: Tuple[int, int],
                       grid: Tuple[int, int]) -> torch.Tensor:
    """The inverse of `window_partition`, the padding cropped: -> [N, H, W, C]."""
    hp, wp = padded
    c = windows.shape[-1]
    x = windows.view(-1, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, c)[:, :grid[0], :grid[1]]


class DenseBlock(Block):
    """timm's Block (same parameter names, so pre-trained weights load) with relative positions and / or windowed
    attention. A 2-D bias table reaches timm's attention as its additive `attn_mask`; decomposed relative positions
    depend on the queries, so the block computes that attention itself from timm's projections. The model tells the
    block its token grid before each forward (`set_token_grid`), as the tokens [N, L, D] do not say it."""

    def __init__(self, dim: int, num_heads: int, *, grid_size: Tuple[int, int], rel_pos_bias: bool = False,
                 rel_pos_layout: str = "per_block", window_size: int = 0, num_prefix_tokens: int = 0,
                 **block_kwargs):
        super().__init__(dim, num_heads, **block_kwargs)
        if window_size and num_prefix_tokens:
            raise ValueError("windowed attention takes patch tokens only: build the model without a class token")
        if rel_pos_bias and rel_pos_layout == "decomposed" and num_prefix_tokens:
            raise ValueError("decomposed relative positions take patch tokens only: build the model without a class "
                             "token")
        self.window_size = window_size
        self.num_prefix_tokens = num_prefix_tokens
        self.token_grid = tuple(grid_size)
        size = (window_size, window_size) if window_size else tuple(grid_size)
        self.rel_pos = None
        if rel_pos_bias and rel_pos_layout == "per_block":
            self.rel_pos = RelPosBias(size, num_heads)
        elif rel_pos_bias and rel_pos_layout == "decomposed":
            self.rel_pos = DecomposedRelPos(size, self.attn.head_dim)
        # "shared": the model's table for this kind of block, in a tuple so that it is not registered twice (the model
        # owns it: one parameter in the state dict and the optimizer, whatever the number of blocks)
        self.shared_rel_pos: Tuple[RelPosBias, ...] = ()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a DenseBlock makes its own attention bias; it takes no attn_mask")
        x = x + self.drop_path1(self.ls1(self._attention(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _bias(self, grid: Tuple[int, int], dtype: torch.dtype) -> Optional[torch.Tensor]:
        table = self.rel_pos if self.rel_pos is not None else (self.shared_rel_pos or (None,))[0]
        if table is None:
            return None
        bias = table(grid)
        if self.num_prefix_tokens:  # no bias to or from a class token
            p = self.num_prefix_tokens
            bias = F.pad(bias, (p, 0, p, 0))
        return bias.unsqueeze(0).to(dtype)

    def _attend(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if not isinstance(self.rel_pos, DecomposedRelPos):
            return self.attn(x, attn_mask=self._bias(grid, x.dtype))
        attn = self.attn
        n, tokens, _ = x.shape
        qkv = attn.qkv(x).reshape(n, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = self.rel_pos(q, grid)  # from the unscaled queries, as ViTDet's add_decomposed_rel_pos
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=attn.attn_drop.p if self.training else 0.0)
        x = attn.norm(x.transpose(1, 2).reshape(n, tokens, -1))
        return attn.proj_drop(attn.proj(x))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.token_grid
        if not self.window_size:
            return self._attend(x, grid)
        n, _, c = x.shape
        window = self.window_size
        windows, padded = window_partition(x.view(n, grid[0], grid[1], c), window)
        out = self._attend(windows, (window, window))
        return window_unpartition(out, window, padded, grid).reshape(n, -1, c)


def set_token_grid(blocks: nn.Module, grid: Tuple[int, int]) -> None:
    """Tells each DenseBlock of `blocks` the token grid of the forward about to run."""
    for block in blocks:
        if isinstance(block, DenseBlock):
            block.token_grid = tuple(grid)


@dataclasses.dataclass(frozen=True)
class DenseOptions:
    """The transformer-block options of dense transfer, as a model's constructor takes them (see the module)."""
    rel_pos_bias: bool = False
    layer_scale: Optional[float] = None
    window_size: int = 0
    global_blocks: Tuple[int, ...] = ()
    rel_pos_layout: str = "per_block"

    def check(self, depth: int) -> None:
        if self.window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: no windows), got {self.window_size}")
        outside = [i for i in self.global_blocks if not 0 <= i < depth]
        if outside:
            raise ValueError(f"global_blocks {list(self.global_blocks)}: the transformer has blocks 0 to {depth - 1}")
        if self.global_blocks and not self.window_size:
            raise ValueError("global_blocks names the blocks that do not attend in windows: it needs window_size")
        if self.rel_pos_layout not in REL_POS_LAYOUTS:
            raise ValueError(f"rel_pos_layout must be one of {', '.join(REL_POS_LAYOUTS)}, got {self.rel_pos_layout!r}")

    @property
    def per_block(self) -> bool:
        """Whether blocks need DenseBlock (layer scale alone is timm's Block's `init_values`)."""
        return self.rel_pos_bias or self.window_size > 0

    def block_fn(self, grid_size: Tuple[int, int], num_prefix_tokens: int = 0):
        """A block constructor taking timm's Block arguments (`depth` is the block's index), which builds the block
        that block `depth` needs."""
        def build(dim: int, num_heads: int, depth: int = 0, **block_kwargs) -> nn.Module:
            if not self.per_block:
                return Block(dim, num_heads, depth=depth, **block_kwargs)
            window = 0 if depth in self.global_blocks else self.window_size
            return DenseBlock(dim, num_heads, depth=depth, grid_size=grid_size, rel_pos_bias=self.rel_pos_bias,
                              rel_pos_layout=self.rel_pos_layout, window_size=window,
                              num_prefix_tokens=num_prefix_tokens, **block_kwargs)
        return build

    def shared_tables(self, blocks: Sequence[nn.Module], grid_size: Tuple[int, int],
                      num_heads: int) -> Optional[nn.ModuleDict]:
        """With the "shared" layout, the model's two tables (`window`: for the windowed blocks, `global`: for the
        others, of the grid the model is built for), each handed to the blocks that use it; else None."""
        if not (self.rel_pos_bias and self.rel_pos_layout == "shared"):
            return None
        tables = nn.ModuleDict()
        for block in blocks:
            kind, size = (("window", (block.window_size,) * 2) if block.window_size else ("global", tuple(grid_size)))
            if kind not in tables:
                tables[kind] = RelPosBias(size, num_heads)
            block.shared_rel_pos = (tables[kind],)
        return tables


def _output_convs(in_channels: int, out_channels: int) -> nn.Sequential:
    """ViTDet's output of each level: 1 x 1 conv and norm, 3 x 3 conv and norm (LayerNorm, no conv bias)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (detectron2 SimpleFeaturePyramid with norm="LN", scale factors 4, 2, 1, 0.5)
    from a ViT's last stride-16 map [N, D, H, W]: stride 4 by a 2 x 2 transposed conv to D/2, LayerNorm, GELU and a
    second one to D/4; stride 8 by one transposed conv to D/2; stride 16 as it is; stride 32 by 2 x 2 max pooling
    (rounding up: ViTDet's at a multiple of 32; at an odd grid the border is kept, as in ConViT's stride-32 level, and
    a 1 x 1 grid still gives a level); then each through a 1 x 1 and a 3 x 3 conv, each followed by LayerNorm, to
    `out_channels`."""

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, dim: int, out_channels: int = VITDET_PYRAMID_CHANNELS):
        super().__init__()
        self.out_channels = out_channels
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.outputs = nn.ModuleList([_output_convs(c, out_channels) for c in (dim // 4, dim // 2, dim, dim)])

    def levels(self, x: torch.Tensor, take: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """The pyramid levels `take` (0: stride 4 of the input map's 16 ... 3: stride 32) of `x`."""
        rescale = (self.up4, self.up2, None, self.down2)  # None: stride 16 is the map itself
        return [self.outputs[i](x if rescale[i] is None else rescale[i](x)) for i in take]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.levels(x)
