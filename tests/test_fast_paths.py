"""The fast paths that main_pretrain.py can take give the plain path's loss on a fixed batch."""

import pytest
import timm
import torch

import models_dmjd  # noqa: F401


def fixed_batch(model):
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return images, model.make_masks(4, generator=torch.Generator().manual_seed(1))


def loss_of(model, images, masks, **autocast):
    with torch.no_grad(), torch.autocast("cpu", enabled=bool(autocast), **autocast):
        loss, parts = model(images, masks)
    return torch.stack([loss, parts["loss_mask"], parts["loss_vis"]])


def set_fused_attention(model, enabled: bool) -> None:
    """timm's attention modules choose their kernel at construction (timm.layers.set_fused_attn); this flips it."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64).eval()
    images, masks = fixed_batch(model)
    set_fused_attention(model, False)
    return model, images, masks, loss_of(model, images, masks)


def test_fused_attention(reference):
    model, images, masks, plain = reference
    set_fused_attention(model, True)
    assert any(getattr(m, "fused_attn", False) for m in model.modules())
    torch.testing.assert_close(loss_of(model, images, masks), plain, rtol=1e-5, atol=1e-5)


def test_channels_last(reference):
    model, images, masks, plain = reference
    model = model.to(memory_format=torch.channels_last)
    got = loss_of(model, images.contiguous(memory_format=torch.channels_last), masks)
    model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_within_tolerance(reference):
    model, images, masks, plain = reference
    torch.testing.assert_close(loss_of(model, images, masks, dtype=torch.bfloat16), plain, rtol=0.05, atol=0.02)


def test_fused_adamw_step_matches_foreach():
    torch.manual_seed(0)
    a = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64)
    b = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64)
    b.load_state_dict(a.state_dict())
    images, masks = fixed_batch(a)
    for model, kwargs in ((a, {"foreach": False}), (b, {"fused": True})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), **kwargs)
        for _ in range(2):
            loss, _ = model(images, masks)
            opt.zero_grad()
            loss.backward()
            opt.step()
    # Adam divides by sqrt(v) + eps, so near-zero gradients differ by rounding; still 20x below one lr step.
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=5e-5, msg=lambda m: f"{name}: {m}")


def test_compiled_model_matches(reference):
    model, images, masks, plain = reference
    compiled = torch.compile(model)
    torch.testing.assert_close(loss_of(compiled, images, masks), plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_come_back_in_each_parameters_layout(channels_last):
    """DDP's gradient buckets are views with each parameter's strides: a gradient in another layout is copied
    every step (and DDP warns). The sparse stages use conv weights as matrices, so this is checked here."""
    torch.manual_seed(0)
    model = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    loss, _ = model(images)
    loss.backward()
    mismatched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert not mismatched
