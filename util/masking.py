"""Disjoint masking for multi-view masked image modeling (DMJD).

``disjoint_masks`` draws ``num_views`` masks of the same images one view after another. Every view hides the same
number of units (single patches, or ``block_size`` x ``block_size`` blocks of patches). A later view first hides
units that no earlier view has hidden, until the union of hidden units reaches the prediction rate; the rest of
its quota is taken from already-hidden units so that the units left visible are those that have been visible in
the fewest earlier views. Visibility is thus spread evenly over the views.

``num_masked_units`` and ``union_size`` give the per-view and union sizes in units; the sampler uses them too.
"""
from typing import Optional, Tuple, Union

import torch

__all__ = ["disjoint_masks", "num_masked_units", "union_size"]

MASK_TYPES = ("block", "rand")


def num_masked_units(n_units: int, mask_ratio: float) -> int:
    """Units hidden in one view; raises ValueError unless at least one unit is hidden and one stays visible."""
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    if n_units < 1:
        raise ValueError(f"n_units must be >= 1, got {n_units}")
    n_mask = n_units - int(n_units * (1.0 - mask_ratio))
    # A view with no visible token leaves the encoder nothing to encode; one with none hidden has nothing to predict.
    if not 0 < n_mask < n_units:
        raise ValueError(f"mask_ratio {mask_ratio} hides {n_mask} of {n_units} units; "
                         f"at least one unit must be hidden and one visible")
    return n_mask


def union_size(n_units: int, num_views: int, mask_ratio: float, pred_ratio: float = 1.0) -> int:
    """Units hidden in at least one of the views that ``disjoint_masks`` draws."""
    n_mask = num_masked_units(n_units, mask_ratio)
    if not 0.0 < pred_ratio <= 1.0:
        raise ValueError(f"pred_ratio must be in (0, 1], got {pred_ratio}")
    if pred_ratio < mask_ratio:
        raise ValueError(f"pred_ratio ({pred_ratio}) must be >= mask_ratio ({mask_ratio})")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    return min(n_units, max(n_mask, round(pred_ratio * n_units)), num_views * n_mask)


def _grid(grid_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_size must be positive, got {grid_size}")
    return int(grid_h), int(grid_w)


def disjoint_masks(batch_size: int, grid_size: Union[int, Tuple[int, int]], num_views: int, mask_ratio: float,
                   pred_ratio: float = 1.0, mask_type: str = "block", block_size: int = 2,
                   generator: Optional[torch.Generator] = None,
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Bool masks ``[num_views, batch_size, grid_h * grid_w]`` over patches in raster order, True = masked.

    Samples are independent; randomness is drawn on the generator's device (or ``device`` without a generator)
    and moved to ``device``, so a seeded generator gives the same masks wherever they end up.
    """
    grid_h, grid_w = _grid(grid_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    if mask_type == "block":
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if grid_h % block_size or grid_w % block_size:
            raise ValueError(f"grid_size {(grid_h, grid_w)} is not divisible by block_size {block_size}")
    unit = block_size if mask_type == "block" else 1
    units_h, units_w = grid_h // unit, grid_w // unit
    n_units = units_h * units_w
    n_mask = num_masked_units(n_units, mask_ratio)
    target = union_size(n_units, num_views, mask_ratio, pred_ratio)

    rand_device = generator.device if generator is not None else device
    noise = torch.rand(num_views, batch_size, n_units, generator=generator, device=rand_device).to(device)
    positions = torch.arange(n_units, device=noise.device)

    # times_masked[b, u]: earlier views that hid unit u. Units outside the union have 0; hiding the least-hidden
    # units first is the same as keeping visible those visible in the fewest earlier views.
    times_masked = torch.zeros(batch_size, n_units, dtype=torch.long, device=noise.device)
    masks = []
    n_union = 0  # identical for every sample by construction
    for view in range(num_views):
        n_fresh = n_units - n_union
        n_new = min(n_mask, max(0, target - n_union))  # fresh units that grow the union, up to the target
        n_old = n_mask - n_new  # the rest of the quota is re-hidden from the union
        # target >= n_mask and target <= n_units guarantee both pools are big enough.
        assert 0 <= n_new <= n_fresh and 0 <= n_old <= n_union
        # Order each row by times_masked with random ties (a random permutation, then a stable sort): the fresh
        # units fill positions [0, n_fresh), the union follows, least-hidden first.
        perm = noise[view].argsort(dim=1)
        order = perm.gather(1, times_masked.gather(1, perm).argsort(dim=1, stable=True))
        # Hide n_new random fresh units and the n_old least-hidden union units; unchosen fresh units stay visible
        # so that the union does not exceed the target.
        hide_sorted = (positions < n_new) | ((positions >= n_fresh) & (positions < n_fresh + n_old))
        mask = torch.zeros(batch_size, n_units, dtype=torch.bool, device=noise.device).scatter_(
            1, order, hide_sorted.expand(batch_size, -1))
        times_masked += mask
        masks.append(mask)
        n_union += n_new

    masks = torch.stack(masks).view(num_views, batch_size, units_h, units_w)
    if unit > 1:
        masks = masks.repeat_interleave(unit, dim=2).repeat_interleave(unit, dim=3)
    return masks.reshape(num_views, batch_size, grid_h * grid_w)
