"""Fixed 2-D sine-cosine position embeddings and their resampling to another grid.

The layout follows MAE/ConvMAE so that released checkpoints and ours agree: the first half of the channels encodes
the column (x) coordinate, the second half the row (y) coordinate, each half as [sin | cos] over geometric
frequencies 1 / 10000^(i / (D/4)).
"""
from typing import Tuple, Union

import torch
import torch.nn.functional as F


def _to_2tuple(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """[grid_h * grid_w, embed_dim] float32 embedding, tokens in raster (row-major) order."""
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    grid_h, grid_w = _to_2tuple(grid_size)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return emb.float()


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int] = None
                       ) -> torch.Tensor:
    """Bicubic resampling of a [1, L, D] patch-token position embedding (no class token) to `new_grid`.

    `old_grid` defaults to the square grid that holds L tokens.
    """
    _, length, dim = pos_embed.shape
    if old_grid is None:
        side = int(round(length ** 0.5))
        if side * side != length:
            raise ValueError(f"cannot infer the grid of a position embedding with {length} tokens; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
