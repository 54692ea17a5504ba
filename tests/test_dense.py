"""dmjd_encoders.dense: the encoders' build options for dense transfer (relative positions per block, shared as
ConvMAE's DET or decomposed as ViTDet's, layer scale, windowed attention, ViTDet's simple feature pyramid, ConvMAE's
max-pooled stride-32 level): off by default, shapes at any multiple of the stride, windows that cover the grid are
global attention, and pre-trained weights load with only the new parameters fresh."""
import pytest
import timm
import torch
from timm.models.vision_transformer import Block

import dmjd_encoders  # noqa: F401  (registers the encoders)
from dmjd_encoders.dense import (CONVMAE_DET_GLOBAL_BLOCKS, CONVMAE_DET_WINDOW_SIZE, DecomposedRelPos, DenseBlock,
                                 DenseOptions, RelPosBias, detection_attention, window_partition, window_unpartition)
from dmjd_encoders.pretrained import FRESH_KEYS, is_fresh, load_encoder, load_pretrained
from helpers import pretrain_checkpoint

CONVVIT, VIT = "convvit_tiny_patch16", "vit_test_patch16_gap_sincos"
OPTIONS = {
    "rel_pos_bias": dict(rel_pos_bias=True),
    "layer_scale": dict(layer_scale=0.1),
    "windows": dict(window_size=3, global_blocks=(1,), rel_pos_bias=True),
    "shared": dict(window_size=3, global_blocks=(1,), rel_pos_bias=True, rel_pos_layout="shared"),
    "decomposed": dict(window_size=3, global_blocks=(1,), rel_pos_bias=True, rel_pos_layout="decomposed"),
}


def build(name, size=64, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=size, dynamic_img_size=True, **kwargs).eval()


def randomize_tables(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("relative_position_bias_table", "rel_pos_h", "rel_pos_w")):
                p.normal_()


