"""HOG regression targets for masked image modeling, as in the released DMJD code.

This is deliberately *not* MaskFeat's HOG: there is no Gaussian spatial
weighting, orientation votes go to a single bin (no interpolation), every RGB
channel gets its own histograms, and there is no block normalisation. Cells are
instead "instance whitened" (LayerNorm over their bins, no affine).

The raw per-cell histograms equal ``skimage.feature.hog``'s per-cell histograms
for a single channel before block normalisation, which the tests check:

* gradients are central differences on the raw 0-255 values, zero on the
  border rows/columns; the row gradient is ``I[r + 1] - I[r - 1]``, i.e. it
  grows *downwards*, so angles are mirrored relative to a y-up convention
  (a gradient pointing down-right is 45 degrees, up-right is 135 degrees);
* orientation = ``atan2(g_row, g_col)`` in degrees, mod 180; bin ``i`` is the
  half-open interval ``[i, i + 1) * 180 / num_bins``, so a value exactly on an
  edge goes to the upper bin;
* a cell's bin value is the sum of the magnitudes voting for it divided by the
  cell area (the mean over the cell's pixels).

With 9 bins and integer pixel values the float32 binning here agrees exactly
with skimage's float64 one (no integer gradient pair lies within 6e-4 degrees
of a bin edge); for interpolated pixels, rare near-edge votes may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hog_histograms", "hog_targets"]

_WHITEN_EPS = 1e-5


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_images(images: torch.Tensor, cell_size: int) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"images must be a 4-D [B, C, H, W] tensor, got shape {tuple(images.shape)}"
        )
    if images.is_complex():
        raise ValueError("images must be real-valued")
    height, width = images.shape[-2:]
    if height % cell_size or width % cell_size:
        raise ValueError(
            f"image height and width ({height}x{width}) must be divisible by "
            f"cell_size={cell_size}"
        )


def _central_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Slice assignment (rather than padding a difference) keeps the border at
    # zero for any size, including images only one or two pixels wide.
    g_row = torch.zeros_like(x)
    g_col = torch.zeros_like(x)
    g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
    return g_row, g_col


@torch.no_grad()
def hog_histograms(
    images: torch.Tensor, cell_size: int = 8, num_bins: int = 9
) -> torch.Tensor:
    """Raw per-channel, per-cell gradient-orientation histograms.

    Args:
        images: ``[B, C, H, W]`` pixel values on the 0-255 scale (before any
            mean/std normalisation). Any real dtype; computed in float32.
        cell_size: cell side in pixels; must divide ``H`` and ``W``.
        num_bins: orientation bins over the unsigned range [0, 180) degrees.

    Returns:
        float32 ``[B, C, H // cell_size, W // cell_size, num_bins]`` on
        ``images.device``: per bin, the mean over the cell of the gradient
        magnitudes whose orientation falls in that bin.
    """
    _check_positive_int(cell_size, "cell_size")
    _check_positive_int(num_bins, "num_bins")
    _check_images(images, cell_size)

    # Autocast would silently run the trigonometry in half precision and move
    # pixels across bin edges.
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = images.to(torch.float32)
        g_row, g_col = _central_gradients(x)
        magnitude = torch.hypot(g_row, g_col)

        bin_width = 180.0 / num_bins
        angle = torch.remainder(torch.rad2deg(torch.atan2(g_row, g_col)), 180.0)
        # In float32 an angle a hair below 180 can round up to exactly 180;
        # skimage's float64 angle keeps it in the last bin, so clamp rather
        # than wrap to bin 0.
        bins = torch.floor(angle / bin_width).long().clamp_(max=num_bins - 1)

        # Each pixel writes its magnitude into exactly one slot, so this
        # scatter (unlike scatter_add) is deterministic on every device, at the
        # cost of a transient num_bins-times-larger buffer.
        votes = torch.zeros(*x.shape, num_bins, dtype=x.dtype, device=x.device)
        votes.scatter_(-1, bins.unsqueeze(-1), magnitude.unsqueeze(-1))

        b, c, h, w = x.shape
        votes = votes.view(b, c, h // cell_size, cell_size, w // cell_size, cell_size, num_bins)
        return votes.mean(dim=(3, 5))


@torch.no_grad()
def hog_targets(
    images: torch.Tensor, patch_size: int, cell_size: int = 8, num_bins: int = 9
) -> torch.Tensor:
    """Whitened HOG targets packed per token.

    Args:
        images: ``[B, C, H, W]`` pixel values on the 0-255 scale.
        patch_size: token patch side in pixels; a multiple of ``cell_size``
            that divides ``H`` and ``W``.
        cell_size: cell side in pixels.
        num_bins: orientation bins.

    Returns:
        float32 ``[B, L, (patch_size // cell_size) ** 2 * C * num_bins]`` with
        tokens in raster order (``L = (H // patch_size) * (W // patch_size)``,
        token ``r * (W // patch_size) + c`` is patch row ``r``, column ``c``).
        Within a token the features are ordered
        ``[cell_row, cell_col, channel, bin]`` (bin fastest). Each
        (cell, channel) group of ``num_bins`` values is LayerNorm-ed without
        affine (eps 1e-5), so it has zero mean and unit variance unless the
        cell is flat in that channel, in which case it is all zeros.
    """
    _check_positive_int(patch_size, "patch_size")
    _check_positive_int(cell_size, "cell_size")
    if patch_size % cell_size:
        raise ValueError(
            f"patch_size={patch_size} must be divisible by cell_size={cell_size}"
        )
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        height, width = images.shape[-2:]
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"image height and width ({height}x{width}) must be divisible by "
                f"patch_size={patch_size}"
            )

    hist = hog_histograms(images, cell_size=cell_size, num_bins=num_bins)
    with torch.autocast(device_type=hist.device.type, enabled=False):
        hist = F.layer_norm(hist, (num_bins,), eps=_WHITEN_EPS)

    b, c, hc, wc, _ = hist.shape
    k = patch_size // cell_size
    hp, wp = hc // k, wc // k
    hist = hist.view(b, c, hp, k, wp, k, num_bins)
    hist = hist.permute(0, 2, 4, 3, 5, 1, 6)  # b, hp, wp, cell_row, cell_col, c, bin
    return hist.reshape(b, hp * wp, k * k * c * num_bins)
