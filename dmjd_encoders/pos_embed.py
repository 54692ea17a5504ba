"""Fixed 2-D sine-cosine position embeddings (resampling to another grid: timm's resample_abs_pos_embed).

The layout follows MAE/ConvMAE so that released checkpoints and ours agree: the first half of the channels encodes
the column (x) coordinate, the second half the row (y) coordinate, each half as [sin | cos] over geometric
frequencies 1 / 10000^(i / (D/4)).
"""
from typing import Tuple, Union

import torch
from timm.layers import to_2tuple


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """[grid_h * grid_w, embed_dim] float32 embedding, tokens in raster (row-major) order."""
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    grid_h, grid_w = to_2tuple(grid_size)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return emb.float()