@pytest.mark.parametrize("name", [CONVVIT, VIT])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("size", [64, 96])
def test_each_option_gives_the_same_shapes_at_any_multiple_of_the_stride(name, option, size):
    model = build(name, **OPTIONS[option])
    randomize_tables(model)
    assert model.forward_features(torch.randn(1, 3, size, size)).shape == (1, (size // 16) ** 2, 64)
    features = build(name, features_only=True, **OPTIONS[option])(torch.randn(1, 3, size, size))
    assert all(f.shape[-1] * f.shape[-2] > 0 and torch.isfinite(f).all() for f in features)


def test_every_option_is_off_by_default_and_the_blocks_are_timms():
    for name, blocks in ((CONVVIT, "blocks3"), (VIT, "blocks")):
        model = timm.create_model(name, img_size=64)
        assert all(type(b) is Block for b in getattr(model, blocks))
        assert not any(is_fresh(k, ("rel_pos.", "ls1.", "ls2.", "pyramid.")) for k in model.state_dict())


@pytest.mark.parametrize("name", [CONVVIT, VIT])
def test_windows_that_cover_the_grid_attend_as_the_global_blocks(name):
    globally = build(name, rel_pos_bias=True)
    randomize_tables(globally)
    windowed = build(name, rel_pos_bias=True, window_size=4)  # 64 pixels: a 4 x 4 grid, one window
    windowed.load_state_dict(globally.state_dict())  # the window's tables have the grid's size
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(windowed.forward_features(x), globally.forward_features(x))


def test_a_window_larger_than_the_grid_pads_it_and_crops_back():
    x = torch.randn(2, 5, 7, 8)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 2, 16, 8) and padded == (8, 8)
    torch.testing.assert_close(window_unpartition(windows, 4, padded, (5, 7)), x)


def test_new_tables_start_at_zero_so_a_model_with_them_computes_the_pretrained_function():
    plain, biased = build(VIT), build(VIT, rel_pos_bias=True)
    missing = biased.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("rel_pos" in k for k in missing)
    x = torch.randn(1, 3, 96, 64)
    torch.testing.assert_close(biased.forward_features(x), plain.forward_features(x))


def test_a_global_table_is_resampled_to_another_grid_and_indexed_as_is_at_its_own():
    bias = RelPosBias((4, 4), num_heads=2)
    with torch.no_grad():
        bias.relative_position_bias_table.normal_()
    own = bias((4, 4))
    assert own.shape == (2, 16, 16)
    assert torch.equal(own[:, 5, 5], bias.relative_position_bias_table[(2 * 4 - 1) * 3 + 3])  # offset (0, 0)
    assert bias((6, 3)).shape == (2, 18, 18)


@pytest.mark.parametrize("name,blocks", [(CONVVIT, "blocks3"), (VIT, "blocks")])
def test_layer_scale_starts_every_branch_at_its_init_value(name, blocks):
    model = build(name, layer_scale=0.25)
    gammas = [b.ls1.gamma for b in getattr(model, blocks)] + [b.ls2.gamma for b in getattr(model, blocks)]
    assert gammas and all(torch.equal(g, torch.full_like(g, 0.25)) for g in gammas)


def test_windows_go_to_every_block_but_the_global_ones():
    model = build(VIT, window_size=2, global_blocks=(1,))
    assert [b.window_size for b in model.blocks] == [2, 0]
    assert [b.rel_pos for b in model.blocks] == [None, None]
    with pytest.raises(ValueError, match="global_blocks .* blocks 0 to 1"):
        build(VIT, window_size=2, global_blocks=(2,))
    with pytest.raises(ValueError, match="needs window_size"):
        build(VIT, global_blocks=(0,))


def test_convmae_detections_windows_fit_convvit_base():
    DenseOptions(window_size=CONVMAE_DET_WINDOW_SIZE, global_blocks=CONVMAE_DET_GLOBAL_BLOCKS).check(depth=11)
    assert (CONVMAE_DET_WINDOW_SIZE, CONVMAE_DET_GLOBAL_BLOCKS) == (16, (0, 3, 6, 10))


def test_a_class_token_takes_the_bias_of_global_blocks_but_no_windows():
    model = build(VIT, class_token=True, rel_pos_bias=True)
    randomize_tables(model)
    assert model.forward_features(torch.randn(1, 3, 64, 96)).shape == (1, 1 + 4 * 6, 64)
    with pytest.raises(ValueError, match="without a class token"):
        build(VIT, class_token=True, window_size=2)


@pytest.mark.parametrize("size", [64, 96])
def test_the_simple_pyramid_gives_four_levels_at_strides_4_to_32(size):
    model = build(VIT, features_only=True, simple_pyramid=True, pyramid_channels=32)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32] * 4
    maps = model(torch.randn(2, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(2, 32, size // s, size // s) for s in (4, 8, 16, 32)]


def test_the_simple_pyramid_has_vitdets_layers():
    pyramid = build(VIT, simple_pyramid=True).pyramid
    up4 = pyramid.up4
    assert [type(m).__name__ for m in up4] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]
    assert (up4[0].out_channels, up4[3].out_channels, pyramid.up2.out_channels) == (32, 16, 32)
    assert [type(m).__name__ for m in pyramid.outputs[0]] == ["Conv2d", "LayerNorm2d", "Conv2d", "LayerNorm2d"]
    assert pyramid.outputs[0][0].kernel_size == (1, 1) and pyramid.outputs[0][2].kernel_size == (3, 3)
    assert [tuple(m.shape[-2:]) for m in pyramid.levels(torch.randn(1, 64, 1, 3))] == [(4, 12), (2, 6), (1, 3), (1, 2)]


def test_the_pyramid_learns_at_the_rate_of_the_heads_in_a_upernet():
    from timm.optim import param_groups_layer_decay
    from models_upernet import create_upernet
    model = create_upernet(VIT, 3, channels=8, aux_channels=8, img_size=32, simple_pyramid=True)
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.5)

    def scales_of(module):
        ids = {id(p) for p in module.parameters()}
        return {g["lr_scale"] for g in groups for p in g["params"] if id(p) in ids}

    assert scales_of(model.backbone.model.pyramid) == scales_of(model.decode_head) == {1.0}
    assert scales_of(model.backbone.model.blocks[0]) == {0.5 ** 2}


def test_intermediates_of_the_pyramid_follow_timms_contract():
    model = build(VIT, simple_pyramid=True, pyramid_channels=16)
    x = torch.randn(1, 3, 64, 64)
    final, maps = model.forward_intermediates(x, indices=[1, 3])
    assert final.shape == (1, 16, 64) and [m.shape[-1] for m in maps] == [8, 2]
    tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert tokens[0].shape == (1, 4, 16)


def test_convvit_features_keep_strides_4_to_32_with_every_option():
    model = build(CONVVIT, features_only=True, rel_pos_bias=True, layer_scale=1.0, window_size=2)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[-1] for f in model(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 2]


def test_the_relative_position_tables_get_no_weight_decay():
    model = build(CONVVIT, rel_pos_bias=True)
    assert model.no_weight_decay() == {"pos_embed"} | {f"blocks3.{i}.rel_pos.relative_position_bias_table"
                                                       for i in range(2)}


def test_pretraining_takes_the_encoder_without_dense_options():
    model = build(VIT, rel_pos_bias=True)
    with pytest.raises(ValueError, match="dense transfer"):
        model.forward_masked(torch.randn(1, 3, 64, 64), torch.zeros(1, 16, dtype=torch.bool))


@pytest.mark.parametrize("pretrain,name,extra", [
    ("dmjd_convit_tiny_patch16_dec1_hog", CONVVIT, dict(stride32_level=True)),
    ("dmjd_vit_tiny_patch16_dec1_hog", VIT, dict(simple_pyramid=True)),
])
def test_pretrained_weights_load_with_every_option_on_and_only_the_new_parameters_fresh(tmp_path, pretrain, name,
                                                                                        extra):
    pretrained = pretrain_checkpoint(tmp_path / "pre.pth", pretrain, img_size=64)
    model = timm.create_model(name, img_size=64, rel_pos_bias=True, layer_scale=1.0, window_size=2,
                              global_blocks=(0,), **extra)
    missing, unexpected = load_pretrained(model, str(tmp_path / "pre.pth"))
    new = ("rel_pos.", "ls1.", "ls2.", "downsample32." if name == CONVVIT else "pyramid.")
    assert not unexpected and missing and all(is_fresh(k, new) for k in missing)
    # (torch never lists a BatchNorm's num_batches_tracked as missing)
    assert {k for k in model.state_dict() if is_fresh(k, new) and "num_batches" not in k} == set(missing)
    load_encoder(model, str(tmp_path / "pre.pth"), allowed_missing=FRESH_KEYS["dense"])  # raises if any other
    own = pretrained.state_dict()
    block = "blocks3.1" if name == CONVVIT else "blocks.1"
    assert torch.equal(model.state_dict()[f"{block}.attn.qkv.weight"], own[f"encoder.{block}.attn.qkv.weight"])
    assert isinstance(getattr(model, "blocks3" if name == CONVVIT else "blocks")[1], DenseBlock)


@pytest.mark.parametrize("name,blocks", [(CONVVIT, "blocks3"), (VIT, "blocks")])
def test_the_shared_layout_has_one_table_for_the_windowed_blocks_and_one_for_the_global_ones(name, blocks):
    model = build(name, window_size=2, global_blocks=(1,), rel_pos_bias=True, rel_pos_layout="shared")
    tables = [k for k, _ in model.named_parameters() if "relative_position_bias_table" in k]
    assert tables == ["rel_pos_tables.window.relative_position_bias_table",
                      "rel_pos_tables.global.relative_position_bias_table"]
    assert model.rel_pos_tables["window"].size == (2, 2) and model.rel_pos_tables["global"].size == (4, 4)
    first, second = getattr(model, blocks)
    assert first.rel_pos is None and first.shared_rel_pos[0] is model.rel_pos_tables["window"]
    assert second.shared_rel_pos[0] is model.rel_pos_tables["global"]
    randomize_tables(model)
    model.forward_features(torch.randn(1, 3, 64, 64)).sum().backward()  # both tables learn, through their blocks
    assert all(model.rel_pos_tables[k].relative_position_bias_table.grad.abs().sum() > 0 for k in ("window", "global"))
    assert model.no_weight_decay() >= {"rel_pos_tables.window.relative_position_bias_table"}


def test_decomposed_relative_positions_are_vitdets_query_dependent_bias():
    """The bias of query (h, w) on key (h', w') is q . Rh[h - h'] + q . Rw[w - w'], added to the attention logits."""
    torch.manual_seed(0)
    block = DenseBlock(8, 2, grid_size=(2, 3), rel_pos_bias=True, rel_pos_layout="decomposed").eval()
    with torch.no_grad():
        block.rel_pos.rel_pos_h.normal_()
        block.rel_pos.rel_pos_w.normal_()
    x = torch.randn(1, 6, 8)
    attn, (rh, rw) = block.attn, (block.rel_pos.rel_pos_h.detach(), block.rel_pos.rel_pos_w.detach())
    q, k, v = attn.qkv(x).detach().reshape(1, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
    positions = [(h, w) for h in range(2) for w in range(3)]
    bias = torch.tensor([[[float(q[0, a, i] @ rh[hi - hj + 1] + q[0, a, i] @ rw[wi - wj + 2])
                           for j, (hj, wj) in enumerate(positions)] for i, (hi, wi) in enumerate(positions)]
                         for a in range(2)])
    weights = ((q[0] @ k[0].transpose(-1, -2)) * attn.scale + bias).softmax(-1)
    expected = attn.proj((weights @ v[0]).transpose(0, 1).reshape(1, 6, 8))
    torch.testing.assert_close(block._attend(x, (2, 3)), expected, atol=1e-5, rtol=1e-5)
    # any grid: the embeddings interpolated to its span
    assert DecomposedRelPos((2, 3), 4)(torch.randn(1, 2, 20, 4), (4, 5)).shape == (1, 2, 20, 20)


def test_detection_attention_follows_each_anchor_by_the_depth():
    assert detection_attention(False, 11) == (16, (0, 3, 6, 10))  # ConvMAE-B's DET
    assert detection_attention(False, 23) == (16, (0, 7, 13, 22))  # the same fractions of ConViT-L's depth
    assert detection_attention(True, 12) == (14, (2, 5, 8, 11))  # ViTDet's ViT-B
    assert detection_attention(True, 24) == (14, (5, 11, 17, 23))  # ViT-L
    assert detection_attention(True, 32) == (14, (7, 15, 23, 31))  # ViT-H


def test_convmaes_detection_backbone_max_pools_the_stride_16_map_to_its_stride_32_level():
    model = build(CONVVIT, features_only=True, stride32_level="maxpool")
    assert not list(model.model.downsample32.parameters())
    maps = model(torch.randn(1, 3, 96, 64))
    torch.testing.assert_close(maps[3], torch.nn.functional.max_pool2d(maps[2], 2, ceil_mode=True))
    with pytest.raises(ValueError, match="stride32_level"):
        build(CONVVIT, features_only=True, stride32_level="avgpool")


def test_maes_class_token_is_dropped_for_a_model_of_the_patch_tokens(tmp_path):
    """ViTDet takes MAE's weights without the class token and its position: a windowed model has no place for it."""
    from dmjd_encoders.checkpoint import save_checkpoint
    mae = timm.create_model(VIT, img_size=64, class_token=True)
    save_checkpoint({"model": mae.state_dict()}, str(tmp_path / "mae.pth"))
    model = build(VIT, window_size=2, global_blocks=(1,))
    with pytest.raises(Exception, match="class_token"):
        load_pretrained(model, str(tmp_path / "mae.pth"))
    missing, unexpected = load_pretrained(model, str(tmp_path / "mae.pth"), drop_class_token=True)
    assert not missing and not unexpected
    assert torch.equal(model.pos_embed, mae.pos_embed[:, 1:])
