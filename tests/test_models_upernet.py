"""UperNet heads, loss and inference (whole, sliding window, multi-scale, flip) on tiny backbones (CPU)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models_upernet import FCNHead, UPerHead, UperNet, create_upernet, segmentation_loss

NUM_CLASSES = 5


class _FeatureInfo:
    def __init__(self, channels, reductions):
        self._channels, self._reductions = list(channels), list(reductions)

    def channels(self):
        return self._channels

    def reduction(self):
        return self._reductions


class TinyBackbone(nn.Module):
    """Four maps at strides 4, 8, 16, 32 from average pooling and 1x1 convs, in timm's features_only contract.

    Pooling windows tile an image whose sides are multiples of 32 symmetrically and 1x1 convs act per pixel, so
    the backbone commutes with a horizontal flip. It records the input sizes it sees."""

    def __init__(self, channels=(8, 12, 16, 16)):
        super().__init__()
        self.feature_info = _FeatureInfo(channels, (4, 8, 16, 32))
        ins = (3,) + tuple(channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in zip(ins, channels))
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        maps = []
        for k, conv in enumerate(self.convs):
            x = F.gelu(conv(F.avg_pool2d(x, 4 if k == 0 else 2)))
            maps.append(x)
        return maps


def tiny_upernet(seed=0, **kwargs):
    torch.manual_seed(seed)
    return UperNet(TinyBackbone(), NUM_CLASSES, channels=16, aux_channels=8, **kwargs)


def symmetrise_kernels(model):
    """Makes every conv kernel mirror-symmetric, so that the whole segmenter commutes with a horizontal flip."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    return model


def test_training_forward_gives_logits_at_a_quarter_and_aux_logits_at_a_sixteenth_for_odd_sizes():
    model = tiny_upernet().train()
    logits, aux = model(torch.randn(2, 3, 70, 54))
    assert logits.shape == (2, NUM_CLASSES, 17, 13)  # the backbone's stride-4 map: floor(70 / 4), floor(54 / 4)
    assert aux.shape == (2, NUM_CLASSES, 4, 3)  # its stride-16 map
    model.eval()
    logits, aux = model(torch.randn(1, 3, 70, 54))
    assert logits.shape == (1, NUM_CLASSES, 17, 13) and aux is None


def test_heads_follow_mmseg_layout():
    head = UPerHead([8, 12, 16, 20], NUM_CLASSES, channels=16)
    assert [stage[0].output_size for stage in head.ppm.stages] == [1, 2, 3, 6]
    assert [c[0].in_channels for c in head.lateral_convs] == [8, 12, 16]  # no lateral conv on the PPM level
    assert head.ppm.bottleneck[0].in_channels == 20 + 4 * 16
    assert head.fpn_bottleneck[0].in_channels == 4 * 16 and head.fpn_bottleneck[0].kernel_size == (3, 3)
    assert isinstance(head.classifier[0], nn.Dropout2d) and head.classifier[0].p == 0.1
    assert head.classifier[1].kernel_size == (1, 1) and head.classifier[1].out_channels == NUM_CLASSES
    aux = FCNHead(16, NUM_CLASSES, channels=8)
    assert aux.conv[0].kernel_size == (3, 3) and aux.conv[0].bias is None and isinstance(aux.conv[1], nn.BatchNorm2d)
    assert float(head.classifier[1].weight.detach().std()) < 0.02  # classifier initialised N(0, 0.01)


def test_every_parameter_gets_a_gradient_from_the_training_loss():
    # DDP (without find_unused_parameters) needs every parameter in the graph of each step.
    model = tiny_upernet().train()
    logits, aux = model(torch.randn(2, 3, 64, 64))
    segmentation_loss(logits, torch.randint(0, NUM_CLASSES, (2, 64, 64)), aux)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_timm_features_only_encoder_is_a_backbone():
    model = create_upernet("resnet10t", NUM_CLASSES, out_indices=(1, 2, 3, 4), channels=16, aux_channels=8).eval()
    assert model.in_channels == [64, 128, 256, 512] and model.size_divisor == 32
    probs = model.predict(torch.randn(1, 3, 61, 47), (61, 47))
    assert probs.shape == (1, NUM_CLASSES, 61, 47)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 61, 47))


def test_loss_ignores_pixels_labelled_255_and_averages_over_the_others():
    logits = torch.randn(2, NUM_CLASSES, 8, 8)
    labels = torch.randint(0, NUM_CLASSES, (2, 8, 8))
    labels[0, :3] = 255
    labels[1, :, 5:] = 255
    valid = labels != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    torch.testing.assert_close(segmentation_loss(logits, labels)["loss"], expected)
    changed = logits.clone()
    changed[0, :, :3] = 100.0  # logits at ignored pixels do not matter
    torch.testing.assert_close(segmentation_loss(changed, labels)["loss"], expected)


def test_loss_upsamples_logits_to_the_label_size_and_weights_the_aux_loss():
    logits, aux = torch.randn(2, NUM_CLASSES, 4, 4), torch.randn(2, NUM_CLASSES, 2, 2)
    labels = torch.randint(0, NUM_CLASSES, (2, 16, 16))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    aux_up = F.interpolate(aux, size=(16, 16), mode="bilinear", align_corners=False)
    losses = segmentation_loss(logits, labels, aux, aux_weight=0.4)
    torch.testing.assert_close(losses["loss_decode"], F.cross_entropy(up, labels))
    torch.testing.assert_close(losses["loss_aux"], F.cross_entropy(aux_up, labels))
    torch.testing.assert_close(losses["loss"], losses["loss_decode"] + 0.4 * losses["loss_aux"])


