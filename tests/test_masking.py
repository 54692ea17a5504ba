import itertools

import pytest
import torch

from util.masking import disjoint_masks, num_masked_units, union_size

# (grid_size, mask_type, block_size)
LAYOUTS = [
    ((14, 14), "block", 2),
    ((14, 14), "rand", 2),
    ((4, 4), "rand", 2),
    ((4, 4), "block", 2),
    ((6, 8), "rand", 2),
    ((6, 8), "block", 2),
    ((8, 8), "block", 2),
    ((12, 12), "block", 3),
]
RATIOS = [0.3, 0.5, 0.6, 0.75, 0.9]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def unit_grid(grid, mask_type, block):
    b = block if mask_type == "block" else 1
    return grid[0] // b, grid[1] // b, b


def expected_n_mask(n, m):
    return n - int(n * (1 - m))


def valid(n, m):
    return 0 < expected_n_mask(n, m) < n


def to_units(masks, grid, mask_type, block):
    """Patch-level masks [K, B, L] -> unit-level masks [K, B, n_units] (top-left patch of each block)."""
    uh, uw, b = unit_grid(grid, mask_type, block)
    k, bs, _ = masks.shape
    return masks.view(k, bs, uh, b, uw, b)[:, :, :, 0, :, 0].reshape(k, bs, uh * uw)


def count_cases():
    for (grid, mt, bl), m, k in itertools.product(LAYOUTS, RATIOS, [1, 2, 3, 4]):
        uh, uw, _ = unit_grid(grid, mt, bl)
        if not valid(uh * uw, m):
            continue
        for pred in sorted({m, max(m, 0.8), 1.0}):
            yield grid, mt, bl, m, k, pred


@pytest.mark.parametrize("grid,mask_type,block,mask_ratio,num_views,pred_ratio", list(count_cases()))
def test_exact_count_and_union(grid, mask_type, block, mask_ratio, num_views, pred_ratio):
    masks = disjoint_masks(16, grid, num_views, mask_ratio, pred_ratio, mask_type, block, generator=gen())
    units = to_units(masks, grid, mask_type, block)
    n = units.shape[-1]
    n_mask = expected_n_mask(n, mask_ratio)
    b = unit_grid(grid, mask_type, block)[2]
    assert (units.sum(-1) == n_mask).all()
    assert (masks.sum(-1) == n_mask * b * b).all()
    expected_union = min(n, max(n_mask, round(pred_ratio * n)), num_views * n_mask)
    assert union_size(n, num_views, mask_ratio, pred_ratio) == expected_union
    assert (units.any(0).sum(-1) == expected_union).all()


@pytest.mark.parametrize("mask_type", ["block", "rand"])
@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_shape_dtype_device(mask_type, num_views):
    masks = disjoint_masks(5, (6, 8), num_views, 0.5, mask_type=mask_type, device="cpu", generator=gen())
    assert masks.shape == (num_views, 5, 48)
    assert masks.dtype == torch.bool
    assert masks.device == torch.device("cpu")


