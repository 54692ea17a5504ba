"""DMJD pre-training model: disjointly masked views, a masked-token decoder and a visible-token distillation branch.

One encoder pass runs over all K views of a batch, stacked view-major on the batch axis (row k * B + b is view k of
image b). Two branches share that pass:

- invisible branch: an MAE decoder predicts the target (HOG or normalised pixels) at every token; the MSE is
  averaged over the masked tokens of all views;
- visible branch: a projector and a predictor map the encoder's visible tokens to a target at the same tokens
  (the HOG target, or the tokens of an EMA teacher fed the whole crop); smooth-L1 with beta 2.0, averaged over the
  visible tokens of all views. Predictions and targets are gathered with the same indices, so they are aligned
  token by token (the released code compared them in different orders).

Total loss = L_mask + theta * L_vis. The model takes uint8 crops (or floats in 0-255) so that the HOG target is
computed on the device from the very pixels the encoder sees; it normalises them itself.
"""
import copy
from typing import Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models.vision_transformer import Block

from dmjd_encoders.pos_embed import sincos_pos_embed_2d
from dmjd_encoders.models_convvit import (ENCODER_ARCHS, ENCODER_OF, BlockNorm, ConvViT, gather_tokens,
                            init_linear_and_norm, visible_token_ids)
from util.hog import hog_targets
from util.masking import disjoint_masks, num_masked_units
from util.schedules import scaled_lr

PRED_TYPES = ("hog", "pixel")
VIS_TARGETS = ("hog", "ema")


def reachable_pred_ratio(num_views: int, mask_ratio: float) -> float:
    """The largest prediction rate K views of corruption rate m can cover: min(1, K * m)."""
    return min(1.0, num_views * mask_ratio)


def adaptive_lr(blr: float, images_per_step: int, pred_ratio: float, mask_ratio: float):
    """DMJD's rule: lr = blr * unique images per optimizer step / 256 * (prediction rate / corruption rate)
    (util.schedules.scaled_lr). Returns the lr and a line that shows every factor."""
    return scaled_lr(blr, images_per_step, pred_ratio=pred_ratio, mask_ratio=mask_ratio)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, patch_size**2 * C], tokens in raster order, each as (row, col, channel)."""
    n, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(n, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, patch_size * patch_size * c)


def normalized_pixel_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MAE's `norm_pix_loss` target: each patch's pixels standardised by the patch's own mean and variance."""
    patches = patchify(images.float(), patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


class VisibleBranch(nn.Module):
    """Projector (Linear-LN-GELU, Linear-LN-GELU, Linear-LN without affine) and a linear predictor."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim, elementwise_affine=False),
        )
        self.predictor = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(x))


class EMATeacher(nn.Module):
    """A momentum copy of the student encoder that gives the visible branch its target tokens.

    Frozen and always in eval mode; it lives outside DDP and the optimizer and is updated in place with foreach ops
    after each optimizer step. Its output tokens are layer-normed without affine.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.encoder.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher never drops paths

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:]  # patch tokens only
        return F.layer_norm(tokens.float(), tokens.shape[-1:])

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        teacher_params = list(self.encoder.parameters())
        student_params = [p.detach() for p in student.parameters()]
        if len(teacher_params) != len(student_params):
            raise ValueError("the teacher and the student encoder have different parameters")
        # t <- t + (1 - m)(s - t) = m t + (1 - m) s, in one pass over the weights
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


