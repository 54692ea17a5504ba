"""Pictures of what a DMJD model sees and predicts, as uint8 RGB arrays [H, W, 3] (numpy, PIL and nothing else).

The panel functions are pure: they take tensors or arrays (a torch tensor is moved to the CPU and read as numpy)
and return new arrays. `make_figure` runs a model on a few crops and lays the panels out in a grid, one row per
image:

    input | view 1 .. view K (masked tokens greyed) | masked by (token colour = the views that hide it) |
    HOG target | HOG prediction of view 1 .. K (at the tokens that view hides) | all views (K > 1)

With `pred_type="pixel"` the HOG columns become reconstructions: the decoder's per-patch normalised pixels are
mapped back with each patch's own mean and standard deviation. Its output goes straight to TensorBoard:

    writer.add_image("pretrain/predictions", make_figure(model, images), epoch, dataformats="HWC")

HOG pictures follow util.hog's conventions: a cell's histogram is drawn as one line per orientation bin through
the cell centre, perpendicular to the bin's gradient direction (along the edge that made it), with brightness
= the bin's whitened value averaged over the colour channels, clipped at 0. Angles are measured in image
coordinates with rows growing downwards, so a gradient pointing down-right (45 degrees) draws a "/" line.

For segmentation, `segmentation_figure` sets image, ground truth and prediction side by side, the label maps in
the colours of `label_palette` (`colorize_labels`), with a legend of the classes shown (`label_legend`).
"""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["mask_overlay", "view_colors", "coverage_panel", "hog_cells", "hog_glyphs",
           "hog_panel", "pixel_reconstruction", "upscale", "draw_token_grid", "make_figure", "label_palette",
           "colorize_labels", "label_legend", "segmentation_figure"]

MASKED_GREY = 128  # masked tokens fade to this grey
NOT_PREDICTED = (56, 56, 64)  # HOG/pixel prediction panels: tokens the view does not predict
NOT_MASKED = (40, 40, 40)  # "masked by" panel: tokens no view hides
# Distinct view colours (the first five of matplotlib's tab10, written out: no matplotlib here).
_VIEW_PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                          (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)])


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        return x.numpy()
    return np.asarray(x)


def _grid(grid_size) -> Tuple[int, int]:
    return (grid_size, grid_size) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))


def _hwc_uint8(image) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3]: accepts [H, W, 3] or torch-style [3, H, W]."""
    image = _numpy(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] or [3, H, W], got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image


def _token_map(values: np.ndarray, grid_size, token_px: int) -> np.ndarray:
    """Per-token values [L, ...] -> per-pixel [gh * token_px, gw * token_px, ...]."""
    gh, gw = _grid(grid_size)
    if values.shape[0] != gh * gw:
        raise ValueError(f"{values.shape[0]} tokens do not fill a {gh} x {gw} grid")
    grid = values.reshape(gh, gw, *values.shape[1:])
    return grid.repeat(token_px, axis=0).repeat(token_px, axis=1)


def _check_image_grid(image: np.ndarray, grid_size, patch_size: int) -> None:
    gh, gw = _grid(grid_size)
    if image.shape[:2] != (gh * patch_size, gw * patch_size):
        raise ValueError(f"an image of {image.shape[0]} x {image.shape[1]} pixels is not a {gh} x {gw} grid of "
                         f"{patch_size}-pixel tokens")


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (keeps token edges sharp)."""
    if factor == 1:
        return image
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def draw_token_grid(panel: np.ndarray, token_px: int, color=(0, 0, 0), alpha: float = 0.35) -> np.ndarray:
    """Blends 1-pixel lines along the token borders into a copy of `panel` [H, W, 3]."""
    out = panel.astype(np.float32)
    color = np.asarray(color, np.float32)
    for axis in (0, 1):
        lines = np.arange(token_px, panel.shape[axis], token_px)
        index = (lines, slice(None)) if axis == 0 else (slice(None), lines)
        out[index] = (1 - alpha) * out[index] + alpha * color
    return np.round(out).astype(np.uint8)


