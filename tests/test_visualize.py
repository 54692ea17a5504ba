"""Pictures of the model: panels (masks, coverage, HOG glyphs, pixel reconstructions), make_figure, visualize.py."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import models_dmjd
import visualize
from main_pretrain import get_args_parser as pretrain_args_parser
from util.hog import hog_histograms, hog_targets
from util.visualization import (NOT_MASKED, NOT_PREDICTED, coverage_panel, hog_cells, hog_panel, make_figure,
                                mask_overlay, pixel_reconstruction, view_colors)
from util.visualization import IGNORE_COLOR, colorize_labels, label_legend, label_palette, segmentation_figure

ROOT = Path(__file__).resolve().parents[1]


def smooth_image(size=64, seed=0):
    """A uint8 [size, size, 3] image with structure (HOG needs edges): coloured rectangles plus a little noise."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 40, np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size - 16, 2)
        img[y:y + 16, x:x + 20] = rng.integers(60, 256, 3)
    return img + rng.integers(0, 8, img.shape, dtype=np.uint8)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64, **kwargs)


# -- mask overlay and coverage -----------------------------------------------------------------------------------------
def test_mask_overlay_greys_masked_tokens_only():
    img = smooth_image(32)
    mask = np.array([True, False, False, True])  # 2 x 2 grid of 16-pixel tokens
    out = mask_overlay(img, mask, (2, 2), 16, grid_lines=False)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:16, 16:], img[:16, 16:])  # visible tokens untouched
    np.testing.assert_array_equal(out[16:, :16], img[16:, :16])
    for masked in (out[:16, :16], out[16:, 16:]):
        assert np.abs(masked.astype(int) - 128).max() <= 0.25 * 255 + 1  # pulled towards grey
    assert np.abs(out[:16, :16].astype(int) - img[:16, :16]).mean() > 20
    # the [3, H, W] layout of a crop tensor, upscaling and token grid lines
    big = mask_overlay(torch.from_numpy(img).permute(2, 0, 1), mask, (2, 2), 16, scale=3)
    assert big.shape == (96, 96, 3) and (big[48, 5] < big[47, 5]).all()  # a darker border line at the token edge
    with pytest.raises(ValueError, match="not a 3 x 3 grid"):
        mask_overlay(img, np.zeros(9, bool), (3, 3), 16)


def test_coverage_panel_colours_for_two_views():
    # tokens: view 1 only, view 2 only, both, none
    masks = np.array([[True, False, True, False], [False, True, True, False]])
    panel = coverage_panel(masks, (2, 2), 16, grid_lines=False)
    assert panel.shape == (32, 32, 3) and panel.dtype == np.uint8
    blue, orange = view_colors(2)
    assert (panel[:16, :16] == blue).all() and (panel[:16, 16:] == orange).all()
    assert (panel[16:, 16:] == NOT_MASKED).all()
    both = panel[16:, :16].reshape(-1, 3)
    is_blue, is_orange = (both == blue).all(axis=1), (both == orange).all(axis=1)
    assert (is_blue | is_orange).all() and 0.3 < is_blue.mean() < 0.7  # stripes of both colours
    assert not (blue == orange).all()
    with_image = coverage_panel(masks, (2, 2), 16, image=smooth_image(32), scale=2)
    assert with_image.shape == (64, 64, 3)


def test_coverage_panel_for_three_views_and_one():
    masks = np.array([[True, True], [True, False], [True, False]])
    panel = coverage_panel(masks, (1, 2), 16, grid_lines=False)
    colors = {tuple(c) for c in panel[:, :16].reshape(-1, 3)}
    assert colors == {tuple(c) for c in view_colors(3)}
    assert (panel[:, 16:] == view_colors(3)[0]).all()
    single = coverage_panel(np.array([[False, True]]), (1, 2), 16, grid_lines=False)
    assert (single[:, :16] == NOT_MASKED).all() and (single[:, 16:] == view_colors(1)[0]).all()


# -- HOG ---------------------------------------------------------------------------------------------------------------
def test_hog_cells_unpack_the_token_layout():
    # 2 x 2 tokens of 16 pixels, 8-pixel cells: 4 cells per token, [cell_row, cell_col, channel, bin]
    tokens = np.zeros((4, 2, 2, 3, 9), np.float32)
    tokens[1, 1, 0, :, 3] = 5.0  # token (0, 1), its cell (1, 0), bin 3, every channel
    tokens[2, 0, 1, 0, 7] = 3.0  # token (1, 0), its cell (0, 1), bin 7, first channel only
    cells = hog_cells(tokens.reshape(4, -1), (2, 2), 16)
    assert cells.shape == (4, 4, 9)
    expected = np.zeros((4, 4, 9), np.float32)
    expected[1, 2, 3] = 5.0
    expected[2, 1, 7] = 1.0  # averaged over the 3 channels
    np.testing.assert_allclose(cells, expected)


