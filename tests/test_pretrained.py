"""dmjd_encoders.pretrained: one test for a class token, whatever the checkpoint; one declaration of the weights that
start fresh, by use; the scripts' --finetune failures raised as PretrainedWeightsError, never an exit."""
import pytest
import timm
import torch

import dmjd_encoders  # noqa: F401  (registers the encoders)
from dmjd_encoders import pretrained
from dmjd_encoders.pretrained import (FRESH_KEYS, ArchitectureMismatch, PretrainedWeightsError, architecture_kwargs,
                                      check_encoder_loaded, check_pretrained_flag, has_class_token, load_encoder)
from export_encoder import export_encoder
from dmjd_encoders.checkpoint import save_checkpoint

ENCODER = "vit_test_patch16_gap_sincos"


def tiny_vit(class_token: bool, **kwargs) -> torch.nn.Module:
    return timm.create_model(ENCODER, img_size=32, class_token=class_token, **kwargs)


@pytest.mark.parametrize("class_token", [False, True])
def test_one_detector_finds_the_class_token_of_an_encoder_and_of_a_upernet(class_token):
    from models_upernet import create_upernet
    assert has_class_token(tiny_vit(class_token).state_dict()) is class_token
    segmenter = create_upernet(ENCODER, 4, channels=8, aux_in_index=1, aux_channels=8, img_size=32,
                               class_token=class_token)
    assert has_class_token(segmenter.state_dict()) is class_token
    assert not has_class_token({"pos_embed": torch.zeros(1, 4, 64)})


@pytest.mark.parametrize("class_token", [False, True])
def test_the_layout_of_every_kind_of_checkpoint_comes_from_one_function(tmp_path, class_token):
    from models_upernet import create_upernet
    expected = {"class_token": True} if class_token else {}
    encoder = tiny_vit(class_token).state_dict()
    save_checkpoint({"model": {f"encoder.{k}": v for k, v in encoder.items()}, "args": {"model": ENCODER}},
                    str(tmp_path / "pre.pth"))  # a pre-training checkpoint: the encoder under encoder.
    save_checkpoint({"model": tiny_vit(class_token, num_classes=3, fc_norm=True).state_dict(),
                     "args": {"model": ENCODER, "input_size": 32}}, str(tmp_path / "cls.pth"))
    export_encoder(str(tmp_path / "cls.pth"), str(tmp_path / "export"))
    segmenter = create_upernet(ENCODER, 4, channels=8, aux_in_index=1, aux_channels=8, img_size=32,
                               class_token=class_token)
    save_checkpoint({"model": segmenter.state_dict()}, str(tmp_path / "seg.pth"))
    for name in ("pre.pth", "cls.pth", "export", "seg.pth"):
        assert architecture_kwargs(str(tmp_path / name)) == expected, name
    assert architecture_kwargs(None) == {}


def test_the_weights_that_start_fresh_are_declared_once_by_use():
    assert FRESH_KEYS == {"classifier": ("head.", "fc_norm."), "probe": (),
                          "dense": ("head.", "fc_norm.", "downsample32.", "rel_pos.", "rel_pos_tables.", "ls1.", "ls2.",
                                    "pyramid.")}
    new = ["head.weight", "fc_norm.weight", "downsample32.0.weight"]
    check_encoder_loaded(new, [], "pre.pth", FRESH_KEYS["dense"])
    # the dense options' modules, at any depth of a key
    check_encoder_loaded(["blocks3.0.rel_pos.relative_position_bias_table", "blocks.1.ls2.gamma",
                          "pyramid.up2.weight"], [], "pre.pth", FRESH_KEYS["dense"])
    with pytest.raises(ArchitectureMismatch, match="lacks 1 encoder weights of this model, e.g. blocks.0.ls1.gamma"):
        check_encoder_loaded(["blocks.0.ls1.gamma"], [], "pre.pth", FRESH_KEYS["classifier"])
    check_encoder_loaded(new[:2], [], "pre.pth")  # a classifier's, by default
    with pytest.raises(ArchitectureMismatch, match="lacks 1 encoder weights of this model, e.g. downsample32"):
        check_encoder_loaded(new, [], "pre.pth", FRESH_KEYS["classifier"])
    with pytest.raises(ArchitectureMismatch, match="lacks 2 encoder weights"):
        check_encoder_loaded(new[:2], [], "pre.pth", FRESH_KEYS["probe"])


def test_a_classifier_starts_its_head_fresh_and_a_probe_nothing(tmp_path):
    save_checkpoint({"model": tiny_vit(False).state_dict()}, str(tmp_path / "enc.pth"))
    load_encoder(tiny_vit(False, num_classes=3, fc_norm=True), str(tmp_path / "enc.pth"))
    load_encoder(tiny_vit(False), str(tmp_path / "enc.pth"), allowed_missing=FRESH_KEYS["probe"])
    with pytest.raises(PretrainedWeightsError, match=r"^--finetune .*enc.pth lacks 4 encoder weights"):
        load_encoder(tiny_vit(False, num_classes=3, fc_norm=True), str(tmp_path / "enc.pth"),
                     allowed_missing=FRESH_KEYS["probe"])


