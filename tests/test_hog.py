import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

skimage = pytest.importorskip("skimage")
from skimage import data as skdata  # noqa: E402
from skimage.feature import hog as sk_hog  # noqa: E402

from util.hog import hog_histograms, hog_targets  # noqa: E402

SKIMAGE_L2_EPS = 1e-5


# --------------------------------------------------------------------------- helpers


def _to_tensor(hwc: np.ndarray) -> torch.Tensor:
    """[H, W, C] uint8 -> [1, C, H, W] float32 on the 0-255 scale."""
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None].float()


def _real_crops():
    # Textured, non-square crops keep skimage fast while exercising every bin.
    return {
        "astronaut": skdata.astronaut()[32:128, 160:288],
        "coffee": skdata.coffee()[100:196, 200:280],
        "chelsea": skdata.chelsea()[80:144, 120:248],
    }


def _skimage_l2_cells(channel: np.ndarray, num_bins: int = 9) -> np.ndarray:
    """skimage's per-cell histograms, each L2-normalised (1x1-cell blocks)."""
    out = sk_hog(
        channel.astype(np.float64),
        orientations=num_bins,
        pixels_per_cell=(8, 8),
        cells_per_block=(1, 1),
        block_norm="L2",
        feature_vector=False,
        transform_sqrt=False,
    )
    return out[:, :, 0, 0, :]


def _l2_like_skimage(hist: np.ndarray) -> np.ndarray:
    return hist / np.sqrt(np.sum(hist**2, axis=-1, keepdims=True) + SKIMAGE_L2_EPS**2)