# -- masks ------------------------------------------------------------------------------------------------------------
def mask_overlay(image, mask, grid_size, patch_size: int, keep: float = 0.25, scale: int = 1,
                 grid_lines: bool = True) -> np.ndarray:
    """What the encoder sees: the image with its masked tokens faded to grey.

    image: RGB [H, W, 3] or [3, H, W]; mask: bool [L] (True = masked), tokens in raster order.
    A masked pixel becomes keep * pixel + (1 - keep) * grey, so the hidden content is only hinted at.
    Returns uint8 [H * scale, W * scale, 3].
    """
    image = _hwc_uint8(image)
    _check_image_grid(image, grid_size, patch_size)
    hidden = _token_map(_numpy(mask).astype(bool), grid_size, patch_size)[..., None]
    faded = keep * image.astype(np.float32) + (1 - keep) * MASKED_GREY
    out = np.where(hidden, np.round(faded), image).astype(np.uint8)
    out = upscale(out, scale)
    return draw_token_grid(out, patch_size * scale) if grid_lines else out


def view_colors(num_views: int) -> np.ndarray:
    """The colour of each view, uint8 [K, 3]."""
    if not 1 <= num_views <= len(_VIEW_PALETTE):
        raise ValueError(f"pictures support 1 to {len(_VIEW_PALETTE)} views, got {num_views}")
    return _VIEW_PALETTE[:num_views].astype(np.uint8)