def test_hog_cells_match_the_whitened_histograms():
    img = torch.from_numpy(smooth_image(64)).permute(2, 0, 1)[None]
    targets = hog_targets(img, 16)[0]
    hist = F.layer_norm(hog_histograms(img), (9,), eps=1e-5)[0]  # [C, Hc, Wc, bins]
    np.testing.assert_allclose(hog_cells(targets, (4, 4), 16), hist.mean(0).numpy(), atol=1e-5)


def glyph_of_gradient(g_row: float, g_col: float, glyph=24):
    """The glyph picture of the middle cell of a linear ramp with the given row/column gradient."""
    rows, cols = np.mgrid[0:32, 0:32]
    ramp = np.clip(100 + g_row * rows + g_col * cols, 0, 255).round().astype(np.uint8)
    img = torch.from_numpy(np.repeat(ramp[..., None], 3, axis=-1)).permute(2, 0, 1)[None]
    tokens = hog_targets(img, 16)[0]
    panel = hog_panel(tokens, (2, 2), 16, scale=glyph // 8, grid_lines=False)
    assert panel.shape == (4 * glyph, 4 * glyph, 3) and panel.dtype == np.uint8
    cell = panel[glyph:2 * glyph, glyph:2 * glyph, 0].astype(int)  # cell (1, 1): interior, away from the border
    return np.argwhere(cell > 128) - (glyph - 1) / 2  # lit pixels, offsets from the cell centre (row, col)


def line_angle(lit: np.ndarray) -> float:
    """Direction of the principal axis of lit pixels (row, col offsets), degrees in [0, 180), x right and y down."""
    _, _, vt = np.linalg.svd(lit - lit.mean(axis=0), full_matrices=False)
    d_row, d_col = vt[0]
    return float(np.degrees(np.arctan2(d_row, d_col)) % 180)


def test_hog_glyph_lines_run_along_the_edges():
    # Each bin draws a line at its centre angle + 90 degrees (perpendicular to the gradient).
    # Intensity growing to the right (gradient 0 degrees, bin 0 centred on 10): an almost vertical line.
    lit = glyph_of_gradient(0.0, 3.0)
    assert np.ptp(lit[:, 0]) >= 16 and np.abs(lit[:, 1]).max() <= 3
    assert abs(line_angle(lit) - 100) < 3
    # Intensity growing downwards (90 degrees, the middle of bin 4): an exactly horizontal line.
    lit = glyph_of_gradient(3.0, 0.0)
    assert np.ptp(lit[:, 1]) >= 16 and np.abs(lit[:, 0]).max() <= 1
    assert min(line_angle(lit), 180 - line_angle(lit)) < 1
    # Down-right (45 degrees in util.hog's rows-down convention, bin 2 centred on 50): the edge runs like "/",
    # from the top-right (row offset < 0, column offset > 0) to the bottom-left.
    lit = glyph_of_gradient(3.0, 3.0)
    assert abs(line_angle(lit) - 140) < 3
    far = lit[np.abs(lit).min(axis=1) > 3]
    top_right = ((far[:, 0] < 0) & (far[:, 1] > 0)).sum()
    bottom_left = ((far[:, 0] > 0) & (far[:, 1] < 0)).sum()
    assert top_right >= 6 and bottom_left >= 6 and top_right + bottom_left == len(far)


def test_hog_panel_blanks_tokens_not_shown_and_flat_cells_are_black():
    tokens = np.zeros((4, 108), np.float32)  # flat everywhere: whitened histograms are zeros
    panel = hog_panel(tokens, (2, 2), 16, scale=2, shown=np.array([True, False, True, True]), grid_lines=False)
    assert (panel[:32, 32:] == NOT_PREDICTED).all()
    assert (panel[:32, :32] == 0).all() and (panel[32:] == 0).all()
    with pytest.raises(ValueError, match="HOG tokens of shape"):
        hog_panel(np.zeros((4, 100)), (2, 2), 16)


# -- pixels ------------------------------------------------------------------------------------------------------------
def test_pixel_reconstruction_inverts_the_normalised_target():
    model = tiny_model(pred_type="pixel")
    img = smooth_image(64)
    x = model.normalize(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    target = models_dmjd.normalized_pixel_targets(x, 16)[0]
    mean, std = model.pixel_mean.flatten().numpy(), model.pixel_std.flatten().numpy()
    recon = pixel_reconstruction(target, img, (4, 4), 16, mean, std)
    assert recon.shape == img.shape and recon.dtype == np.uint8
    assert np.abs(recon.astype(int) - img).max() <= 1
    shown = np.zeros(16, bool)
    shown[5] = True
    partial = pixel_reconstruction(np.zeros_like(target), img, (4, 4), 16, mean, std, shown)
    np.testing.assert_array_equal(partial[:16], img[:16])  # tokens not shown keep the input
    assert np.abs(partial[16:32, 16:32].astype(int) - img[16:32, 16:32]).max() > 10  # the patch's mean colour


# -- make_figure -------------------------------------------------------------------------------------------------------
def crops(n=2):
    return torch.stack([torch.from_numpy(smooth_image(64, seed=s)).permute(2, 0, 1) for s in range(n)])


def test_make_figure_on_a_tiny_model_restores_the_mode():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figure = make_figure(model, crops(2), seed=3)
    assert figure.dtype == np.uint8 and figure.ndim == 3 and figure.shape[2] == 3
    # 8 columns (input, 2 views, masked by, HOG target, 2 predictions, all views) of 192-pixel panels
    assert figure.shape[1] == 8 * 192 + 9 * 4 and figure.shape[0] > 2 * 192
    assert model.training
    np.testing.assert_array_equal(make_figure(model.eval(), crops(2), seed=3), figure)  # seeded masks
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    masks = torch.zeros(2, 2, 16, dtype=torch.bool)
    masks[0, :, :8] = masks[1, :, 8:] = True
    assert not np.array_equal(make_figure(model, crops(2), masks=masks), figure)


@pytest.mark.parametrize("kwargs, columns", [
    ({"pred_type": "pixel"}, 7),  # no HOG target column
    ({"num_views": 3, "mask_ratio": 0.75, "mask_type": "rand"}, 10),
    ({"num_views": 1, "pred_ratio": 0.6, "theta": 0.0}, 5),  # no "all views" column
    ({"vis_target": "ema"}, 8),  # the visible branch is not run: no teacher needed
])
def test_make_figure_configurations(kwargs, columns):
    figure = make_figure(tiny_model(**kwargs), crops(1), min_panel=64, min_glyph=0)
    assert figure.shape[1] == columns * 64 + (columns + 1) * 4 and figure.dtype == np.uint8


def test_make_figure_rejects_bad_images():
    model = tiny_model()
    with pytest.raises(ValueError, match="uint8"):
        make_figure(model, crops(1).float())
    with pytest.raises(ValueError, match="the model takes"):
        make_figure(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# -- visualize.py ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(image_folder):
    return image_folder("images", {"train": 2})


def test_visualize_script_with_a_checkpoint(folder, tmp_path):
    args = pretrain_args_parser().parse_args(["--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64",
                                              "--num_views", "2", "--pred_ratio", "1.0"])
    model = tiny_model()
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": dict(vars(args))}, ckpt)
    out = tmp_path / "pictures" / "vis.png"
    cmd = [sys.executable, str(ROOT / "visualize.py"), "--checkpoint", str(ckpt), "--data_path", str(folder),
           "--num_images", "3", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out) and "epoch 3" in proc.stdout
    with Image.open(out) as img:
        assert img.mode == "RGB" and img.width == 8 * 192 + 9 * 4 and img.height > 3 * 192


def test_visualize_random_model_and_overrides(folder, tmp_path, capsys):
    out = tmp_path / "vis.png"
    parser = visualize.get_args_parser()
    visualize.main(parser.parse_args([
        "--data_path", str(folder), "--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64",
        "--num_views", "3", "--mask_ratio", "0.5", "--num_images", "1", "--output", str(out)]))
    printed = capsys.readouterr().out
    assert "randomly initialised" in printed and "3 view(s)" in printed and "pred_ratio 1" in printed
    with Image.open(out) as img:
        assert img.width == 10 * 192 + 11 * 4

    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(SystemExit, match="not a main_pretrain.py checkpoint"):
        visualize.main(parser.parse_args(["--checkpoint", str(bad), "--data_path", str(folder)]))
    with pytest.raises(SystemExit, match="checkpoint not found"):
        visualize.main(parser.parse_args(["--checkpoint", str(tmp_path / "none.pth"), "--data_path", str(folder)]))
    with pytest.raises(SystemExit, match="--model"):
        visualize.main(parser.parse_args(["--data_path", str(folder), "--model", "resnet50"]))


# -- segmentation -----------------------------------------------------------------------------------------------------
def test_label_palette_is_distinct_and_never_the_ignore_colour():
    palette = label_palette(150)
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 150 and not (palette == IGNORE_COLOR).all(axis=1).any()
    np.testing.assert_array_equal(label_palette(3), palette[:3])
    first = palette[:12].astype(float)  # e.g. the Fashion-MNIST segmentation set's 11 classes: far apart
    assert min(np.linalg.norm(first[a] - first[b]) for a in range(12) for b in range(a)) > 60


def test_colorize_labels_paints_classes_and_ignored_pixels():
    palette = label_palette(4)
    out = colorize_labels(torch.tensor([[0, 3], [255, 1]]), palette)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert [tuple(out[0, 0]), tuple(out[0, 1]), tuple(out[1, 0]), tuple(out[1, 1])] == \
        [tuple(palette[0]), tuple(palette[3]), IGNORE_COLOR, tuple(palette[1])]
    with pytest.raises(ValueError, match="label 4 has no colour"):
        colorize_labels(np.array([[4]]), palette)


def test_label_legend_wraps_to_the_width():
    entries = [((200, 0, 0), f"class number {k}") for k in range(12)]
    one_line = label_legend(entries[:1], 400)
    wrapped = label_legend(entries, 400)
    assert one_line.shape[1] == wrapped.shape[1] == 400 and wrapped.shape[0] >= 3 * one_line.shape[0]
    assert ((wrapped == (200, 0, 0)).all(-1)).any()  # the swatches are drawn


def test_segmentation_figure_sets_image_truth_and_prediction_side_by_side():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (2, 32, 32))
    labels[0, :4] = 255
    preds = torch.from_numpy(rng.integers(0, 3, (2, 32, 32)))
    names = ["background", "shirt", "bag", "never shown"]
    figure = segmentation_figure(images, labels, preds, names, min_panel=64)
    assert figure.dtype == np.uint8 and figure.shape[1] == 3 * 64 + 4 * 4
    palette = label_palette(4)
    legend = label_legend([(palette[k], names[k]) for k in range(3)] + [(IGNORE_COLOR, "ignored")], 208)
    top = figure.shape[0] - legend.shape[0] - 2 * (64 + 4)  # below the titles
    np.testing.assert_array_equal(figure[-legend.shape[0]:], legend)  # classes shown, and the ignore colour
    first_row = figure[top:top + 64]
    np.testing.assert_array_equal(first_row[:, 4:68], images[0].repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(first_row[:, 72:136], colorize_labels(labels[0], palette).repeat(2, 0)
                                  .repeat(2, 1))
    np.testing.assert_array_equal(first_row[:, 140:204], colorize_labels(preds[0], palette).repeat(2, 0)
                                  .repeat(2, 1))
    with pytest.raises(ValueError, match="must be 32 x 32"):
        segmentation_figure(images, labels[:, :16], preds, names)


def test_segmentation_figure_puts_more_predictions_in_further_columns():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    labels, first, second = (rng.integers(0, 3, (2, 16, 16)) for _ in range(3))
    second[1, 0, 0] = 3  # a class only the second model predicts is in the legend
    names = ["a", "b", "c", "d"]
    figure = segmentation_figure(images, labels, first, names, min_panel=32, more_predictions=[second],
                                 titles=("image", "ground truth", "model 1", "model 2"))
    assert figure.shape[1] == 4 * 32 + 5 * 4
    legend = label_legend([(label_palette(4)[k], names[k]) for k in range(4)], figure.shape[1])
    np.testing.assert_array_equal(figure[-legend.shape[0]:], legend)
    top = figure.shape[0] - legend.shape[0] - 2 * (32 + 4)
    np.testing.assert_array_equal(figure[top:top + 32, 4 + 3 * 36:4 + 3 * 36 + 32],
                                  colorize_labels(second[0], label_palette(4)).repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match="3 titles for 4 columns"):
        segmentation_figure(images, labels, first, names, more_predictions=[second])