def _reference_histograms(image: np.ndarray, cell: int, num_bins: int) -> np.ndarray:
    """Straightforward per-pixel reimplementation of the spec, for one [H, W] channel."""
    h, w = image.shape
    hist = np.zeros((h // cell, w // cell, num_bins))
    for r in range(h):
        for c in range(w):
            g_row = image[r + 1, c] - image[r - 1, c] if 0 < r < h - 1 else 0.0
            g_col = image[r, c + 1] - image[r, c - 1] if 0 < c < w - 1 else 0.0
            angle = math.degrees(math.atan2(g_row, g_col)) % 180.0
            b = int(angle // (180.0 / num_bins)) % num_bins
            hist[r // cell, c // cell, b] += math.hypot(g_row, g_col)
    return hist / (cell * cell)


def _random_images(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float()


# --------------------------------------------------------------------------- skimage parity


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_matches_skimage_on_real_images(name):
    crop = _real_crops()[name]
    ours = hog_histograms(_to_tensor(crop))[0].numpy().astype(np.float64)

    for ch in range(3):
        expected = _skimage_l2_cells(crop[..., ch])
        got = _l2_like_skimage(ours[ch])
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

        # The comparison has teeth: real images fill many bins, and neither a
        # bin shift nor a mirrored orientation (flipped row-gradient sign)
        # would pass.
        assert (expected > 0.05).sum(axis=-1).mean() > 2
        shifted = np.roll(got, 1, axis=-1)
        mirrored = got[..., ::-1]
        for wrong in (shifted, mirrored):
            assert np.abs(wrong - expected).max() > 0.1


def test_matches_skimage_raw_cell_means():
    # The public skimage API only exposes normalised cells; its raw
    # histograms pin down the per-cell scale (mean, not sum).
    hoghistogram = pytest.importorskip("skimage.feature._hoghistogram")
    crop = _real_crops()["astronaut"]
    ours = hog_histograms(_to_tensor(crop))[0].numpy()
    for ch in range(3):
        channel = crop[..., ch].astype(np.float64)
        g_row = np.zeros_like(channel)
        g_col = np.zeros_like(channel)
        g_row[1:-1] = channel[2:] - channel[:-2]
        g_col[:, 1:-1] = channel[:, 2:] - channel[:, :-2]
        h, w = channel.shape
        raw = np.zeros((h // 8, w // 8, 9))
        try:
            hoghistogram.hog_histograms(g_col, g_row, 8, 8, w, h, w // 8, h // 8, 9, raw)
        except TypeError:
            pytest.skip("private skimage histogram signature changed")
        np.testing.assert_allclose(ours[ch], raw, rtol=1e-5, atol=1e-4)


def test_matches_independent_reference_including_borders():
    images = _random_images(2, 3, 16, 24, seed=1)
    ours = hog_histograms(images).numpy()
    for b in range(2):
        for ch in range(3):
            ref = _reference_histograms(images[b, ch].double().numpy(), 8, 9)
            np.testing.assert_allclose(ours[b, ch], ref, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- hand-computed cases


def test_constant_image_gives_zeros():
    images = torch.full((2, 3, 16, 32), 123.0)
    assert torch.count_nonzero(hog_histograms(images)) == 0
    assert torch.count_nonzero(hog_targets(images, patch_size=16)) == 0


@pytest.mark.parametrize("slope", [3.0, -3.0])
def test_horizontal_ramp_goes_to_bin_zero(slope):
    # Increasing and decreasing ramps are 0 and 180 degrees: the same
    # unsigned orientation.
    ramp = 100.0 + slope * torch.arange(16.0)
    images = ramp.expand(1, 1, 16, 16)
    hist = hog_histograms(images)[0, 0]

    # Each 8x8 cell has 7 interior columns (the image's first/last column has
    # no gradient) of 8 pixels with |g| = 2 * |slope|.
    expected = 7 * 8 * 2 * abs(slope) / 64
    torch.testing.assert_close(hist[..., 0], torch.full((2, 2), expected))
    assert torch.count_nonzero(hist[..., 1:]) == 0


def test_orientation_convention_row_gradient_points_down():
    rows = torch.arange(16.0).view(16, 1)
    cols = torch.arange(16.0).view(1, 16)
    cases = {
        "vertical": (2 * rows).expand(16, 16),  # 90 degrees
        "down_right": rows + cols,  # g_row = g_col > 0: 45 degrees
        "up_right": cols - rows,  # g_row < 0 < g_col: 135 degrees
    }
    expected_bin = {"vertical": 4, "down_right": 2, "up_right": 6}
    for name, image in cases.items():
        hist = hog_histograms(image.expand(1, 1, 16, 16))[0, 0]
        # Cell (0, 0): 7 x 7 interior pixels outweigh the 7 + 7 border ones.
        dominant = hist[0, 0].argmax().item()
        assert dominant == expected_bin[name], name
        np.testing.assert_allclose(
            _l2_like_skimage(hist.numpy().astype(np.float64)),
            _skimage_l2_cells(image.numpy()),
            atol=1e-5,
        )


def _diagonal():
    return torch.arange(16.0).view(16, 1) + torch.arange(16.0).view(1, 16)


def _vertical():
    return (2 * torch.arange(16.0).view(16, 1)).expand(16, 16)


@pytest.mark.parametrize(
    "make_image, num_bins, expected_bin",
    [(_diagonal, 4, 1), (_vertical, 2, 1), (_vertical, 4, 2)],
    ids=["45deg-4bins", "90deg-2bins", "90deg-4bins"],
)
def test_angle_on_bin_edge_goes_to_upper_bin(make_image, num_bins, expected_bin):
    # 45 and 90 degrees sit exactly on a bin edge for these bin counts.
    image = make_image()
    hist = hog_histograms(image.expand(1, 1, 16, 16), num_bins=num_bins)[0, 0]
    assert hist[0, 0].argmax().item() == expected_bin
    np.testing.assert_allclose(
        _l2_like_skimage(hist.numpy().astype(np.float64)),
        _skimage_l2_cells(image.numpy(), num_bins=num_bins),
        atol=1e-5,
    )


def test_angle_just_below_180_stays_in_last_bin():
    # At pixel (2, 1): g_row = -1e-5, g_col = 200, i.e. -3e-6 degrees. float32
    # rounds 180 - 3e-6 to exactly 180; skimage (float64) puts it in bin 8.
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 2] = 200.0
    image[0, 0, 1, 1] = 1e-5
    hist = hog_histograms(image)[0, 0]
    assert hist[0, 0, 8] * 64 == pytest.approx(200.0)
    np.testing.assert_allclose(
        _l2_like_skimage(hist.numpy().astype(np.float64)),
        _skimage_l2_cells(image[0, 0].numpy()),
        atol=1e-5,
    )


def test_border_pixels_have_zero_gradient():
    # A step between the first and second column is invisible at column 0
    # (border) but seen by column 1's central difference.
    image = torch.zeros(1, 1, 8, 16)
    image[..., 0] = 100.0
    hist = hog_histograms(image)[0, 0]
    expected = torch.zeros(1, 2, 9)
    expected[0, 0, 0] = 8 * 100.0 / 64  # column 1, all 8 rows, 180 -> bin 0
    torch.testing.assert_close(hist, expected)

    # Rows: the top/bottom rows get no row gradient, so a step confined to
    # row 0 is only seen by row 1.
    image = torch.zeros(1, 1, 16, 8)
    image[..., 0, :] = 100.0
    hist = hog_histograms(image)[0, 0]
    expected = torch.zeros(2, 1, 9)
    expected[0, 0, 4] = 8 * 100.0 / 64  # row 1, g_row = -100 -> 270 % 180 = 90
    torch.testing.assert_close(hist, expected)


# --------------------------------------------------------------------------- targets layout


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_target_shape(size):
    images = _random_images(2, 3, *size)
    out = hog_targets(images, patch_size=16)
    num_tokens = (size[0] // 16) * (size[1] // 16)
    assert out.shape == (2, num_tokens, 108)
    assert out.dtype == torch.float32


def test_packing_order_is_cell_row_cell_col_channel_bin():
    images = _random_images(2, 3, 32, 48, seed=2)
    patch, cell, bins = 16, 8, 9
    out = hog_targets(images, patch_size=patch)
    whitened = F.layer_norm(hog_histograms(images), (bins,), eps=1e-5)
    k = patch // cell
    wp = 48 // patch
    for b in range(2):
        for r in range(32 // patch):
            for c in range(wp):
                token = out[b, r * wp + c]
                for i in range(k):
                    for j in range(k):
                        for ch in range(3):
                            start = ((i * k + j) * 3 + ch) * bins
                            torch.testing.assert_close(
                                token[start : start + bins],
                                whitened[b, ch, r * k + i, c * k + j],
                            )


def test_token_only_depends_on_its_patch():
    images = _random_images(1, 3, 32, 48, seed=3)
    base = hog_targets(images, patch_size=16)
    perturbed = images.clone()
    # Patch (1, 1) covers rows/cols 16..31; a pixel two away from its edges
    # only changes central differences inside that patch.
    perturbed[0, 1, 21, 22] += 97.0
    changed = (hog_targets(perturbed, patch_size=16) != base).any(dim=-1)[0]
    expected = torch.zeros(6, dtype=torch.bool)
    expected[1 * 3 + 1] = True
    assert torch.equal(changed, expected)


def test_cells_are_whitened():
    images = _random_images(2, 3, 32, 32, seed=4)
    # Up to row/col 8 so that cell (0, 0)'s central differences are all zero.
    images[:, :, :9, :9] = 50.0
    num_flat = (hog_histograms(images).std(dim=-1) == 0).sum().item()
    assert num_flat == 2 * 3  # cell (0, 0) of every image and channel

    groups = hog_targets(images, patch_size=16).reshape(-1, 9)
    zero = (groups == 0).all(dim=-1)
    assert zero.sum().item() == num_flat
    live = groups[~zero]
    torch.testing.assert_close(live.mean(-1), torch.zeros(len(live)), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        live.var(-1, unbiased=False), torch.ones(len(live)), atol=1e-3, rtol=0
    )


# --------------------------------------------------------------------------- batching, dtypes


def test_batch_equals_single_images():
    images = _random_images(4, 3, 32, 48, seed=5)
    batched_hist = hog_histograms(images)
    batched = hog_targets(images, patch_size=16)
    for b in range(4):
        torch.testing.assert_close(batched_hist[b : b + 1], hog_histograms(images[b : b + 1]))
        torch.testing.assert_close(batched[b : b + 1], hog_targets(images[b : b + 1], 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.uint8])
def test_other_dtypes_return_float32(dtype):
    # 0-255 integers are exact in all of these, so results must match.
    images = _random_images(2, 3, 32, 32, seed=6)
    expected = hog_targets(images, patch_size=16)
    got = hog_targets(images.to(dtype), patch_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    assert hog_histograms(images.to(dtype)).dtype == torch.float32


def test_autocast_does_not_lower_precision():
    images = _random_images(2, 3, 32, 32, seed=7)
    expected = hog_targets(images, patch_size=16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = hog_targets(images, patch_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_no_autograd_graph():
    images = _random_images(1, 3, 16, 16).requires_grad_()
    assert not hog_targets(images, patch_size=16).requires_grad


# --------------------------------------------------------------------------- validation


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="4-D"):
        hog_histograms(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="cell_size"):
        hog_histograms(torch.zeros(1, 3, 16, 20))
    with pytest.raises(ValueError, match="num_bins"):
        hog_histograms(torch.zeros(1, 3, 16, 16), num_bins=0)
    with pytest.raises(ValueError, match="patch_size=12 must be divisible by cell_size=8"):
        hog_targets(torch.zeros(1, 3, 24, 24), patch_size=12)
    with pytest.raises(ValueError, match="patch_size"):
        hog_targets(torch.zeros(1, 3, 32, 40), patch_size=16)
    with pytest.raises(ValueError, match="4-D"):
        hog_targets(torch.zeros(3, 32, 32), patch_size=16)


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    images = torch.cat([_to_tensor(crop[:64, :64]) for crop in _real_crops().values()])
    cpu_hist = hog_histograms(images)
    cuda_hist = hog_histograms(images.to("cuda"))
    assert cuda_hist.device.type == "cuda"
    torch.testing.assert_close(cuda_hist.cpu(), cpu_hist, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        hog_targets(images.to("cuda"), 16).cpu(), hog_targets(images, 16), rtol=1e-4, atol=1e-4
    )
