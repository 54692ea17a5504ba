"""timm's model contract (in the spirit of timm's own tests/test_models.py) for every encoder models_convvit registers.

Structure checks build every model on the meta device (shapes without weights); numerical checks use the test-size
models at 32-64 pixels on the CPU.
"""
import functools

import pytest
import timm
import torch
import torch.nn as nn

from dmjd_encoders import models_convvit  # registers the encoders
import models_dmjd  # noqa: F401
from benchmarks.grad_checkpointing import saved_activation_bytes

ALL = sorted(timm.list_models(module="models_convvit"))
SMALL = ["convvit_mini_patch8", "convvit_tiny_patch16", "vit_test_patch16_gap_sincos"]
SIZE = {"convvit_mini_patch8": 32, "convvit_tiny_patch16": 64, "vit_test_patch16_gap_sincos": 64}


def small(name, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("img_size", SIZE[name])
    return timm.create_model(name, **kwargs)


def images(name, batch=2, size=None, seed=0):
    size = size or (SIZE[name], SIZE[name])
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_every_encoder_is_registered():
    assert ALL == ["convvit_base_patch16", "convvit_large_patch16", "convvit_mini_patch8", "convvit_small_patch16",
                   "convvit_tiny_patch16", "vit_base_patch16_gap_sincos", "vit_large_patch16_gap_sincos",
                   "vit_test_patch16_gap_sincos"]


@pytest.mark.parametrize("name", ALL)
def test_default_cfg_features_and_head_shapes(name):
    """timm's test_model_default_cfgs: the cfg, num_features / head_hidden_size, forward_features unpooled,
    forward_head(pre_logits=True), reset_classifier(0) and (0, ''), num_classes=0 at build."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        cfg = model.pretrained_cfg
        assert model.default_cfg is cfg and cfg["architecture"] == name
        for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier"):
            assert cfg.get(key) is not None, key
        assert cfg["num_classes"] == model.num_classes == 0  # an encoder, as its weights are shared
        assert model.in_chans == cfg["input_size"][0]
        assert cfg["first_conv"] + ".weight" in model.state_dict()
        assert model.num_features == model.head_hidden_size == model.embed_dim
        x = torch.randn(1, *cfg["input_size"])
        tokens = model.forward_features(x)
        grid = cfg["input_size"][1] // model.patch_size
        assert tokens.shape == (1, grid * grid, model.num_features)
        # timm's convention for its ViTs and hybrids: tokens [N, L, D], L the cfg's pool_size, no output_fmt (which
        # timm reads as a map's layout)
        assert grid * grid == cfg["pool_size"][0] * cfg["pool_size"][1] and not hasattr(model, "output_fmt")
        pre_logits = model.forward_head(tokens, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)

        model = timm.create_model(name, num_classes=7)
        assert cfg["classifier"] + ".weight" in model.state_dict() and model(x).shape == (1, 7)
        assert model.get_classifier() is model.head
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre_logits.shape
        model.reset_classifier(0, "")
        assert model(x).shape == tokens.shape


@pytest.mark.parametrize("name", ALL)
def test_timm_factory_arguments_device_and_dtype(name):
    """timm's create_model(name, device=..., dtype=...) (timm's tests build every model so, on the meta device):
    every parameter and buffer on the device, the floating point ones in the dtype; the features_only build too."""
    for kwargs in ({}, {"features_only": True}):
        model = timm.create_model(name, device="meta", dtype=torch.bfloat16, **kwargs)
        tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
        assert {t.device.type for t in tensors.values()} == {"meta"}
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    with torch.device("meta"):
        assert timm.create_model(name, dtype=torch.float64).pos_embed.dtype == torch.float64


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier_keeps_the_models_device_dtype_and_mode(name):
    """timm's _assert_reset_classifier_preserves_parent_device_dtype: a new head is made where the model is, in its
    dtype, and in its mode (an eval model stays in eval)."""
    model = timm.create_model(name, device="meta").eval().to(dtype=torch.float64)
    for num_classes in (0, 2):
        model.reset_classifier(num_classes)
        assert all(not m.training for m in model.modules())
    assert {(p.device.type, p.dtype) for p in model.head.parameters()} == {("meta", torch.float64)}


def test_timms_own_tests_class_the_encoders_as_it_classes_its_token_models():
    """.ci/timm_models (timm's tests/test_models.py against the encoders) files them where timm files its own ViTs:
    the module that registers them among those with forward_intermediates, every ConViT among the models whose
    forward_features gives tokens (timm's list has vit_* already) and out of the TorchScript tests (not
    supported)."""
    import fnmatch
    import re
    from pathlib import Path
    script = (Path(__file__).resolve().parents[1] / ".ci" / "timm_models").read_text()
    added = dict(re.findall(r'\("(\w+_FILTERS)", "([^"]+)"\)', script))
    assert added["FEAT_INTER_FILTERS"] == models_convvit.TIMM_MODULE
    assert timm.list_models(module=added["FEAT_INTER_FILTERS"]) == ALL
    convvits = [n for n in ALL if isinstance(timm.create_model(n, device="meta"), models_convvit.ConvViT)]
    for name in ALL:  # timm's NON_STD_FILTERS hold vit_* (its ViTs and hybrids)
        assert fnmatch.fnmatch(name, added["NON_STD_FILTERS"]) or fnmatch.fnmatch(name, "vit_*"), name
    assert [n for n in ALL if fnmatch.fnmatch(n, added["EXCLUDE_JIT_FILTERS"])] == convvits


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_convvit_does_not_script_and_torch_export_takes_it():
    """docs/MODELS.md says TorchScript is not supported for ConViT, and that torch.export (with torch.compile, see
    test_torch_compile_fullgraph) is what takes it: the day it scripts, the docs and .ci/timm_models change."""
    model = small("convvit_tiny_patch16", img_size=32).eval()
    x = images("convvit_tiny_patch16", size=(32, 32))
    with pytest.raises(RuntimeError):  # TorchScript's compilation error
        torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))


@pytest.mark.parametrize("name", ALL)
def test_unknown_arguments_are_an_error(name):
    with torch.device("meta"), pytest.raises(TypeError):
        timm.create_model(name, not_a_model_arg=1)


@pytest.mark.parametrize("name", ALL)
def test_layer_groups_and_no_weight_decay_name_real_parameters(name):
    from timm.models import group_parameters
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=3, fc_norm=True)
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 2
    names = {n for n, _ in model.named_parameters()}
    assert {n for n in model.no_weight_decay() if hasattr(model, n) and getattr(model, n) is not None} <= names


@pytest.mark.parametrize("name", SMALL)
def test_forward_and_backward_reach_every_parameter(name):
    model = small(name, num_classes=42).train()
    out = model(images(name))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("name", SMALL)
def test_reset_classifier_with_timm_global_pool_values(name):
    model = small(name, num_classes=5).eval()
    x = images(name)
    with torch.no_grad():
        tokens = model.forward_features(x)
        model.reset_classifier(0)  # keeps the pooling
        torch.testing.assert_close(model(x), tokens.mean(dim=1))
        for pool, expected in (("max", tokens.amax(dim=1)), ("avgmax", 0.5 * (tokens.amax(1) + tokens.mean(1))),
                               ("", tokens)):
            model.reset_classifier(0, pool)
            torch.testing.assert_close(model(x), expected)
        model.reset_classifier(3, "avg")
        assert model(x).shape == (2, 3) and model.global_pool == "avg"
    with pytest.raises(ValueError, match="pools with one of"):
        model.reset_classifier(0, "token")  # no class token
    with pytest.raises(ValueError, match="fc_norm=True"):
        small(name, global_pool=True)  # the former boolean says what it became


@pytest.mark.parametrize("name", SMALL)
def test_fc_norm_pools_before_its_norm_and_the_default_normalises_first(name):
    model = small(name, fc_norm=True).eval()
    x = images(name)
    with torch.no_grad():
        assert isinstance(model.norm, nn.Identity)
        tokens = model.forward_features(x)
        torch.testing.assert_close(model(x), model.fc_norm(tokens.mean(dim=1)))
        encoder = small(name).eval()
        assert isinstance(encoder.fc_norm, nn.Identity) and not isinstance(encoder.norm, nn.Identity)


@pytest.mark.parametrize("name", SMALL)
def test_forward_intermediates_match_forward_features_and_feature_info(name):
    model = small(name).eval()
    x = images(name)
    info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(maps) == len(model.feature_info)
        for m, chs, red in zip(maps, info.channels(), info.reduction()):
            assert m.shape == (2, chs, x.shape[2] // red, x.shape[3] // red)
        tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert len(tokens) == 1
        torch.testing.assert_close(tokens[0], maps[-1].flatten(2).transpose(1, 2))
        normed = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(normed, final)  # the last level with the final norm is forward_features
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], maps[0])


def test_convvit_levels_are_convmae_segmentation_levels():
    """Strides 4, 8, 16 and 32 with ConvMAE-B's channels (its UperNet takes 256, 384, 768, 768), at any multiple of
    the stride, as NCHW maps."""
    with torch.device("meta"):
        model = timm.create_model("convvit_base_patch16", features_only=True, img_size=(224, 320))
        assert model.feature_info.channels() == [256, 384, 768, 768]
        assert model.feature_info.reduction() == [4, 8, 16, 32]
        maps = model(torch.randn(1, 3, 224, 320))
    assert [tuple(m.shape) for m in maps] == [(1, 256, 56, 80), (1, 384, 28, 40), (1, 768, 14, 20), (1, 768, 7, 10)]


# the levels features_only builds by default: ConViT's stride-32 level, a ViT's simple pyramid; or a ViT's blocks
@pytest.mark.parametrize("name, size, given, default", [
    ("convvit_tiny_patch16", (48, 80), {}, {"stride32_level": True}),
    ("vit_test_patch16_gap_sincos", (48, 80), {}, {"simple_pyramid": True}),
    ("vit_test_patch16_gap_sincos", (48, 80), {"simple_pyramid": False}, {}),
    ("convvit_mini_patch8", (40, 24), {}, {"stride32_level": True})])
def test_features_only_with_out_indices(name, size, given, default):
    model = small(name, img_size=size, features_only=True, out_indices=(0, -1), **given).eval()
    levels = small(name, img_size=size, **given, **default)
    expected = [levels.feature_info[i] for i in (0, len(levels.feature_info) - 1)]
    assert model.feature_info.channels() == [e["num_chs"] for e in expected]
    assert model.feature_info.reduction() == [e["reduction"] for e in expected]
    with torch.no_grad():
        maps = model(images(name, size=size))
    assert len(maps) == 2
    for m, e in zip(maps, expected):  # ceil: a stride-32 level of a 16-multiple keeps the border
        assert m.shape == (2, e["num_chs"], -(-size[0] // e["reduction"]), -(-size[1] // e["reduction"]))
    assert isinstance(model.model.head, nn.Identity)  # pruned to what the levels need


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("indices, prune_norm", [([0], False), ([1], False), ("all", True)])
def test_pruned_model_uses_every_parameter_left(name, indices, prune_norm):
    """timm's test_prune_intermediate_layers_params_used: what remains after pruning all gets a gradient (DDP);
    prune_norm=False is FeatureGetterNet with norm=True."""
    model = small(name, stride32_level=True) if name.startswith("convvit") else small(name)
    indices = list(range(len(model.feature_info))) if indices == "all" else indices
    take = model.prune_intermediate_layers(indices, prune_norm=prune_norm)
    maps = model.forward_intermediates(images(name), indices=take, norm=not prune_norm, intermediates_only=True)
    sum(m.sum() for m in maps).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_convvit_pruned_to_conv_stages_says_so():
    model = small("convvit_tiny_patch16")
    model.prune_intermediate_layers([1])
    with pytest.raises(RuntimeError, match="pruned"):
        model(images("convvit_tiny_patch16"))


@pytest.mark.parametrize("name", ["convvit_tiny_patch16", "vit_test_patch16_gap_sincos"])
def test_grad_checkpointing_keeps_values_and_saves_activation_memory(name):
    x = images(name, batch=4)
    results = []
    for enabled in (False, True):
        model = small(name, num_classes=5, drop_path_rate=0.1).train()
        model.set_grad_checkpointing(enabled)
        torch.manual_seed(3)  # the same drop-path draws, recomputed identically in the backward
        out, kept = saved_activation_bytes(model, lambda: model(x))
        out.square().sum().backward()
        results.append((out.detach(), kept, {n: p.grad for n, p in model.named_parameters()}))
    (out0, kept0, grads0), (out1, kept1, grads1) = results
    torch.testing.assert_close(out1, out0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], msg=lambda m: f"{n}: {m}")
    assert kept1 < 0.6 * kept0  # activations inside the blocks are recomputed, not kept


@pytest.mark.parametrize("sparse_stages", [True, False])
def test_masked_pretraining_path_checkpoints_too(sparse_stages):
    model = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64)
    model.encoder.sparse_stages = sparse_stages
    batch = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    masks = model.make_masks(2, generator=torch.Generator().manual_seed(0))
    results = []
    for enabled in (False, True):
        model.encoder.set_grad_checkpointing(enabled)
        loss, kept = saved_activation_bytes(model, lambda: model(batch, masks)[0])
        loss.backward()
        results.append((loss.detach(), kept))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1] < results[0][1]


@pytest.mark.parametrize("name", ["convvit_tiny_patch16", "vit_test_patch16_gap_sincos"])
def test_torch_compile_fullgraph(name):
    """One graph, no breaks (dynamo's fullgraph=True). The "eager" backend runs that graph as it is: inductor's code
    generation would add about a minute on two CPU cores and test torch rather than the model."""
    torch._dynamo.reset()
    model = small(name, img_size=32, num_classes=5).eval()
    x = images(name, size=(32, 32))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("name", ["convvit_tiny_patch16", "vit_test_patch16_gap_sincos"])
def test_another_img_size_and_dynamic_img_size(name):
    base = small(name, img_size=64).eval()
    with pytest.raises((ValueError, AssertionError)):
        base(images(name, size=(96, 96)))  # built for 64: a clear error, not a silent resize
    dynamic = small(name, img_size=64, dynamic_img_size=True).eval()
    dynamic.load_state_dict(base.state_dict())
    x = images(name, size=(48, 80))
    other = small(name, img_size=(48, 80)).eval()
    state = base.state_dict()
    state["pos_embed"] = timm.layers.resample_abs_pos_embed(state["pos_embed"], new_size=[3, 5], old_size=[4, 4],
                                                            num_prefix_tokens=0)
    other.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(dynamic.forward_features(x), other.forward_features(x))
        torch.testing.assert_close(dynamic(images(name)), base(images(name)))
        maps = dynamic.forward_intermediates(x, intermediates_only=True)
    assert maps[-1].shape[-2:] == (3, 5)
    with pytest.raises(ValueError, match="stride"):
        timm.create_model(name, img_size=72)


def test_convvit_set_input_size_resamples_the_position_embedding():
    model = small("convvit_tiny_patch16").eval()
    before = model.pos_embed.detach().clone()
    model.set_input_size((96, 64))
    assert model.grid_size == (6, 4) and model.pos_embed.shape == (1, 24, 64) and model.pos_embed.requires_grad
    expected = timm.layers.resample_abs_pos_embed(before, new_size=[6, 4], old_size=[4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 64)


def test_former_vit_names_still_build_and_say_the_new_name():
    with pytest.warns(UserWarning, match="vit_test_patch16_gap_sincos"):
        model = timm.create_model("vit_tiny_patch16", img_size=32)
    assert model.pretrained_cfg["architecture"] == "vit_test_patch16_gap_sincos"
    assert "vit_base_patch16" not in timm.list_models()  # no longer listed as a model of its own


def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="no weights of this model are published"):
        timm.create_model("convvit_tiny_patch16", pretrained=True)
    with pytest.raises(ValueError, match="pretrained=False"):  # a file given without pretrained=True is not ignored
        timm.create_model("convvit_tiny_patch16", pretrained_cfg_overlay=dict(file="weights.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# The checks of timm's own tests/test_models.py (pytorch-image-models), written here for the test-size encoders: each
# test names the timm test it mirrors. timm runs its models at the cfg's input size when the cfg says
# fixed_input_size, else at a reduced size (a target of 96 to 128 pixels), as `input_size_for` does. Left out:
# timm's TorchScript tests for ConViT, for which TorchScript is not supported (docs/MODELS.md); the ViT scripts.
# .ci/timm_models runs timm's file itself against every encoder.

TIMM_CHECKED = ["convvit_tiny_patch16", "vit_test_patch16_gap_sincos"]
DYNAMIC = [False, True]  # as registered, and built with dynamic_img_size=True (not fixed-size)


def input_size_for(cfg, target):
    """timm's _get_input_size: the cfg's size for a fixed-size model, else each side capped at `target`."""
    size = tuple(cfg["input_size"])
    return size if cfg.get("fixed_input_size") else tuple(min(s, target) for s in size)


def at_cfg_size(name, target, **kwargs):
    """The model in eval mode and one input at the size timm's tests take for it (`input_size_for`)."""
    model = timm.create_model(name, **kwargs).eval()
    return model, torch.randn(1, *input_size_for(model.pretrained_cfg, target))


@functools.lru_cache(maxsize=None)
def timm_traces_its_own_vit() -> bool:
    """Whether torch.fx traces timm's own VisionTransformer with this timm and torch (timm 1.0.26 passes a traced
    value as `is_causal` to scaled_dot_product_attention, which torch refuses; later releases do not)."""
    try:
        fx_model(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval())
        return True
    except TypeError:
        return False


def require_fx(name):
    """Skips an FX test of the ViT (a subclass of timm's) where timm cannot trace its own ViT."""
    if name.startswith("vit_") and not timm_traces_its_own_vit():
        pytest.skip(f"timm {timm.__version__} cannot trace its own VisionTransformer with torch.fx")


def fx_model(model, train=False):
    """timm's _create_fx_model: the model traced by torchvision's feature extraction with timm's leaf modules and
    functions, returning the nodes that feed the graph's output."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**tracer_kwargs).trace(model).nodes))
        names = [n.name for n in graph_nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in graph_nodes[0]._input_nodes]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", ALL)
def test_registered_cfg_says_what_a_default_build_takes(name):
    """The default cfg is true: fixed_input_size (a model built with the defaults refuses other sizes), pool_size
    (the token grid of forward_features at input_size), num_features, first_conv, classifier."""
    cfg = timm.get_pretrained_cfg(name).to_dict()
    with torch.device("meta"):
        model = timm.create_model(name)
    assert cfg["fixed_input_size"] is True and model.dynamic_img_size is False
    assert tuple(model.img_size) == tuple(cfg["input_size"][1:])  # timm builds it at the cfg's size
    assert tuple(cfg["pool_size"]) == tuple(model.grid_size)
    assert model.pretrained_cfg["pool_size"] == cfg["pool_size"] and model.pretrained_cfg["fixed_input_size"]
    assert cfg["first_conv"] + ".weight" in model.state_dict() and cfg["classifier"] == "head"


@pytest.mark.parametrize("name", TIMM_CHECKED)
@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_a_model_not_declared_fixed_size_takes_any_multiple_of_its_stride(name, dynamic):
    """What timm's reduced-size tests rely on: a cfg without fixed_input_size means any size that is a multiple of
    the stride works; a cfg with it means other sizes are refused."""
    model = small(name, dynamic_img_size=dynamic).eval()
    cfg = model.pretrained_cfg
    assert cfg["fixed_input_size"] is (not dynamic) and cfg["input_size"] == (3, 64, 64)
    with torch.no_grad():
        assert model(images(name)).shape == (2, model.num_features)  # the cfg's own size
        for size in ((32, 32), (48, 80), (96, 96)):
            if cfg["fixed_input_size"]:  # ConViT: a ValueError; the ViT: timm's patch embedding's AssertionError
                with pytest.raises((ValueError, AssertionError), match="built for|doesn't match model"):
                    model(images(name, size=size))
            else:
                tokens = model.forward_features(images(name, size=size))
                assert tokens.shape == (2, size[0] * size[1] // model.patch_size ** 2, model.num_features)


@pytest.mark.parametrize("name", TIMM_CHECKED)
@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_timm_model_forward(name, dynamic):
    """timm's test_model_forward: batch 1 at the cfg-derived size, no NaN; grad checkpointing, the same output."""
    model, x = at_cfg_size(name, 384, dynamic_img_size=dynamic)
    with torch.no_grad():
        out = model(x)
        assert out.shape[0] == 1 and not out.isnan().any()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TIMM_CHECKED)
@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_timm_model_backward(name, dynamic):
    """timm's test_model_backward: num_classes=42 at the cfg-derived size (128 for a model that is not fixed-size),
    every parameter gets a gradient."""
    model = timm.create_model(name, num_classes=42, dynamic_img_size=dynamic).train()
    size = input_size_for(model.pretrained_cfg, 128)
    assert size == ((3, 128, 128) if dynamic else (3, 224, 224))
    out = model(torch.randn(2, *size))
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert out.shape == (2, 42) and not out.isnan().any()


@pytest.mark.parametrize("name", TIMM_CHECKED)
def test_timm_model_default_cfgs_non_std(name):
    """timm's test_model_default_cfgs_non_std (transformers give [N, L, D] tokens) with pool_size: forward_features
    holds pool_size tokens of num_features, pre_logits and reset_classifier(0) give head_hidden_size, num_classes=0 at
    build gives num_features; for a model built at another size, its own cfg's pool_size."""
    for kwargs in ({}, {"img_size": (48, 80)}):
        model = timm.create_model(name, **kwargs).eval()
        cfg = model.default_cfg
        assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
        x = torch.randn(1, *input_size_for(cfg, 320))
        with torch.no_grad():
            tokens = model.forward_features(x)
            pre_logits = model.forward_head(tokens, pre_logits=True)
            assert tokens.shape == (1, cfg["pool_size"][0] * cfg["pool_size"][1], model.num_features)
            assert pre_logits.shape == (1, model.head_hidden_size)
            model.reset_classifier(0)
            assert model.num_classes == 0 and model(x).shape == pre_logits.shape
            assert timm.create_model(name, num_classes=0, **kwargs).eval()(x).shape == (1, model.num_features)
        assert cfg["first_conv"] + ".weight" in model.state_dict()
    assert cfg["pool_size"] == (3, 5)


@pytest.mark.parametrize("name", TIMM_CHECKED)
def test_timm_model_forward_features_and_intermediates(name):
    """timm's test_model_forward_features, test_model_forward_intermediates_features and
    test_model_forward_intermediates: the levels have feature_info's channels and at most ceil(size / reduction) + 1
    positions; forward_intermediates' final output is forward_features', with grad checkpointing too."""
    fx_works = not name.startswith("vit_") or timm_traces_its_own_vit()  # see require_fx
    for feature_cls in ("getter", "fx") if fx_works else ("getter",):
        model = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
        size = input_size_for(model.pretrained_cfg, 96)
        with torch.no_grad():
            outputs = model(torch.randn(1, *size))
        assert len(outputs) == len(model.feature_info.channels()) >= 2
        for channels, reduction, out in zip(model.feature_info.channels(), model.feature_info.reduction(), outputs):
            bound = [(s + reduction - 1) // reduction + 1 for s in size[1:]]  # ceil(size / reduction) + 1
            if out.dim() == 3:  # fx: a level of tokens, the last block's [N, L, D]
                assert out.shape[2] == channels and out.shape[1] <= bound[0] * bound[1]
            else:
                assert out.shape[1] == channels and out.shape[2] <= bound[0] and out.shape[3] <= bound[1]
            assert out.shape[0] == 1 and not out.isnan().any()
    model, x = at_cfg_size(name, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)
    assert len(maps) == len(model.feature_info)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_timm_model_forward_torchscript():
    """timm's test_model_forward_torchscript, for the ViT (timm's VisionTransformer scripts; ConViT does not)."""
    with timm.layers.set_layer_config(scriptable=True):
        model, x = at_cfg_size("vit_test_patch16_gap_sincos", 128)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize("name", TIMM_CHECKED)
@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_timm_model_forward_fx(name, dynamic):
    """timm's test_model_forward_fx: the model traced by torch.fx gives exactly the model's output."""
    require_fx(name)
    model, x = at_cfg_size(name, 128, dynamic_img_size=dynamic)
    with torch.inference_mode():
        out = model(x)
        traced = torch.cat(tuple(fx_model(model)(x).values()))
    assert torch.equal(traced, out) and not out.isnan().any()


@pytest.mark.parametrize("name", TIMM_CHECKED)
def test_timm_model_backward_fx(name):
    """timm's test_model_backward_fx: the traced model in training mode, every parameter gets a gradient."""
    require_fx(name)
    model = timm.create_model(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    traced = fx_model(model, train=True)
    out = torch.cat(tuple(traced(torch.randn(2, *input_size_for(model.pretrained_cfg, 128))).values()))
    out.mean().backward()
    assert [n for n, p in traced.named_parameters() if p.grad is None] == []
    assert sum(p.grad.numel() for p in traced.parameters()) == num_params and out.shape[-1] == 42


@pytest.mark.parametrize("name", TIMM_CHECKED)
def test_fx_feature_extraction_gives_the_levels_of_forward_intermediates(name):
    """timm's FX feature extraction (features_only=True, feature_cls="fx"; timm.models._features_fx) takes each
    level's last block: the same values as forward_intermediates' levels (the token level as [N, L, D])."""
    from timm.models._features_fx import FeatureGraphNet  # what features_only=True, feature_cls="fx" builds
    require_fx(name)
    model = small(name).eval()
    fx = FeatureGraphNet(model, out_indices=tuple(range(len(model.feature_info)))).eval()
    x = images(name)
    with torch.no_grad():
        levels = fx(x)
        maps = model.forward_intermediates(x, indices=len(levels), intermediates_only=True)
    assert len(levels) == len(maps) == len(fx.feature_info.channels())
    for level, expected in zip(levels, maps):
        torch.testing.assert_close(level, expected if level.dim() == 4 else expected.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("name", TIMM_CHECKED)
def test_checkpoint_path_loads_weights_of_another_size(name, tmp_path, caplog):
    """timm.create_model(name, checkpoint_path=...) takes an export made at another input size: the position
    embedding is resampled to the model's grid (and said so), every other weight loads as it is."""
    import safetensors.torch
    trained = small(name)  # 64 pixels: a 4 x 4 grid
    safetensors.torch.save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    with caplog.at_level("INFO", logger="dmjd_encoders"):
        model = timm.create_model(name, checkpoint_path=str(tmp_path / "model.safetensors"))  # 224: 14 x 14
    assert "resampled pos_embed from the checkpoint's 4 x 4 grid to this model's 14 x 14" in caplog.text
    expected = timm.layers.resample_abs_pos_embed(trained.pos_embed.detach(), new_size=[14, 14], old_size=[4, 4],
                                                  num_prefix_tokens=0)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    for key, value in trained.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(model.state_dict()[key], value)
    with pytest.raises(RuntimeError, match="size mismatch"):  # another width is another architecture, still an error
        timm.create_model(name, checkpoint_path=str(tmp_path / "model.safetensors"),
                          embed_dim=(32, 48, 128) if name.startswith("convvit") else 128)