def coverage_panel(masks, grid_size, patch_size: int, image=None, image_weight: float = 0.3, scale: int = 1,
                   grid_lines: bool = True) -> np.ndarray:
    """"Which tokens are predicted where": each token in the colour of the view that masks it (view_colors).

    masks: bool [K, L], True = masked. A token masked by several views is striped diagonally in their colours
    (in view order); one masked by none is dark grey (NOT_MASKED). With `image` (RGB, the size of the token grid),
    its grey levels show through with weight `image_weight`.
    Returns uint8 [gh * patch_size * scale, gw * patch_size * scale, 3].
    """
    masks = _numpy(masks).astype(bool)
    if masks.ndim != 2:
        raise ValueError(f"masks must be [K, L] (views, tokens), got shape {masks.shape}")
    token_px = patch_size * scale
    palette = np.concatenate([view_colors(masks.shape[0]), np.array([NOT_MASKED], np.uint8)])
    # Per pixel: the j-th of the views that mask its token, j cycling along diagonal stripes.
    ranks = _token_map(np.cumsum(masks, axis=0).T, grid_size, token_px)  # [H, W, K]: views masking so far
    count = ranks[..., -1:]
    rows, cols = np.indices(ranks.shape[:2])
    stripe = ((rows + cols) // max(2, token_px // 6))[..., None] % np.maximum(count, 1)
    view = np.argmax(ranks > stripe, axis=-1)
    view[count[..., 0] == 0] = len(palette) - 1
    panel = palette[view].astype(np.float32)
    if image is not None:
        image = _hwc_uint8(image)
        _check_image_grid(image, grid_size, patch_size)
        grey = upscale(image.astype(np.float32).mean(axis=-1, keepdims=True), scale)
        panel = (1 - image_weight) * panel + image_weight * grey
    out = np.round(panel).astype(np.uint8)
    return draw_token_grid(out, token_px) if grid_lines else out


# -- HOG --------------------------------------------------------------------------------------------------------------
def hog_cells(tokens, grid_size, patch_size: int, cell_size: int = 8, num_bins: int = 9,
              channels: int = 3) -> np.ndarray:
    """Token-packed HOG features -> per-cell histograms averaged over channels, float32 [Hc, Wc, num_bins].

    tokens: [L, (patch_size // cell_size) ** 2 * channels * num_bins], ordered [cell_row, cell_col, channel, bin]
    within a token as util.hog.hog_targets packs them (the decoder's HOG prediction has the same layout).
    """
    tokens = _numpy(tokens).astype(np.float32)
    gh, gw = _grid(grid_size)
    if patch_size % cell_size:
        raise ValueError(f"patch_size {patch_size} is not a multiple of cell_size {cell_size}")
    k = patch_size // cell_size
    if tokens.shape != (gh * gw, k * k * channels * num_bins):
        raise ValueError(f"HOG tokens of shape {tokens.shape}; a {gh} x {gw} grid of {patch_size}-pixel tokens with "
                         f"{cell_size}-pixel cells, {channels} channels and {num_bins} bins needs "
                         f"{(gh * gw, k * k * channels * num_bins)}")
    cells = tokens.reshape(gh, gw, k, k, channels, num_bins).mean(axis=4)
    return cells.transpose(0, 2, 1, 3, 4).reshape(gh * k, gw * k, num_bins)


def _glyph_stencils(num_bins: int, size: int) -> np.ndarray:
    """float32 [num_bins, size, size]: an antialiased line through the centre per bin, along the edge direction."""
    theta = (np.arange(num_bins) + 0.5) * math.pi / num_bins  # bin centres, gradient angle, rows growing down
    phi = theta + math.pi / 2  # the edge runs perpendicular to the gradient
    offsets = np.arange(size) + 0.5 - size / 2
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    cos, sin = np.cos(phi)[:, None, None], np.sin(phi)[:, None, None]
    along = dx * cos + dy * sin  # (x right, y down) coordinates
    across = -dx * sin + dy * cos
    half_width = max(0.5, size / 16)
    half_length = size / 2 - 1
    line = np.clip(half_width + 0.5 - np.abs(across), 0, 1) * np.clip(half_length + 0.5 - np.abs(along), 0, 1)
    return line.astype(np.float32)


def hog_glyphs(cells, glyph_size: int, vmax: Optional[float] = None, shown=None) -> np.ndarray:
    """The classic HOG picture of histograms [Hc, Wc, num_bins]: uint8 [Hc * glyph_size, Wc * glyph_size, 3].

    Each bin draws a white line through its cell at brightness clip(value / vmax, 0, 1); where lines cross the
    brighter wins. vmax defaults to sqrt(num_bins - 1), the largest value of a whitened bin (all of a cell's
    gradient in one bin), so the scale is the same for targets and predictions. Cells where `shown` [Hc, Wc] is
    False are filled with NOT_PREDICTED instead.
    """
    cells = _numpy(cells).astype(np.float32)
    if cells.ndim != 3:
        raise ValueError(f"HOG cells must be [Hc, Wc, num_bins], got shape {cells.shape}")
    hc, wc, num_bins = cells.shape
    vmax = math.sqrt(max(num_bins - 1, 1)) if vmax is None else vmax
    brightness = np.clip(cells / vmax, 0.0, 1.0)
    stencils = _glyph_stencils(num_bins, glyph_size)
    picture = (brightness[:, :, :, None, None] * stencils).max(axis=2)  # [Hc, Wc, g, g]
    picture = picture.transpose(0, 2, 1, 3).reshape(hc * glyph_size, wc * glyph_size)
    out = np.repeat(np.round(picture * 255).astype(np.uint8)[..., None], 3, axis=-1)
    if shown is not None:
        hidden = ~_numpy(shown).astype(bool)
        out[upscale(hidden, glyph_size)] = NOT_PREDICTED
    return out


def hog_panel(tokens, grid_size, patch_size: int, cell_size: int = 8, num_bins: int = 9, channels: int = 3,
              scale: int = 1, shown=None, vmax: Optional[float] = None, grid_lines: bool = True) -> np.ndarray:
    """HOG glyphs of token-packed features [L, T] (hog_cells' layout), uint8 [H * scale, W * scale, 3].

    shown: optional bool [L]; tokens where it is False are filled with NOT_PREDICTED (e.g. the visible tokens of
    a view, for which the decoder's prediction is not trained).
    """
    cells = hog_cells(tokens, grid_size, patch_size, cell_size, num_bins, channels)
    k = patch_size // cell_size
    shown_cells = None if shown is None else _token_map(_numpy(shown).astype(bool), grid_size, k)
    out = hog_glyphs(cells, cell_size * scale, vmax, shown_cells)
    return draw_token_grid(out, patch_size * scale, color=(90, 90, 90), alpha=0.5) if grid_lines else out


# -- pixels -----------------------------------------------------------------------------------------------------------
def pixel_reconstruction(pred, image, grid_size, patch_size: int, mean: Sequence[float], std: Sequence[float],
                         shown=None) -> np.ndarray:
    """Per-patch normalised pixel predictions [L, patch_size**2 * 3] back to an RGB picture, uint8 [H, W, 3].

    The target (models_dmjd.normalized_pixel_targets) standardises each patch of the mean/std-normalised image
    by the patch's own mean and (unbiased) variance; the prediction is mapped back with the statistics of the
    same patch of `image` (uint8 RGB), then un-normalised with the per-channel `mean` and `std` (0-255 scale).
    Where `shown` [L] is False the input pixels are kept (MAE's "reconstruction + visible").
    """
    image = _hwc_uint8(image)
    _check_image_grid(image, grid_size, patch_size)
    gh, gw = _grid(grid_size)
    pred = _numpy(pred).astype(np.float64)
    if pred.shape != (gh * gw, patch_size * patch_size * 3):
        raise ValueError(f"pixel predictions of shape {pred.shape}, expected {(gh * gw, patch_size ** 2 * 3)}")
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    x = (image.astype(np.float64) - mean) / std
    patches = x.reshape(gh, patch_size, gw, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    mu = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, ddof=1, keepdims=True)
    recon = pred * np.sqrt(var + 1e-6) + mu
    recon = recon.reshape(gh, gw, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(image.shape)
    out = np.clip(np.round(recon * std + mean), 0, 255).astype(np.uint8)
    if shown is not None:
        keep_input = ~_token_map(_numpy(shown).astype(bool), grid_size, patch_size)
        out[keep_input] = image[keep_input]
    return out


# -- the figure -------------------------------------------------------------------------------------------------------
def text_font(size: int):
    """Pillow's default font at `size` pixels where Pillow can scale it (10.1+), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _compose(rows: List[List[np.ndarray]], titles: List[str], legend: List[Tuple[np.ndarray, str]],
             gap: int = 4) -> np.ndarray:
    """Panels of equal size on a white sheet, a title above each column and a colour legend below.

    A legend entry is (colours [n, 3], label): one colour fills its box, several stripe it."""
    height, width = rows[0][0].shape[:2]
    font = text_font(max(11, min(15, width // 14)))
    text_h = font.getbbox("Ag")[3] + 6
    n_cols = len(rows[0])
    sheet_w = n_cols * width + (n_cols + 1) * gap
    sheet_h = text_h + len(rows) * (height + gap) + gap + (text_h if legend else 0)
    sheet = np.full((sheet_h, sheet_w, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        top = text_h + r * (height + gap)
        for c, panel in enumerate(row):
            left = gap + c * (width + gap)
            sheet[top:top + height, left:left + width] = panel
    picture = Image.fromarray(sheet)
    draw = ImageDraw.Draw(picture)
    for c, title in enumerate(titles):
        left = gap + c * (width + gap)
        draw.text((left + width / 2, text_h / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    x, y = gap, sheet_h - text_h + 3
    box = text_h - 8
    for colors, label in legend:
        colors = np.asarray(colors, np.uint8).reshape(-1, 3)
        rows_, cols_ = np.indices((box, box))
        swatch = colors[((rows_ + cols_) // max(2, box // 4)) % len(colors)]
        picture.paste(Image.fromarray(swatch), (x, y))
        draw.rectangle([x, y, x + box - 1, y + box - 1], outline=(0, 0, 0))
        x += box + 4
        draw.text((x, y + box / 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        x += int(draw.textlength(label, font=font)) + 14
    return np.asarray(picture)


def _coverage_legend(num_views: int):
    colors = view_colors(num_views)
    legend = [(colors[k], f"masked by view {k + 1} only" if num_views > 1 else "masked") for k in range(num_views)]
    if num_views > 1:
        legend.append((colors, "by both" if num_views == 2 else "by several: stripes of their colours"))
    legend.append((NOT_MASKED, "by none"))
    return legend


@torch.no_grad()
def make_figure(model, images: torch.Tensor, masks: Optional[torch.Tensor] = None, seed: int = 0,
                min_panel: int = 160, min_glyph: int = 12, grid_lines: bool = True) -> np.ndarray:
    """A picture of the model's masked-branch predictions on a few crops: uint8 [H, W, 3], one row per image.

    model: a DMJD model (or a DDP wrapper of one); it runs in eval mode and its mode is restored afterwards.
    images: uint8 [B, 3, H, W] crops of the model's input size. masks: bool [K, B, L] (True = masked); by default
    the model's own masking, drawn with a CPU generator seeded with `seed` so that pictures from successive
    epochs show the same masks. Panels are enlarged (nearest) by the smallest integer factor that gives them at
    least `min_panel` pixels on their short side and HOG cells of at least `min_glyph` pixels (224-pixel crops with
    8-pixel cells: x2; min_glyph=0 keeps them at x1, a quarter of the pixels, e.g. for TensorBoard).

    One no-grad forward of the masked branch: the visible branch is not run, so an EMA-teacher model needs no
    teacher here. For TensorBoard: writer.add_image(tag, make_figure(model, images), step, dataformats="HWC").
    """
    model = getattr(model, "module", model)
    _check_figure_images(model, images)
    out = _masked_branch(model, images, masks, seed)
    masks = out["masks"].cpu().numpy()
    num_views, batch = masks.shape[0], images.shape[0]
    gh, gw = model.grid_size
    pred = out["pred"].float().cpu().numpy().reshape(num_views, batch, gh * gw, -1)
    target = out["target"].float().cpu().numpy()
    crops = images.permute(0, 2, 3, 1).cpu().numpy()
    hog = model.pred_type == "hog"
    scale = max(1, math.ceil(min_panel / min(crops.shape[1:3])))
    if hog:
        scale = max(scale, math.ceil(min_glyph / model.hog_cell_size))
    panel = _PredictionPanel(model, scale, grid_lines)
    rows = [_figure_row(panel, crops[b], masks[:, b], target[b] if hog else None, pred[:, b])
            for b in range(batch)]
    return _compose(rows, _figure_titles(num_views, hog), _coverage_legend(num_views))


def _check_figure_images(model, images) -> None:
    """make_figure takes uint8 crops [B, 3, H, W] of the model's input size."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a uint8 tensor [B, 3, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 crops (0-255), got {images.dtype}")
    gh, gw = model.grid_size
    patch = model.patch_size
    if images.shape[-2:] != (gh * patch, gw * patch):
        raise ValueError(f"images of {tuple(images.shape[-2:])} pixels; the model takes {(gh * patch, gw * patch)}")


def _masked_branch(model, images: torch.Tensor, masks: Optional[torch.Tensor], seed: int) -> dict:
    """The model's masked-branch outputs in eval mode (its mode restored afterwards), with `masks` or, by default,
    its own masking drawn with a CPU generator seeded with `seed`."""
    device = next(model.parameters()).device
    if masks is None:
        masks = model.make_masks(images.shape[0], device=device, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    try:
        return model.forward_outputs(images.to(device), masks.to(device), visible_branch=False)
    finally:
        model.train(was_training)


class _PredictionPanel:
    """Draws a token-wise prediction (or the target) of the model: HOG glyphs, or the reconstructed pixels; tokens
    outside `shown` get the NOT_PREDICTED colour."""

    def __init__(self, model, scale: int, grid_lines: bool):
        self.model, self.scale, self.grid_lines = model, scale, grid_lines
        self.grid = tuple(model.grid_size)
        self.hog = model.pred_type == "hog"
        self.mean = model.pixel_mean.flatten().cpu().numpy()
        self.std = model.pixel_std.flatten().cpu().numpy()

    def __call__(self, tokens, shown, crop) -> np.ndarray:
        model, patch = self.model, self.model.patch_size
        if self.hog:
            return hog_panel(tokens, self.grid, patch, model.hog_cell_size, model.hog_bins, scale=self.scale,
                             shown=shown, grid_lines=self.grid_lines)
        recon = upscale(pixel_reconstruction(tokens, crop, self.grid, patch, self.mean, self.std, shown), self.scale)
        return draw_token_grid(recon, patch * self.scale) if self.grid_lines else recon


def _figure_row(panel: _PredictionPanel, crop: np.ndarray, masks: np.ndarray, target: Optional[np.ndarray],
                pred: np.ndarray) -> List[np.ndarray]:
    """One image's row: the crop, each view's input, the coverage, the HOG target (when given), each view's
    prediction and, with several views, every masked token's prediction averaged over the views that mask it.
    masks: [K, L]; pred: [K, L, D]."""
    grid, patch, scale, grid_lines = panel.grid, panel.model.patch_size, panel.scale, panel.grid_lines
    num_views = masks.shape[0]
    row = [upscale(crop, scale)]
    row += [mask_overlay(crop, masks[k], grid, patch, scale=scale, grid_lines=grid_lines) for k in range(num_views)]
    row.append(coverage_panel(masks, grid, patch, image=crop, scale=scale, grid_lines=grid_lines))
    if target is not None:
        row.append(panel(target, None, crop))
    row += [panel(pred[k], masks[k], crop) for k in range(num_views)]
    if num_views > 1:
        # Every token predicted by the views that mask it, averaged over them.
        count = masks.sum(axis=0)
        merged = (pred * masks[:, :, None]).sum(axis=0) / np.maximum(count, 1)[:, None]
        row.append(panel(merged, count > 0, crop))
    return row


def _figure_titles(num_views: int, hog: bool) -> List[str]:
    what = "HOG" if hog else "pixel"
    titles = ["input"] + [f"view {k + 1} input" for k in range(num_views)] + ["masked by"]
    titles += ["HOG target"] if hog else []
    titles += [f"{what} pred, view {k + 1}" for k in range(num_views)]
    titles += [f"{what} pred, all views"] if num_views > 1 else []
    return titles


# -- segmentation -----------------------------------------------------------------------------------------------------
IGNORE_COLOR = (0, 0, 0)  # pixels with the ignore label; no class colour is black


def label_palette(num_classes: int) -> np.ndarray:
    """Distinct class colours, uint8 [num_classes, 3]: tab10's ten first, then hues a golden angle apart (at
    alternating saturation and brightness, starting where tab10 has none), never black."""
    colors = [tuple(c) for c in _VIEW_PALETTE[:min(num_classes, len(_VIEW_PALETTE))]]
    for k in range(len(colors), num_classes):
        n = k - len(_VIEW_PALETTE)
        # from 252 degrees (a blue-violet that tab10 lacks): the first ones stay far from tab10's colours
        hue = (0.7 + n * 0.618033988749895) % 1.0
        saturation, value = (0.85, 0.95) if n % 2 == 0 else (0.55, 0.75)
        i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
        p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
        rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][i]
        colors.append(tuple(int(round(255 * c)) for c in rgb))
    return np.asarray(colors, np.uint8).reshape(-1, 3)


def colorize_labels(labels, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """A label map [H, W] of class indices as colours, uint8 [H, W, 3]; `ignore_index` pixels get IGNORE_COLOR."""
    labels = _numpy(labels).astype(np.int64)
    palette = np.asarray(palette, np.uint8)
    if labels.ndim != 2:
        raise ValueError(f"a label map is [H, W], got shape {labels.shape}")
    ignored = labels == ignore_index
    outside = ~ignored & ((labels < 0) | (labels >= len(palette)))
    if outside.any():
        raise ValueError(f"label {int(labels[outside].max())} has no colour in a palette of {len(palette)} classes")
    out = palette[np.where(ignored, 0, labels)]
    out[ignored] = IGNORE_COLOR
    return out


def label_legend(entries: Sequence[Tuple[Sequence[int], str]], width: int, gap: int = 4) -> np.ndarray:
    """Colour swatches with their names, wrapped onto as many lines as `width` pixels need: uint8 [h, width, 3].
    entries: (rgb colour, name) pairs."""
    font = text_font(13)
    line_h = font.getbbox("Ag")[3] + 6
    box = line_h - 8
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], gap, 0
    for color, name in entries:
        entry_w = box + 4 + int(probe.textlength(name, font=font)) + 14
        if x > gap and x + entry_w > width:
            x, y = gap, y + line_h
        placed.append((x, y, color, name))
        x += entry_w
    picture = Image.new("RGB", (width, y + line_h), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for x, y, color, name in placed:
        top = y + (line_h - box) // 2
        draw.rectangle([x, top, x + box - 1, top + box - 1], fill=tuple(int(c) for c in color), outline=(0, 0, 0))
        draw.text((x + box + 4, y + line_h / 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(picture)


def segmentation_figure(images, labels, predictions, class_names: Sequence[str], palette: Optional[np.ndarray] = None,
                        titles: Sequence[str] = ("image", "ground truth", "prediction"), min_panel: int = 128,
                        ignore_index: int = 255, gap: int = 4, more_predictions: Sequence = ()) -> np.ndarray:
    """Image, ground truth and prediction side by side, one row per image, with a legend of the classes that
    appear (and of the ignore colour when ground truth has ignored pixels): uint8 [H, W, 3].

    images: RGB uint8 [N, H, W, 3] or [N, 3, H, W] (or a list); labels, predictions: [N, H, W] class indices of
    the same size. `more_predictions`: further [N, H, W] predictions (e.g. of other models), each a column after
    the first, titled by `titles[3:]`. Panels are enlarged (nearest) by the smallest integer factor that gives them
    `min_panel` pixels on their short side.
    """
    columns = [predictions, *more_predictions]
    if len(titles) != 2 + len(columns):
        raise ValueError(f"{len(titles)} titles for {2 + len(columns)} columns (image, ground truth, predictions)")
    if not all(len(column) == len(images) for column in columns):
        raise ValueError("every set of predictions must have one per image")
    rows = [(_hwc_uint8(image), _numpy(label), *[_numpy(column[i]) for column in columns])
            for i, (image, label) in enumerate(zip(images, labels))]
    if not rows or not len(rows) == len(images) == len(labels):
        raise ValueError("images, labels and predictions must be equally many, and at least one")
    height, width = rows[0][0].shape[:2]
    for image, *maps in rows:
        if image.shape[:2] != (height, width) or any(m.shape != (height, width) for m in maps):
            raise ValueError(f"every image, label and prediction must be {height} x {width}, got "
                             f"{image.shape[:2]}, {', '.join(str(m.shape) for m in maps)}")
    palette = label_palette(len(class_names)) if palette is None else np.asarray(palette, np.uint8)
    if len(palette) < len(class_names):
        raise ValueError(f"a palette of {len(palette)} colours for {len(class_names)} classes")
    scale = max(1, math.ceil(min_panel / min(height, width)))
    panels = [[upscale(image, scale)] + [upscale(colorize_labels(m, palette, ignore_index), scale) for m in maps]
              for image, *maps in rows]
    seen = np.unique(np.concatenate([m.ravel() for _, *maps in rows for m in maps]))
    entries = [(palette[k], class_names[k]) for k in seen if k != ignore_index]
    if any((label == ignore_index).any() for _, label, *_ in rows):
        entries.append((IGNORE_COLOR, "ignored"))
    panel_h, panel_w = height * scale, width * scale
    sheet_w = len(titles) * panel_w + (len(titles) + 1) * gap
    font = text_font(max(11, min(15, panel_w // 14)))
    text_h = font.getbbox("Ag")[3] + 6
    sheet = np.full((len(panels) * (panel_h + gap), sheet_w, 3), 255, np.uint8)
    for r, row in enumerate(panels):
        top = r * (panel_h + gap)
        for c, panel in enumerate(row):
            left = gap + c * (panel_w + gap)
            sheet[top:top + panel_h, left:left + panel_w] = panel
    # The titles get a strip of their own: a font's glyphs (e.g. Pillow's bitmap fallback) never reach the panels.
    strip = Image.new("RGB", (sheet_w, text_h), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for c, title in enumerate(titles):
        draw.text((gap + c * (panel_w + gap) + panel_w / 2, text_h / 2), title, fill=(0, 0, 0), font=font,
                  anchor="mm")
    return np.concatenate([np.asarray(strip), sheet, label_legend(entries, sheet_w, gap)], axis=0)


def _instances_panel(image: np.ndarray, boxes, labels, masks, palette: np.ndarray, class_names: Sequence[str],
                     scores=None, scale: int = 1) -> np.ndarray:
    """`image` (uint8 [H, W, 3]) enlarged by `scale`, each instance's mask tinted in its class colour, its box and
    `name` (or `name 0.87` with a score) drawn over it."""
    panel = image.astype(np.float32)
    for mask, label in zip(masks, labels):
        on = _numpy(mask).astype(bool)
        panel[on] = 0.45 * panel[on] + 0.55 * palette[int(label) - 1]
    picture = Image.fromarray(upscale(panel.astype(np.uint8), scale))
    draw = ImageDraw.Draw(picture)
    font = text_font(max(9, min(12, picture.width // 16)))
    for k, (box, label) in enumerate(zip(_numpy(boxes).tolist(), labels)):
        color = tuple(int(c) for c in palette[int(label) - 1])
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=2)
        text = class_names[int(label) - 1] + (f" {float(scores[k]):.2f}" if scores is not None else "")
        draw.text((x0 + 2, y0 + 1), text, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=color)
    return np.asarray(picture)


def detection_figure(images, targets, predictions: Sequence[Sequence[dict]], class_names: Sequence[str],
                     titles: Sequence[str], score_threshold: float = 0.5, min_panel: int = 192,
                     gap: int = 4) -> np.ndarray:
    """Image, ground truth and each model's detections side by side, one row per image: masks tinted in their
    class colour, boxes, class names and (for detections) scores; detections below `score_threshold` left out.

    images: uint8 [N, H, W, 3] or [N, 3, H, W] (or a list); targets: dicts with `boxes` (x1, y1, x2, y2), `labels`
    (1..C) and `masks` [K, H, W]; predictions: per model, a list of detections in the image (`boxes`, `labels`,
    `scores` and bool `masks` [K, H, W]: util.det_transforms.detections_in of Mask R-CNN's outputs). `titles`: one
    per column."""
    if len(titles) != 2 + len(predictions):
        raise ValueError(f"{len(titles)} titles for {2 + len(predictions)} columns (image, ground truth, models)")
    palette = label_palette(len(class_names))
    rows = []
    for i, (image, target) in enumerate(zip(images, targets)):
        image = _hwc_uint8(image)
        scale = max(1, math.ceil(min_panel / min(image.shape[:2])))
        row = [upscale(image, scale),
               _instances_panel(image, target["boxes"], _numpy(target["labels"]).tolist(), target["masks"], palette,
                                class_names, scale=scale)]
        for outputs in predictions:
            out = outputs[i]
            keep = _numpy(out["scores"]) >= score_threshold
            masks = _numpy(out["masks"])[keep]
            row.append(_instances_panel(image, _numpy(out["boxes"])[keep], _numpy(out["labels"])[keep].tolist(),
                                        masks, palette, class_names, _numpy(out["scores"])[keep], scale))
        rows.append(row)
    return _compose(rows, list(titles), [], gap)