def test_int_grid_equals_square_tuple():
    assert torch.equal(disjoint_masks(4, 14, 2, 0.6, generator=gen(3)),
                       disjoint_masks(4, (14, 14), 2, 0.6, generator=gen(3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_with_cpu_generator():
    masks = disjoint_masks(8, 14, 2, 0.6, generator=gen(1), device="cuda")
    assert masks.is_cuda
    assert torch.equal(masks.cpu(), disjoint_masks(8, 14, 2, 0.6, generator=gen(1)))


def test_released_recipe():
    masks = disjoint_masks(64, (14, 14), 2, 0.6, 1.0, "block", 2, generator=gen())
    units = to_units(masks, (14, 14), "block", 2)
    assert num_masked_units(49, 0.6) == 30
    assert (units.sum(-1) == 30).all()
    assert (masks.sum(-1) == 120).all()
    assert masks.any(0).all()  # the union is every patch
    assert not (~masks[0] & ~masks[1]).any()  # visible sets disjoint


@pytest.mark.parametrize("num_views,mask_ratio", [(2, 0.6), (2, 0.5), (3, 0.75), (4, 0.75), (3, 0.7), (4, 0.8)])
@pytest.mark.parametrize("grid,mask_type,block", [((14, 14), "block", 2), ((14, 14), "rand", 2), ((12, 12), "block", 3)])
def test_visible_sets_pairwise_disjoint(num_views, mask_ratio, grid, mask_type, block):
    assert num_views * (1 - mask_ratio) <= 1 + 1e-9
    masks = disjoint_masks(32, grid, num_views, mask_ratio, 1.0, mask_type, block, generator=gen())
    visible_times = (~masks).sum(0)
    assert visible_times.max() <= 1


@pytest.mark.parametrize("num_views", [2, 3, 4])
@pytest.mark.parametrize("mask_ratio", [0.3, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("mask_type", ["block", "rand"])
def test_visibility_balanced_when_pred_is_one(num_views, mask_ratio, mask_type):
    # With pred_ratio = 1 every view hides the units hidden least so far (fresh units have been hidden 0 times),
    # i.e. water-filling: per sample, visible counts over the views differ by at most one between units.
    masks = disjoint_masks(64, (14, 14), num_views, mask_ratio, 1.0, mask_type, generator=gen())
    visible_times = (~to_units(masks, (14, 14), mask_type, 2)).sum(0)
    assert ((visible_times.max(-1).values - visible_times.min(-1).values) <= 1).all()


def test_visibility_balanced_example():
    # K=3, m=0.5 at 49 blocks: 25 hidden / 24 visible per view, 72 visibilities over 49 units -> 23 twice, 26 once.
    masks = disjoint_masks(32, 14, 3, 0.5, generator=gen())
    visible_times = (~to_units(masks, (14, 14), "block", 2)).sum(0)
    assert ((visible_times == 2).sum(-1) == 23).all()
    assert ((visible_times == 1).sum(-1) == 26).all()


@pytest.mark.parametrize("num_views", [2, 3, 4])
@pytest.mark.parametrize("mask_ratio,pred_ratio", [(0.3, 0.3), (0.3, 0.5), (0.4, 0.7), (0.5, 0.8), (0.6, 1.0),
                                                   (0.75, 0.9), (0.2, 1.0), (0.5, 0.5)])
@pytest.mark.parametrize("mask_type", ["block", "rand"])
def test_fewest_visible_stay_visible(num_views, mask_ratio, pred_ratio, mask_type):
    # The rule itself, view by view: among units already in the union, none kept visible has been visible in more
    # earlier views than any unit hidden again; units outside the union are taken only to grow it.
    masks = to_units(disjoint_masks(64, (14, 14), num_views, mask_ratio, pred_ratio, mask_type, generator=gen()),
                     (14, 14), mask_type, 2)
    n = masks.shape[-1]
    n_mask = expected_n_mask(n, mask_ratio)
    target = min(n, max(n_mask, round(pred_ratio * n)))
    union = masks[0].clone()
    for v in range(1, num_views):
        prior_visible = (~masks[:v]).sum(0)
        kept = union & ~masks[v]
        rehidden = union & masks[v]
        max_kept = torch.where(kept, prior_visible, -1).max(-1).values
        min_rehidden = torch.where(rehidden, prior_visible, n).min(-1).values
        assert (max_kept <= min_rehidden).all()
        fresh_taken = (masks[v] & ~union).sum(-1)
        assert (fresh_taken == min(n_mask, max(0, target - union[0].sum().item()))).all()
        union |= masks[v]
    assert (~union).logical_and(masks.any(0)).sum() == 0


@pytest.mark.parametrize("grid,block", [((14, 14), 2), ((8, 8), 2), ((12, 12), 3), ((6, 8), 2), ((12, 12), 4)])
@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_block_structure(grid, block, num_views):
    masks = disjoint_masks(16, grid, num_views, 0.6, mask_type="block", block_size=block, generator=gen())
    blocks = masks.view(num_views, 16, grid[0] // block, block, grid[1] // block, block)
    first = blocks[:, :, :, :1, :, :1]
    assert torch.equal(blocks, first.expand_as(blocks))


@pytest.mark.parametrize("mask_type", ["block", "rand"])
def test_samples_independent(mask_type):
    masks = disjoint_masks(256, 14, 2, 0.6, mask_type=mask_type, generator=gen())
    for view in masks:
        assert torch.unique(view, dim=0).shape[0] == 256
    assert torch.unique(masks.transpose(0, 1).reshape(256, -1), dim=0).shape[0] == 256


@pytest.mark.parametrize("num_views,mask_ratio,pred_ratio", [(1, 0.6, 1.0), (2, 0.6, 1.0), (3, 0.5, 1.0),
                                                            (3, 0.4, 0.7)])
@pytest.mark.parametrize("mask_type", ["block", "rand"])
def test_every_view_uniform_over_positions(num_views, mask_ratio, pred_ratio, mask_type):
    # No positional bias from sorting: each unit is hidden in each view with probability n_mask / n.
    batch = 4096
    masks = to_units(disjoint_masks(batch, 14, num_views, mask_ratio, pred_ratio, mask_type, generator=gen()),
                     (14, 14), mask_type, 2)
    n = masks.shape[-1]
    freq = masks.float().mean(1)
    assert (freq - expected_n_mask(n, mask_ratio) / n).abs().max() < 0.05


@pytest.mark.parametrize("mask_type", ["block", "rand"])
@pytest.mark.parametrize("num_views", [1, 2, 4])
def test_reproducible_with_generator(mask_type, num_views):
    a = disjoint_masks(32, 14, num_views, 0.75, mask_type=mask_type, generator=gen(7))
    b = disjoint_masks(32, 14, num_views, 0.75, mask_type=mask_type, generator=gen(7))
    c = disjoint_masks(32, 14, num_views, 0.75, mask_type=mask_type, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_without_generator_uses_global_seed():
    torch.manual_seed(0)
    a = disjoint_masks(8, 14, 2, 0.6)
    torch.manual_seed(0)
    assert torch.equal(a, disjoint_masks(8, 14, 2, 0.6))


@pytest.mark.parametrize("mask_type,n,n_mask", [("block", 49, 30), ("rand", 196, 118)])
def test_single_view_is_plain_random_mask(mask_type, n, n_mask):
    masks = disjoint_masks(64, 14, 1, 0.6, 1.0, mask_type, generator=gen())
    units = to_units(masks, (14, 14), mask_type, 2)
    assert masks.shape == (1, 64, 196)
    assert (units.sum(-1) == n_mask).all()
    assert union_size(n, 1, 0.6, 1.0) == n_mask
    # pred_ratio has no effect on a single view.
    assert torch.equal(masks, disjoint_masks(64, 14, 1, 0.6, 0.6, mask_type, generator=gen()))


def test_helpers():
    assert num_masked_units(49, 0.6) == 30
    assert num_masked_units(196, 0.75) == 147
    assert union_size(49, 2, 0.6, 1.0) == 49
    assert union_size(49, 1, 0.6, 1.0) == 30
    assert union_size(49, 3, 0.5, 0.7) == 34
    assert union_size(49, 2, 0.3, 1.0) == 2 * num_masked_units(49, 0.3)
    assert union_size(49, 4, 0.6, 0.6) == 30


def test_large_batch_runs():
    masks = disjoint_masks(4096, (14, 14), 2, 0.6, generator=gen())
    assert masks.shape == (2, 4096, 196)
    assert masks.any(0).all()


@pytest.mark.parametrize("kwargs,name", [
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(mask_ratio=1.5), "mask_ratio"),
    (dict(mask_ratio=1.0), "mask_ratio"),  # nothing visible
    (dict(mask_ratio=1e-20), "mask_ratio"),  # rounds to nothing hidden
    (dict(mask_ratio=0.99), "mask_ratio"),  # nothing visible at 49 units
    (dict(pred_ratio=0.0), "pred_ratio"),
    (dict(pred_ratio=1.2), "pred_ratio"),
    (dict(pred_ratio=0.5), "pred_ratio"),  # below mask_ratio
    (dict(grid_size=(14, 15)), "block_size"),
    (dict(grid_size=(14, 14), block_size=3), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(num_views=0), "num_views"),
    (dict(batch_size=0), "batch_size"),
    (dict(mask_type="grid"), "mask_type"),
    (dict(grid_size=0), "grid_size"),
])
def test_invalid_arguments(kwargs, name):
    args = dict(batch_size=2, grid_size=(14, 14), num_views=2, mask_ratio=0.6, pred_ratio=1.0, mask_type="block",
                block_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        disjoint_masks(**args)


def test_rand_ignores_block_divisibility():
    masks = disjoint_masks(2, (7, 9), 2, 0.6, mask_type="rand", block_size=2, generator=gen())
    assert masks.shape == (2, 2, 63)


@pytest.mark.parametrize("args,name", [((49, 0.0), "mask_ratio"), ((49, 1.0), "mask_ratio"), ((0, 0.5), "n_units")])
def test_num_masked_units_invalid(args, name):
    with pytest.raises(ValueError, match=name):
        num_masked_units(*args)


@pytest.mark.parametrize("args,name", [((49, 2, 0.6, 0.5), "pred_ratio"), ((49, 0, 0.6, 1.0), "num_views"),
                                       ((49, 2, 0.6, 1.1), "pred_ratio")])
def test_union_size_invalid(args, name):
    with pytest.raises(ValueError, match=name):
        union_size(*args)