def test_a_missing_finetune_path_raises_a_value_error_that_names_the_flag(tmp_path):
    check_pretrained_flag("")  # no --finetune: nothing to check
    with pytest.raises(PretrainedWeightsError) as raised:
        check_pretrained_flag(str(tmp_path / "none.pth"))
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == (f"--finetune {str(tmp_path / 'none.pth')!r} is neither a checkpoint file nor an "
                                 "export folder")


def test_the_old_names_are_the_new_module_s_own():
    import models_convvit
    import util.checkpoint
    for name in ("load_pretrained", "architecture_kwargs", "encoder_state_dict", "fit_encoder_state",
                 "resample_pos_embed", "ArchitectureMismatch", "saved_model", "check_encoder_loaded",
                 "PRETRAIN_ONLY_PREFIXES"):
        assert getattr(util.checkpoint, name) is getattr(pretrained, name), name
    assert models_convvit.checkpoint_filter_fn is pretrained.checkpoint_filter_fn


SCRIPT_ORIGINS = {"main_pretrain": "a pre-training checkpoint, from main_pretrain.py",
                  "main_finetune": "a fine-tuning checkpoint, from main_finetune.py",
                  "main_linprobe": "a linear-probing checkpoint, from main_linprobe.py",
                  "main_segment": "a segmentation checkpoint, from main_segment.py",
                  "main_detect": "a detection checkpoint, from main_detect.py"}


def saved_flags(script: str, *argv: str) -> dict:
    """The flags a checkpoint of `script` saves (its parser's, as its config resolves them: every one a field)."""
    import importlib
    return vars(importlib.import_module(script).get_args_parser().parse_args(list(argv)))


def test_the_script_that_wrote_a_checkpoint_is_told_by_the_flags_it_saved():
    from dmjd_encoders.pretrained import checkpoint_origin
    for script, origin in SCRIPT_ORIGINS.items():
        assert str(checkpoint_origin(saved_flags(script))) == origin
        assert checkpoint_origin(saved_flags(script)).script == script + ".py"
    old_probe = {k: v for k, v in saved_flags("main_linprobe").items() if k != "probe_features"}
    assert str(checkpoint_origin(old_probe)) == SCRIPT_ORIGINS["main_linprobe"]  # saved before --probe_features
    assert checkpoint_origin({"model": ENCODER, "input_size": 32}) is None  # a release, an export: no script's
    assert checkpoint_origin(None) is None


@pytest.mark.parametrize("script, task", [("main_segment", "segmentation"), ("main_detect", "detection")])
def test_finetune_of_a_segmentation_or_detection_checkpoint_is_refused_naming_its_script(tmp_path, script, task):
    path = str(tmp_path / "dense.pth")
    save_checkpoint({"model": {}, "args": saved_flags(script, "--finetune", "pre.pth"), "epoch": 0}, path)
    with pytest.raises(PretrainedWeightsError) as refused:
        check_pretrained_flag(path)
    assert str(refused.value) == (
        f"--finetune {path} is {SCRIPT_ORIGINS[script]}: its encoder was trained inside the {task} model, and "
        f"--finetune takes a pre-trained encoder (a pre-training, fine-tuning or linear-probing checkpoint, or an "
        f"export). Continue that run with {script}.py --resume {path}, or start from the checkpoint it started from, "
        f"--finetune pre.pth")
    for encoder_source in ("main_pretrain", "main_finetune", "main_linprobe"):  # what --finetune takes
        save_checkpoint({"model": {}, "args": saved_flags(encoder_source), "epoch": 0}, path)
        check_pretrained_flag(path)


def test_a_finetune_checkpoint_that_does_not_fit_names_the_script_that_wrote_it(tmp_path):
    path = str(tmp_path / "classifier.pth")
    flags = dict(saved_flags("main_finetune", "--finetune", "pre.pth"), model=ENCODER)  # --global_pool: fc_norm
    save_checkpoint({"model": tiny_vit(False, num_classes=3, fc_norm=True).state_dict(), "args": flags}, path)
    load_encoder(tiny_vit(False, num_classes=3, fc_norm=True), path)  # fine-tuned again: it fits
    with pytest.raises(PretrainedWeightsError) as refused:  # probed: the probe takes the final norm it lacks
        load_encoder(tiny_vit(False), path, allowed_missing=FRESH_KEYS["probe"])
    assert str(refused.value).startswith(f"--finetune {path} lacks 2 encoder weights of this model, e.g. norm.weight")
    assert str(refused.value).endswith(
        "It is a fine-tuning checkpoint, from main_finetune.py; fine-tuned with --global_pool, its final norm gave way "
        "to fc_norm: start from the checkpoint it was fine-tuned from, --finetune pre.pth.")