def test_loss_of_a_fully_ignored_batch_is_zero_not_nan():
    logits = torch.randn(1, NUM_CLASSES, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))["loss"]
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_inference_pads_to_the_coarsest_stride_and_crops_back():
    model = tiny_upernet().eval()
    logits = model.logits_at_input_size(torch.randn(1, 3, 50, 70))
    assert logits.shape == (1, NUM_CLASSES, 50, 70)
    assert model.backbone.seen[-1] == (64, 96)


def test_slide_equals_whole_when_one_window_covers_the_image():
    model = tiny_upernet().eval()
    images = torch.randn(2, 3, 64, 64)
    whole = model.predict(images, (64, 64), mode="whole")
    torch.testing.assert_close(model.predict(images, (64, 64), mode="slide", crop_size=64, stride=40), whole)


def test_slide_on_an_image_smaller_than_the_crop_runs_it_whole():
    model = tiny_upernet().eval()
    images = torch.randn(1, 3, 40, 56)
    slide = model.predict(images, (40, 56), mode="slide", crop_size=64, stride=32)
    assert model.backbone.seen[-1] == (64, 64)  # one window, the image itself (padded to the stride only)
    torch.testing.assert_close(slide, model.predict(images, (40, 56), mode="whole"))


def test_slide_averages_the_logits_of_overlapping_windows():
    model = tiny_upernet().eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = model.logits_at_input_size(images[..., 0:64])
        b = model.logits_at_input_size(images[..., 32:96])
        expected = torch.cat([a[..., :32], (a[..., 32:] + b[..., :32]) / 2, b[..., 32:]], dim=-1)
        torch.testing.assert_close(model.slide_logits(images, crop_size=64, stride=32), expected)
    # stride 40 gives windows at 0 and 32 too: the last one is shifted back to end at the border
    torch.testing.assert_close(model.predict(images, (64, 96), mode="slide", crop_size=64, stride=40),
                               expected.softmax(1))


def test_probabilities_are_resized_to_the_label_size():
    model = tiny_upernet().eval()
    probs = model.predict(torch.randn(1, 3, 64, 64), (100, 90), mode="slide", crop_size=32, stride=21)
    assert probs.shape == (1, NUM_CLASSES, 100, 90)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 100, 90))


def test_flip_augmentation_changes_nothing_on_a_flip_equivariant_model():
    model = symmetrise_kernels(tiny_upernet()).eval()
    images = torch.randn(2, 3, 64, 96)
    plain = model.predict(images, (64, 96))
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-4)  # the prediction itself is not symmetric
    torch.testing.assert_close(model.predict(images, (64, 96), flip=True), plain)


def test_flip_augmentation_averages_the_mirrored_run_mapped_back():
    model = tiny_upernet().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model.logits_at_input_size(images).softmax(1)
        mirrored = model.logits_at_input_size(images.flip(-1)).softmax(1).flip(-1)
    torch.testing.assert_close(model.predict(images, (64, 64), flip=True), (plain + mirrored) / 2)


def test_multi_scale_averages_the_probabilities_of_each_ratio():
    model = tiny_upernet().eval()
    images = torch.randn(1, 3, 64, 64)
    per_ratio = [model.predict(images, (64, 64), ratios=(r,)) for r in (0.5, 1.0, 1.5)]
    assert model.backbone.seen[-3:] == [(32, 32), (64, 64), (96, 96)]
    torch.testing.assert_close(model.predict(images, (64, 64), ratios=(0.5, 1.0, 1.5)), sum(per_ratio) / 3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="aux_in_index 4"):
        UperNet(TinyBackbone(), NUM_CLASSES, aux_in_index=4)
    model = tiny_upernet().eval()
    with pytest.raises(ValueError, match="mode"):
        model.predict(torch.randn(1, 3, 32, 32), (32, 32), mode="sliding")
    with pytest.raises(ValueError, match="labels must be"):
        segmentation_loss(torch.randn(2, NUM_CLASSES, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_layer_decay_groups_follow_convmaes_segmentation_optimizer():
    """timm's param_groups_layer_decay on the UperNet, as main_segment.py builds it: num_layers = stage-3 depth + 2;
    stages 1-2, every patch embedding and pos_embed are layer 0, stage-3 block i is layer i + 1, the stride-32 level
    and both heads the last layer; scale = decay ** (num_layers - 1 - layer); no weight decay on 1-D parameters nor
    on pos_embed."""
    import dmjd_encoders  # noqa: F401  (registers the encoders)
    from timm.optim import param_groups_layer_decay

    model = create_upernet("convvit_tiny_patch16", NUM_CLASSES, channels=16, aux_channels=8, img_size=64)
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.75)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    scale_of = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert set(scale_of) == set(params)
    depth = len(model.backbone.model.blocks3)
    num_layers = depth + 2
    seen = set()
    for name, (scale, wd) in scale_of.items():
        inner = name.removeprefix("backbone.model.")
        if inner.startswith(("patch_embed", "pos_embed", "blocks1.", "blocks2.")):
            layer = 0
        elif inner.startswith("blocks3."):
            layer = int(inner.split(".")[1]) + 1
        else:
            assert inner.startswith(("downsample32.", "decode_head.", "auxiliary_head.")), name
            layer = num_layers - 1
        seen.add(layer)
        assert scale == pytest.approx(0.75 ** (num_layers - 1 - layer)), name
        assert wd == (0.0 if params[name].ndim == 1 or inner == "pos_embed" else 0.05), name
    assert seen == set(range(num_layers))