class DMJD(nn.Module):
    def __init__(self, encoder: nn.Module, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, decoder_mlp_ratio: float = 4.0, pred_type: str = "hog",
                 vis_target: str = "hog", theta: float = 1.0, num_views: int = 2, mask_ratio: float = 0.6,
                 pred_ratio: Optional[float] = None, mask_type: str = "block", block_size: int = 2, projector_dim: int = 512,
                 vis_loss_beta: float = 2.0, hog_cell_size: int = 8, hog_bins: int = 9):
        super().__init__()
        if pred_type not in PRED_TYPES:
            raise ValueError(f"pred_type must be one of {PRED_TYPES}, got {pred_type!r}")
        if vis_target not in VIS_TARGETS:
            raise ValueError(f"vis_target must be one of {VIS_TARGETS}, got {vis_target!r}")
        if theta < 0:
            raise ValueError(f"theta must be >= 0, got {theta}")
        if pred_ratio is None:  # the largest prediction rate the views reach
            pred_ratio = reachable_pred_ratio(num_views, mask_ratio)
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.grid_size = encoder.grid_size
        self.pred_type, self.vis_target, self.theta = pred_type, vis_target, float(theta)
        self.num_views, self.mask_ratio, self.pred_ratio = num_views, mask_ratio, pred_ratio
        self.mask_type, self.block_size = mask_type, block_size
        self.vis_loss_beta = vis_loss_beta
        self.hog_cell_size, self.hog_bins = hog_cell_size, hog_bins
        if pred_type == "hog" or (theta > 0 and vis_target == "hog"):
            if self.patch_size % hog_cell_size:
                raise ValueError(f"the patch size {self.patch_size} must be a multiple of the HOG cell {hog_cell_size}")
        # Fail now, not at the first step, on a masking configuration that cannot work.
        disjoint_masks(1, self.grid_size, num_views, mask_ratio, pred_ratio, mask_type, block_size)

        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

        # Invisible branch: MAE decoder.
        embed_dim = encoder.embed_dim
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, self.grid_size).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=BlockNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = BlockNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.target_dim(pred_type))

        # Visible branch; not built when theta = 0 so that DDP sees no unused parameters.
        self.visible_branch = None
        if self.theta > 0:
            vis_dim = embed_dim if vis_target == "ema" else self.target_dim("hog")
            self.visible_branch = VisibleBranch(embed_dim, vis_dim, projector_dim)

        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred,
                       self.visible_branch]:
            if module is not None:
                module.apply(init_linear_and_norm)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- helpers ----------------------------------------------------------------------------------------------------
    def target_dim(self, kind: str) -> int:
        if kind == "hog":
            return (self.patch_size // self.hog_cell_size) ** 2 * self.hog_bins * 3
        return self.patch_size ** 2 * 3

    @property
    def uses_teacher(self) -> bool:
        return self.theta > 0 and self.vis_target == "ema"

    def no_weight_decay(self):
        return {"mask_token", "decoder_pos_embed"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def hog(self, raw: torch.Tensor) -> torch.Tensor:
        """The HOG target of each image [B, L, T] (raw 0-255 pixels): computed once per image, the views index it."""
        return hog_targets(raw, self.patch_size, self.hog_cell_size, self.hog_bins)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    @property
    def num_visible_tokens(self) -> int:
        """Visible patches per view of the masks that make_masks draws."""
        unit = self.block_size if self.mask_type == "block" else 1
        n_units = (self.grid_size[0] // unit) * (self.grid_size[1] // unit)
        return (n_units - num_masked_units(n_units, self.mask_ratio)) * unit * unit

    def make_masks(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return disjoint_masks(batch_size, self.grid_size, self.num_views, self.mask_ratio, self.pred_ratio,
                              self.mask_type, self.block_size, generator=generator, device=device)

    def decode(self, latent: torch.Tensor, visible_ids: torch.Tensor) -> torch.Tensor:
        """Visible tokens [N, Lv, D] at `visible_ids` [N, Lv] -> predictions at all L tokens [N, L, target_dim]."""
        x = self.decoder_embed(latent)
        length = self.grid_size[0] * self.grid_size[1]
        full = self.mask_token.to(x.dtype).expand(x.shape[0], length, -1).clone()
        full.scatter_(1, visible_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        x = full + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    # -- training step ----------------------------------------------------------------------------------------------
    def forward_outputs(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                        teacher: Optional[EMATeacher] = None, visible_branch: bool = True,
                        num_visible: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Runs both branches and returns what the losses (and pictures of the model) are computed from.

        images: uint8 [B, 3, H, W] (or float in 0-255); masks: bool [K, B, L], True = masked (drawn here if None).
        `visible_branch=False` skips the visible branch (and needs no teacher), for pictures of the masked branch.
        `num_visible`: the visible tokens per row of the given masks, when the caller knows it (for masks from
        `make_masks`, `num_visible_tokens`); else they are counted, which reads the masks back to the host. It is
        checked against masks on the CPU, where counting costs no wait; on a GPU it is trusted.

        Returns a dict, rows of the view-stacked tensors ordered view-major (row k * B + b is view k of image b):
            masks       bool [K, B, L], the masks used;
            pred        float32 [K * B, L, T], the decoder's prediction at every token (the loss uses masked ones);
            target      [B, L, T], the masked-branch target per image: whitened HOG (`hog`) or per-patch
                        normalised pixels (normalized_pixel_targets of the normalised image); [K * B, L, T] when
                        `hog` gives one per row;
            vis_ids     long [K * B, L_visible], the visible tokens of each row in raster order;
            vis_pred    float32 [K * B, L_visible, T_vis], the visible branch's prediction at those tokens;
            vis_target  [K * B, L_visible, T_vis], its target (HOG, or the EMA teacher's tokens) at those tokens.
        The `vis_*` entries are present only when the visible branch exists (theta > 0) and runs.
        """
        batch = images.shape[0]
        given = masks is not None
        if not given:
            masks = self.make_masks(batch, device=images.device)
            num_visible = self.num_visible_tokens  # known for our own masks: no host sync in the training step
        if masks.dim() != 3 or masks.shape[1:] != (batch, self.grid_size[0] * self.grid_size[1]):
            raise ValueError(f"masks of shape {tuple(masks.shape)}, expected [K, {batch}, "
                             f"{self.grid_size[0] * self.grid_size[1]}]")
        if given and num_visible is not None and masks.device.type == "cpu":
            counts = sorted(set((~masks).sum(-1).flatten().tolist()))
            if counts != [num_visible]:
                raise ValueError(f"num_visible={num_visible}, but the masks leave {counts} tokens visible per row")
        run_visible = visible_branch and self.visible_branch is not None
        if run_visible and self.vis_target == "ema" and teacher is None:
            raise ValueError("vis_target='ema' needs the EMA teacher passed to forward")
        num_views = masks.shape[0]
        mask = masks.reshape(num_views * batch, -1)
        raw = images.float()
        x = self.normalize(raw)

        # Targets once per image; views only index them.
        hog = None
        if self.pred_type == "hog" or (run_visible and self.vis_target == "hog"):
            hog = self.hog(raw)
        mask_target = hog if self.pred_type == "hog" else normalized_pixel_targets(x, self.patch_size)

        ids = visible_token_ids(mask, num_visible)
        latent = self.encoder.forward_masked(x.repeat(num_views, 1, 1, 1), mask, ids)
        outputs = {"masks": masks, "pred": self.decode(latent, ids).float(), "target": mask_target}

        if run_visible:
            vis_full = teacher(x) if self.vis_target == "ema" else hog
            outputs["vis_ids"] = ids
            outputs["vis_target"] = gather_tokens(_per_row(vis_full, mask.shape[0]), ids)
            outputs["vis_pred"] = self.visible_branch(latent).float()
        return outputs

    def forward(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                teacher: Optional[EMATeacher] = None,
                num_visible: Optional[int] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """images: uint8 [B, 3, H, W] (or float in 0-255); masks: bool [K, B, L], True = masked (drawn here if None);
        `num_visible` as in `forward_outputs`.

        Returns the total loss and a dict of detached branch losses (tensors: no host sync here).
        """
        out = self.forward_outputs(images, masks, teacher, num_visible=num_visible)
        per_token = (out["pred"] - _per_row(out["target"], out["pred"].shape[0])).pow(2).mean(dim=-1)
        maskf = out["masks"].flatten(0, 1).float()
        loss_mask = (per_token * maskf).sum() / maskf.sum()
        losses = {"loss_mask": loss_mask.detach()}

        loss = loss_mask
        if "vis_pred" in out:
            loss_vis = F.smooth_l1_loss(out["vis_pred"], out["vis_target"].float(), beta=self.vis_loss_beta)
            loss = loss + self.theta * loss_vis
            losses["loss_vis"] = loss_vis.detach()
        return loss, losses


def _per_row(target: torch.Tensor, rows: int) -> torch.Tensor:
    """A target per image [B, ...] repeated for the views' `rows` = K * B rows; one already per row is kept."""
    return target if target.shape[0] == rows else target.repeat(rows // target.shape[0], *[1] * (target.dim() - 1))


# ---------------------------------------------------------------------------------------------------------------------
# Models from main_pretrain.py's flags.

DEFAULT_MODEL = "dmjd_convit_base_patch16_dec8_hog"  # the released recipe's (main_pretrain.py's --model default)
MODEL_FLAGS = ("num_views", "mask_ratio", "pred_ratio", "mask_type", "block_size", "pred_type", "vis_target", "theta")


def create_from_flags(flags: dict, **kwargs) -> DMJD:
    """The DMJD model that main_pretrain.py's flags describe (a run config's `flags()`, or a checkpoint's saved
    `args`): --model at --input_size with the masking and target flags. Flags left out (or None) take the model's
    defaults: the released recipe, with the largest prediction rate the views reach."""
    method = {k: flags[k] for k in MODEL_FLAGS if flags.get(k) is not None}
    if flags.get("input_size") is not None:
        method["img_size"] = flags["input_size"]
    return timm.create_model(flags.get("model") or DEFAULT_MODEL, **method, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Named models. Keyword arguments reach DMJD (masking, targets, theta) or the encoder (img_size, drop_path_rate,
# class_token for a ViT initialised from MAE's layout, sparse_stages for ConViT).

_ENCODER_KEYS = ("img_size", "drop_path_rate", "in_chans", "class_token", "sparse_stages")


def _build(name: str, decoder: dict, kwargs) -> DMJD:
    if kwargs.pop("pretrained", False):
        raise ValueError("DMJD models have no hub weights; pre-train them or load a checkpoint")
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    if overlay.get("file"):
        raise ValueError(f"{name}: weights are not loaded through timm; resume a pre-training checkpoint with "
                         "main_pretrain.py --resume, or load an encoder with util.checkpoint.load_pretrained")
    for key in ("pretrained_cfg", "cache_dir"):
        kwargs.pop(key, None)
    enc_kwargs = {k: kwargs.pop(k) for k in _ENCODER_KEYS if k in kwargs}
    encoder_cls, arch = ENCODER_ARCHS[ENCODER_OF[name]]
    if encoder_cls is ConvViT:
        enc_kwargs["fuse_stages"] = True
    encoder = encoder_cls(**arch, **enc_kwargs)
    return DMJD(encoder, **{**decoder, **kwargs})


# The released ConViT models use MLP ratio 8 in the decoder (ConvMAE takes the stage-1 ratio).
_DEC8 = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=8.0)
_DEC2 = dict(decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16, decoder_mlp_ratio=8.0)
_VIT_DEC8 = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4.0)
_TINY_DEC = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, decoder_mlp_ratio=2.0,
                 projector_dim=64)


@register_model
def dmjd_convit_mini_patch8_hog(pretrained=False, **kwargs):
    """The demo model: 32-pixel images, 4 x 4 tokens, HOG cells of 4 pixels (108 numbers per token)."""
    decoder = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, decoder_mlp_ratio=2.0,
                   projector_dim=64, hog_cell_size=4)
    return _build("dmjd_convit_mini_patch8_hog", decoder, dict(kwargs, pretrained=pretrained))


@register_model
def dmjd_convit_tiny_patch16_dec1_hog(pretrained=False, **kwargs):
    return _build("dmjd_convit_tiny_patch16_dec1_hog", _TINY_DEC, dict(kwargs, pretrained=pretrained))


@register_model
def dmjd_convit_small_patch16_dec2_hog(pretrained=False, **kwargs):
    return _build("dmjd_convit_small_patch16_dec2_hog", dict(_DEC2, decoder_mlp_ratio=4.0),
                  dict(kwargs, pretrained=pretrained))


@register_model
def dmjd_convit_base_patch16_dec8_hog(pretrained=False, **kwargs):
    return _build("dmjd_convit_base_patch16_dec8_hog", _DEC8, dict(kwargs, pretrained=pretrained))


@register_model
def dmjd_convit_base_patch16_dec2_hog(pretrained=False, **kwargs):
    return _build("dmjd_convit_base_patch16_dec2_hog", _DEC2, dict(kwargs, pretrained=pretrained))


@register_model
def dmjd_convit_large_patch16_dec8_hog(pretrained=False, **kwargs):
    return _build("dmjd_convit_large_patch16_dec8_hog", _DEC8, dict(kwargs, pretrained=pretrained))


@register_model
def dmjd_vit_tiny_patch16_dec1_hog(pretrained=False, **kwargs):
    return _build("dmjd_vit_tiny_patch16_dec1_hog", _TINY_DEC, dict(kwargs, pretrained=pretrained))


@register_model
def dmjd_vit_base_patch16_dec8_hog(pretrained=False, **kwargs):
    return _build("dmjd_vit_base_patch16_dec8_hog", _VIT_DEC8, dict(kwargs, pretrained=pretrained))