# ---------------------------------------------------------------------------------------------------------------------
# RGB weights into a model of other input channels (grayscale, multispectral, medical images), by every way timm
# loads weights: timm adapts the first conv (adapt_input_conv) after the filter; checkpoint_path and load_pretrained
# adapt it on load_state_dict.

def hub_cache(tmp_path, repo_id: str, folder) -> str:
    """An offline Hugging Face cache that holds the export `folder` as the hub repository `repo_id`."""
    import shutil
    revision = "0" * 40
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)
    return str(tmp_path / "hub")


def load_by_route(route: str, name: str, tmp_path, **kwargs):
    """The encoder `name` with the weights of tmp_path's export (and its ft.pth) loaded the way `route` says."""
    if route == "overlay file":
        return timm.create_model(name, pretrained=True, img_size=64, **kwargs,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "export" / "model.safetensors")))
    if route == "local-dir":
        return timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True, **kwargs)
    if route == "hf-hub":
        return timm.create_model("hf-hub:me/dmjd-encoder", pretrained=True, **kwargs,
                                 cache_dir=hub_cache(tmp_path, "me/dmjd-encoder", tmp_path / "export"))
    if route == "checkpoint_path":
        return timm.create_model(name, img_size=64, checkpoint_path=str(tmp_path / "export" / "model.safetensors"),
                                 **kwargs)
    model = timm.create_model(name, img_size=64, **kwargs)  # load_pretrained: --finetune's loading
    missing, unexpected = pretrained.load_pretrained(model, str(tmp_path / "ft.pth"))
    assert missing == unexpected == []
    return model


ROUTES = ["overlay file", "local-dir", "hf-hub", "checkpoint_path", "load_pretrained"]


@pytest.mark.parametrize("name", ["convvit_tiny_patch16", ENCODER])
@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_rgb_weights_load_into_any_in_chans_by_every_route(tmp_path, monkeypatch, name, in_chans):
    """in_chans=N loads RGB weights with the first conv adapted as timm adapts it (adapt_input_conv), every other
    weight as trained, through timm's pretrained path (an overlay file, local-dir:, hf-hub:), checkpoint_path and
    load_pretrained."""
    import huggingface_hub
    from helpers import encoder_checkpoint
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub's files from the cache only
    trained = encoder_checkpoint(tmp_path / "ft.pth", name)
    export_encoder(str(tmp_path / "ft.pth"), str(tmp_path / "export"))
    trained_state = trained.state_dict()
    first_conv = trained.FIRST_CONV + ".weight"
    assert first_conv == timm.get_pretrained_cfg(name).first_conv + ".weight"
    expected = timm.models.adapt_input_conv(in_chans, trained_state[first_conv])
    assert expected.shape[1] == in_chans
    for route in ROUTES:
        model = load_by_route(route, name, tmp_path, in_chans=in_chans).eval()
        state = model.state_dict()
        torch.testing.assert_close(state[first_conv], expected, msg=lambda m: f"{route}: {m}")
        for key, value in trained_state.items():
            if key != first_conv:
                torch.testing.assert_close(state[key], value, msg=lambda m: f"{route}, {key}: {m}")
        with torch.no_grad():
            assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, trained.num_features)
        if route == "hf-hub":
            assert model.pretrained_cfg["hf_hub_id"] == "me/dmjd-encoder"


def test_only_rgb_weights_adapt_to_other_input_channels(tmp_path, caplog):
    """Grayscale weights are another model's: into a 4-channel model they fail, naming the channels; the adaptation
    of RGB weights is logged."""
    import safetensors.torch
    gray = timm.create_model("convvit_tiny_patch16", img_size=64, in_chans=1)
    safetensors.torch.save_file(gray.state_dict(), str(tmp_path / "gray.safetensors"))
    timm.create_model("convvit_tiny_patch16", img_size=64, in_chans=1,
                      checkpoint_path=str(tmp_path / "gray.safetensors"))  # the same channels: loads as it is
    with pytest.raises(ArchitectureMismatch, match="takes 1 input channels, the model's 4: only RGB"):
        timm.create_model("convvit_tiny_patch16", img_size=64, in_chans=4,
                          checkpoint_path=str(tmp_path / "gray.safetensors"))
    rgb = timm.create_model("convvit_tiny_patch16", img_size=64).state_dict()
    with caplog.at_level("INFO", logger="dmjd_encoders"):
        gray.load_state_dict(rgb)
    assert "adapted patch_embed1.proj.weight from the weights' 3 input channels to this model's 1" in caplog.text
    rgb["patch_embed1.proj.weight"] = rgb["patch_embed1.proj.weight"][:, :, :2]  # another kernel: not a channel count
    with pytest.raises(ArchitectureMismatch, match="shapes differ for 1 weights"):
        pretrained.fit_encoder_state(rgb, gray)
