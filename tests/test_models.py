"""Encoders and the DMJD model on tiny configurations (CPU, fp32)."""
import pytest
import timm
import torch
import torch.nn as nn

import dmjd_encoders  # noqa: F401  (registers the encoders)
import models_dmjd
from dmjd_encoders.models_convvit import ConvViT, ViT, visible_token_ids
from models_dmjd import DMJD, EMATeacher, normalized_pixel_targets
from util.masking import disjoint_masks


def tiny_convvit(img_size=64, **kwargs):
    return ConvViT(img_size=img_size, embed_dim=(16, 24, 32), depth=(1, 1, 1), num_heads=2,
                   mlp_ratio=(2.0, 2.0, 2.0), **kwargs)


def images(batch=2, size=(64, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, *size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", ["convvit_tiny_patch16", "vit_test_patch16_gap_sincos"])
@pytest.mark.parametrize("size", [(64, 64), (32, 80)])
def test_classifiers_from_timm_any_size(name, size):
    model = timm.create_model(name, img_size=size, num_classes=7)
    assert model(torch.randn(2, 3, *size)).shape == (2, 7)
    grid = (size[0] // 16, size[1] // 16)
    assert model.grid_size == grid and model.pos_embed.shape == (1, grid[0] * grid[1], model.embed_dim)


def test_input_size_must_fit_the_stride():
    with pytest.raises(ValueError, match="divisible by the model's stride 16"):
        tiny_convvit(img_size=72)
    model = tiny_convvit(img_size=64)
    with pytest.raises(ValueError, match="built for"):
        model.forward_features(torch.randn(1, 3, 48, 48))


def test_visible_token_ids_keep_raster_order():
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    assert visible_token_ids(mask).tolist() == [[1, 2], [0, 3]]


@pytest.mark.parametrize("sparse_stages", [False, True])
@pytest.mark.parametrize("fuse_stages", [False, True])
def test_masked_pixels_do_not_leak_into_visible_tokens(fuse_stages, sparse_stages):
    torch.manual_seed(0)
    model = tiny_convvit(fuse_stages=fuse_stages, sparse_stages=sparse_stages).eval()
    mask = disjoint_masks(2, model.grid_size, 1, 0.5, mask_type="rand", generator=torch.Generator().manual_seed(1))[0]
    x = torch.randn(2, 3, 64, 64)
    pixel_mask = mask.reshape(2, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    with torch.no_grad():
        out = model.forward_masked(x, mask)
        changed_masked = model.forward_masked(torch.where(pixel_mask, torch.randn_like(x) * 5, x), mask)
        changed_visible = model.forward_masked(torch.where(~pixel_mask, torch.randn_like(x) * 5, x), mask)
    assert out.shape == (2, 8, 32)
    torch.testing.assert_close(changed_masked, out, atol=1e-5, rtol=1e-5)
    assert (changed_visible - out).abs().max() > 1e-2  # the test can see a change where there should be one


def test_masked_conv_stage_would_leak_without_the_mask():
    """Control: the same edit does reach visible tokens when the (dense) conv stages ignore the mask."""
    torch.manual_seed(0)
    model = tiny_convvit(sparse_stages=False).eval()
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True  # an inner token: its neighbours are visible
    x = torch.randn(1, 3, 64, 64)
    x2 = x.clone()
    x2[..., 16:32, 16:32] += 5
    with torch.no_grad():
        for blk in list(model.blocks1) + list(model.blocks2):
            blk.forward = (lambda b: (lambda t, visible=None: type(b).forward(b, t, None)))(blk)
        leaked = (model.forward_masked(x2, mask) - model.forward_masked(x, mask)).abs().max()
    assert leaked > 1e-3


@pytest.mark.parametrize("size, mask_type, channels_last, drop_path", [
    ((64, 64), "block", False, 0.0),
    ((48, 80), "rand", False, 0.0),
    ((64, 64), "rand", True, 0.0),
    ((64, 96), "block", False, 0.2),
])
def test_sparse_stages_match_the_dense_path(size, mask_type, channels_last, drop_path):
    """The conv stages run at the visible tokens only, with the dense masked path's outputs and gradients."""
    torch.manual_seed(0)
    dense = tiny_convvit(img_size=size, fuse_stages=True, sparse_stages=False, drop_path_rate=drop_path)
    sparse = tiny_convvit(img_size=size, fuse_stages=True, sparse_stages=True, drop_path_rate=drop_path)
    sparse.load_state_dict(dense.state_dict())
    mask = disjoint_masks(3, dense.grid_size, 2, 0.5, mask_type=mask_type,
                          block_size=2 if mask_type == "block" else 1,
                          generator=torch.Generator().manual_seed(2)).reshape(6, -1)
    x = torch.randn(6, 3, *size)
    grads = []
    for model in (dense, sparse):
        if channels_last:
            model.to(memory_format=torch.channels_last)
        inp = (x.contiguous(memory_format=torch.channels_last) if channels_last else x.clone()).requires_grad_()
        torch.manual_seed(5)  # the same drop-path draws: one per sample and block, in the same order
        out = model.forward_masked(inp, mask)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), inp.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_d, gx_d, gp_d), (out_s, gx_s, gp_s) = grads
    torch.testing.assert_close(out_s, out_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_s, gx_d, rtol=1e-4, atol=1e-6)
    assert gp_s.keys() == gp_d.keys() and any(k.startswith("blocks1.") for k in gp_s)
    for name in gp_d:
        torch.testing.assert_close(gp_s[name], gp_d[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    # The whole pre-training loss too: sparse stages are the DMJD models' default, dense ones a construction option.
    kwargs = dict(img_size=size, mask_type=mask_type, drop_path_rate=drop_path)
    torch.manual_seed(0)
    dmjd_sparse = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", **kwargs).eval()
    dmjd_dense = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", sparse_stages=False, **kwargs).eval()
    dmjd_dense.load_state_dict(dmjd_sparse.state_dict())
    assert dmjd_sparse.encoder.sparse_stages and not dmjd_dense.encoder.sparse_stages
    images = torch.randint(0, 256, (4, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    masks = dmjd_sparse.make_masks(4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [torch.stack([loss, parts["loss_mask"], parts["loss_vis"]])
                  for loss, parts in (m(images, masks) for m in (dmjd_dense, dmjd_sparse))]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)


def test_vit_masked_tokens_do_not_leak():
    torch.manual_seed(0)
    model = ViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    mask = disjoint_masks(2, model.grid_size, 1, 0.75, mask_type="rand", generator=torch.Generator().manual_seed(0))[0]
    x = torch.randn(2, 3, 32, 32)
    pixel_mask = mask.reshape(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    with torch.no_grad():
        out = model.forward_masked(x, mask)
        out2 = model.forward_masked(torch.where(pixel_mask, torch.randn_like(x), x), mask)
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(out, out2)


def tiny_dmjd(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {}, {"vis_target": "ema"}, {"pred_type": "pixel"}, {"num_views": 1, "pred_ratio": 0.6, "theta": 0.0},
    {"num_views": 3, "mask_ratio": 0.75, "mask_type": "rand"},
])
def test_dmjd_forward_backward(kwargs):
    model = tiny_dmjd(**kwargs)
    teacher = EMATeacher(model.encoder) if model.uses_teacher else None
    loss, parts = model(images(), teacher=teacher)
    loss.backward()
    assert torch.isfinite(loss) and loss.dim() == 0
    assert (parts.get("loss_vis") is not None) == (model.theta > 0)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP runs without find_unused_parameters


def test_theta_weights_the_visible_loss():
    x = images()
    masks = tiny_dmjd().make_masks(2, generator=torch.Generator().manual_seed(0))
    for theta in (1.0, 0.3):
        model = tiny_dmjd(theta=theta)
        loss, parts = model(x, masks)
        torch.testing.assert_close(loss.detach(), parts["loss_mask"] + theta * parts["loss_vis"])
    model = tiny_dmjd(theta=0.0)
    assert model.visible_branch is None
    loss, parts = model(x, masks)
    torch.testing.assert_close(loss.detach(), parts["loss_mask"])


class _PerPatchStandardise(nn.Module):
    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** 0.5


def identity_dmjd():
    """A DMJD whose encoder outputs each visible patch's own normalised pixels and whose visible branch turns them
    into the pixel target: the visible loss is zero exactly when predictions and targets are aligned."""
    patch = 8
    encoder = ViT(img_size=32, patch_size=patch, embed_dim=patch * patch * 3, depth=0, num_heads=1)
    with torch.no_grad():
        encoder.patch_embed.proj.weight.zero_()
        encoder.patch_embed.proj.bias.zero_()
        for i in range(patch * patch * 3):  # output channel (row, col, channel) = that input pixel
            row, col, ch = i // (patch * 3), (i // 3) % patch, i % 3
            encoder.patch_embed.proj.weight[i, ch, row, col] = 1.0
        encoder.pos_embed.zero_()
    encoder.norm = nn.Identity()
    model = DMJD(encoder, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1, pred_type="pixel",
                 vis_target="hog", num_views=2, mask_ratio=0.5, mask_type="rand")
    model.visible_branch = _PerPatchStandardise()
    return model


def test_visible_branch_predictions_and_targets_are_aligned():
    model = identity_dmjd()
    x = images(4, (32, 32))
    masks = model.make_masks(4, generator=torch.Generator().manual_seed(3))
    mask = masks.reshape(8, -1)
    latent = model.encoder.forward_masked(model.normalize(x).repeat(2, 1, 1, 1), mask)
    target = normalized_pixel_targets(model.normalize(x), 8).repeat(2, 1, 1)
    ids = visible_token_ids(mask)
    aligned = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    pred = model.visible_branch(latent)
    torch.testing.assert_close(pred, aligned, atol=1e-4, rtol=1e-4)
    # The released code's indexing (targets taken in raster order, predictions in visible order) would not match.
    assert (pred - target[:, : ids.shape[1]]).abs().mean() > 0.1


def test_model_visible_loss_is_zero_when_aligned(monkeypatch):
    model = identity_dmjd()
    x = images(4, (32, 32))
    # The visible target (HOG by default) becomes the pixel target, which the identity branch reproduces.
    monkeypatch.setattr(models_dmjd, "hog_targets",
                        lambda raw, *a: normalized_pixel_targets(model.normalize(raw), 8))
    _, parts = model(x, model.make_masks(4, generator=torch.Generator().manual_seed(5)))
    assert parts["loss_vis"] < 1e-6


def test_ema_teacher_is_frozen_eval_and_updates():
    model = tiny_dmjd(vis_target="ema")
    teacher = EMATeacher(model.encoder)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    teacher.update(model.encoder, 0.9)
    for b, t, s in zip(before, teacher.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    with pytest.raises(ValueError, match="teacher"):
        model(images())


def real_images(size=64):
    """Four natural images from scikit-image, resized to size x size, uint8 [4, 3, size, size]."""
    import numpy as np
    from skimage import data, transform
    crops = []
    for load in (data.astronaut, data.coffee, data.chelsea, data.rocket):
        img = transform.resize(load()[:256, :256], (size, size), anti_aliasing=True)
        crops.append(torch.from_numpy((img * 255).astype(np.uint8)).permute(2, 0, 1))
    return torch.stack(crops)


def test_overfitting_one_batch_reduces_both_losses():
    model = tiny_dmjd()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = real_images()
    masks = model.make_masks(4, generator=torch.Generator().manual_seed(0))
    history = []
    for _ in range(100):
        loss, parts = model(x, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((parts["loss_mask"].item(), parts["loss_vis"].item()))
    (mask0, vis0), (mask1, vis1) = history[0], history[-1]
    assert mask1 < 0.4 * mask0 and vis1 < 0.2 * vis0, history[::10]


def test_released_recipe_model_sizes():
    model = timm.create_model("dmjd_convit_base_patch16_dec8_hog")
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert 130e6 < total < 140e6  # the released model: about 136 M with its decoder
    assert model.decoder_pred.out_features == 108 and model.grid_size == (14, 14)
    assert 85e6 < encoder < 95e6


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="pred_type"):
        tiny_dmjd(pred_type="rgb")
    with pytest.raises(ValueError, match="block_size"):
        timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=48, block_size=2)
    model = tiny_dmjd()
    with pytest.raises(ValueError, match="masks of shape"):
        model(images(), torch.zeros(2, 2, 10, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_loss_matches_fp32(dtype):
    model = tiny_dmjd()
    x = real_images()
    masks = model.make_masks(4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model(x, masks)
        with torch.autocast("cpu", dtype=dtype):
            low, parts = model(x, masks)
    assert low.dtype == torch.float32 and parts["loss_mask"].dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("kwargs", [{}, {"mask_type": "rand", "mask_ratio": 0.75}, {"num_views": 3, "mask_ratio": 0.7}])
def test_known_visible_count_matches_the_masks_and_a_wrong_one_fails(kwargs):
    """num_visible_tokens is the count the masks leave; giving it spares the host read and changes nothing."""
    model = tiny_dmjd(**kwargs).eval()
    masks = model.make_masks(3)
    assert (~masks).sum(-1).unique().tolist() == [model.num_visible_tokens]
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        counted, known = (torch.stack([loss, parts["loss_mask"], parts["loss_vis"]]) for loss, parts in
                          (model(images, masks), model(images, masks, num_visible=model.num_visible_tokens)))
    torch.testing.assert_close(known, counted, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"num_visible={model.num_visible_tokens + 1}, but the masks leave "
                                         rf"\[{model.num_visible_tokens}\] tokens visible"):
        model(images, masks, num_visible=model.num_visible_tokens + 1)
