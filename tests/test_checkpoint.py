"""Encoder weights people can share: the export in timm's hub layout, every way of loading it, MAE's and timm's ViT
layout, and checkpoints written before the ViT was timm's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import dmjd_encoders  # noqa: F401  (registers the encoders)
import models_dmjd  # noqa: F401
from export_encoder import export_encoder
from dmjd_encoders.checkpoint import load_state_dict_strict, save_checkpoint
from dmjd_encoders.pretrained import architecture_kwargs, check_encoder_loaded, load_pretrained

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("dmjd_convit_tiny_patch16_dec1_hog", "convvit_tiny_patch16"),
         ("dmjd_vit_tiny_patch16_dec1_hog", "vit_test_patch16_gap_sincos")]


def pretraining_checkpoint(path, name, channels_last=False, **kwargs):
    """A DMJD pre-training checkpoint whose weights are away from any fresh initialisation."""
    torch.manual_seed(1)
    model = timm.create_model(name, img_size=64, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if channels_last:  # as main_pretrain.py trains on GPUs: conv weights in channels-last memory
        model = model.to(memory_format=torch.channels_last)
    save_checkpoint({"model": model.state_dict(), "epoch": 0, "args": {"model": name, "input_size": 64}}, str(path))
    return model


def encoder_features(dmjd, x):
    """What the exported encoder must compute: the pre-training encoder without its pre-training-only fusion."""
    encoder = dmjd.encoder.eval()
    if hasattr(encoder, "fuse_stages"):
        encoder.fuse_stages = False
    with torch.no_grad():
        return encoder.forward_features(x)


@pytest.mark.parametrize("dmjd, encoder", PAIRS)
def test_export_is_timm_hub_layout_that_every_loading_path_reads(tmp_path, dmjd, encoder):
    pre = pretraining_checkpoint(tmp_path / "pre.pth", dmjd, channels_last=True)
    export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "hub"))
    export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "enc.pth"))
    assert sorted(os.listdir(tmp_path / "hub")) == ["README.md", "config.json", "model.safetensors"]  # + model card
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == encoder and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["model_args"]["fc_norm"] is False
    tensors = safetensors.torch.load_file(tmp_path / "hub" / "model.safetensors")
    assert not any(k.startswith(("decoder", "visible", "mask_token", "stage", "encoder.")) for k in tensors)
    assert set(tensors) == {k for k in pre.encoder.state_dict() if not k.startswith("stage")}  # no fusion layers

    x = torch.randn(2, 3, 64, 64)
    expected = encoder_features(pre, x)
    hub = str(tmp_path / "hub")
    loaded = {
        "local-dir": timm.create_model(f"local-dir:{hub}", pretrained=True),
        "file .safetensors": timm.create_model(encoder, img_size=64, pretrained=True,
                                               pretrained_cfg_overlay=dict(file=f"{hub}/model.safetensors")),
        "file .pth export": timm.create_model(encoder, img_size=64, pretrained=True,
                                              pretrained_cfg_overlay=dict(file=str(tmp_path / "enc.pth"))),
        "file pre-training .pth": timm.create_model(encoder, img_size=64, pretrained=True,
                                                    pretrained_cfg_overlay=dict(file=str(tmp_path / "pre.pth"))),
        "checkpoint_path": timm.create_model(encoder, img_size=64, checkpoint_path=f"{hub}/model.safetensors"),
    }
    for source in (hub, f"{hub}/model.safetensors"):
        model = timm.create_model(encoder, img_size=64)
        missing, unexpected = load_pretrained(model, source)
        assert missing == [] and unexpected == []
        loaded[f"load_pretrained {source}"] = model
    for how, model in loaded.items():
        with torch.no_grad():
            torch.testing.assert_close(model.eval().forward_features(x), expected, msg=lambda m: f"{how}: {m}")


def test_export_of_a_fine_tuned_classifier_keeps_its_head(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("convvit_tiny_patch16", img_size=64, num_classes=5, fc_norm=True).eval()
    save_checkpoint({"model": model.state_dict(), "args": {"model": "convvit_tiny_patch16", "input_size": 64}},
                    str(tmp_path / "ft.pth"))
    export_encoder(str(tmp_path / "ft.pth"), str(tmp_path / "hub"))
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["num_classes"] == 5 and config["model_args"]["fc_norm"] is True
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    # the encoder layout cannot take it: the error says how to build a model that can
    with pytest.raises(RuntimeError, match="fc_norm=True"):
        timm.create_model("convvit_tiny_patch16", img_size=64, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "hub" / "model.safetensors")))


def test_export_command_line(tmp_path):
    pretraining_checkpoint(tmp_path / "pre.pth", PAIRS[0][0], vis_target="ema")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "export_encoder.py"), str(tmp_path / "pre.pth"), str(tmp_path / "hub"),
                           "--key", "model"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and (tmp_path / "hub" / "model.safetensors").is_file()


def test_fresh_parts_are_named_and_the_pretrained_norm_is_dropped_for_fc_norm(tmp_path, capsys):
    pretraining_checkpoint(tmp_path / "pre.pth", PAIRS[0][0])
    model = timm.create_model("convvit_tiny_patch16", img_size=96, num_classes=7, fc_norm=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "pre.pth")))
    out = capsys.readouterr().out
    assert "new (not in the weights): ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']" in out
    assert "norm.weight" in out and "resampled pos_embed from the checkpoint's 4 x 4 grid to this model's 6 x 6" in out
    assert model.pos_embed.shape == (1, 36, 64)


def mae_layout_vit(path, **kwargs):
    """A randomly initialised timm ViT saved as MAE releases its encoders: {"model": state dict} with `cls_token` and
    a position embedding for it."""
    torch.manual_seed(0)
    reference = timm.create_model(**kwargs).eval()
    with torch.no_grad():
        reference.pos_embed.normal_(std=0.02)
        reference.cls_token.normal_(std=0.02)
    torch.save({"model": reference.state_dict()}, path)
    return reference


def test_mae_layout_vit_base_loads_with_its_class_token_and_equals_timm(tmp_path):
    reference = mae_layout_vit(tmp_path / "mae.pth", model_name="vit_base_patch16_224")
    assert reference.pos_embed.shape == (1, 197, 768)
    layout = architecture_kwargs(str(tmp_path / "mae.pth"))
    assert layout == {"class_token": True}
    ours_encoder = timm.create_model("vit_base_patch16_gap_sincos", **layout).eval()
    assert load_pretrained(ours_encoder, str(tmp_path / "mae.pth")) == ([], [])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = ours_encoder.forward_features(x)
        torch.testing.assert_close(tokens, reference.forward_features(x), rtol=0, atol=0)
        # pooling over the patch tokens only, as MAE's fine-tuning and probing
        torch.testing.assert_close(ours_encoder(x), tokens[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match="class_token=True"):
        load_pretrained(timm.create_model("vit_base_patch16_gap_sincos", img_size=32), str(tmp_path / "mae.pth"))


def test_mae_layout_fine_tunes_and_initialises_dmjd_pretraining(tmp_path):
    reference = mae_layout_vit(tmp_path / "mae.pth", model_name="vit_tiny_patch16_224", img_size=64, embed_dim=64,
                               depth=2, num_heads=2, mlp_ratio=2.0)
    fine_tuning = timm.create_model("vit_test_patch16_gap_sincos", img_size=64, num_classes=3, fc_norm=True,
                                    **architecture_kwargs(str(tmp_path / "mae.pth")))
    missing, unexpected = load_pretrained(fine_tuning, str(tmp_path / "mae.pth"))
    check_encoder_loaded(missing, unexpected, "mae.pth")  # MAE's fine-tuning: fresh fc_norm and head
    assert sorted(unexpected) == ["norm.bias", "norm.weight"]
    model = timm.create_model("dmjd_vit_tiny_patch16_dec1_hog", img_size=64, vis_target="ema",
                              **architecture_kwargs(str(tmp_path / "mae.pth")))
    missing, unexpected = load_pretrained(model.encoder, str(tmp_path / "mae.pth"))
    assert missing == [] and unexpected == []
    torch.testing.assert_close(model.encoder.cls_token, reference.cls_token)
    teacher = models_dmjd.EMATeacher(model.encoder)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    loss, parts = model(images, teacher=teacher)
    loss.backward()
    assert torch.isfinite(loss) and parts["loss_vis"] > 0
    assert model.encoder.cls_token.grad is not None  # the class token takes part in the masked pass


def legacy_vit_state(state):
    """A state dict as the ViT wrote it before it was timm's VisionTransformer: its patch embedding was the conv."""
    return {k.replace("patch_embed.proj.", "patch_embed."): v for k, v in state.items()}


def test_vit_checkpoints_written_before_timm_layout_still_load(tmp_path):
    torch.manual_seed(0)
    dmjd = timm.create_model("dmjd_vit_tiny_patch16_dec1_hog", img_size=64)
    old = legacy_vit_state(dmjd.state_dict())
    assert "encoder.patch_embed.weight" in old
    resumed = timm.create_model("dmjd_vit_tiny_patch16_dec1_hog", img_size=64)
    load_state_dict_strict(resumed, old)  # main_pretrain.py --resume, visualize.py
    torch.testing.assert_close(resumed.encoder.patch_embed.proj.weight, dmjd.encoder.patch_embed.proj.weight)
    teacher = models_dmjd.EMATeacher(resumed.encoder)
    load_state_dict_strict(teacher, legacy_vit_state(models_dmjd.EMATeacher(dmjd.encoder).state_dict()), "teacher")

    save_checkpoint({"model": old, "args": {"input_size": 64}}, str(tmp_path / "old.pth"))
    with pytest.warns(UserWarning, match="vit_base_patch16_gap_sincos"):  # the former name, too
        classifier = timm.create_model("vit_base_patch16", img_size=64, embed_dim=64, depth=2, num_heads=2,
                                       mlp_ratio=2.0, num_classes=3, fc_norm=True)
    missing, unexpected = load_pretrained(classifier, str(tmp_path / "old.pth"))
    check_encoder_loaded(missing, unexpected, "old.pth")
    fine_tuned = legacy_vit_state(classifier.state_dict())
    again = timm.create_model("vit_test_patch16_gap_sincos", img_size=64, num_classes=3, fc_norm=True)
    load_state_dict_strict(again, fine_tuned)  # main_finetune.py --resume / --eval
    torch.save({"model": fine_tuned}, tmp_path / "ft_old.pth")
    timm.create_model("vit_test_patch16_gap_sincos", img_size=64, num_classes=3, fc_norm=True,
                      checkpoint_path=str(tmp_path / "ft_old.pth"))


class _NotAWeight:
    """A class a crafted checkpoint could carry: weights_only=True never builds it."""


@pytest.mark.parametrize("content, reason", [
    (b"", "cannot be read as a checkpoint"),
    (b"garbage, not a zip file", "cannot be read as a checkpoint"),
    (None, "cannot be read as a checkpoint: it holds objects other than tensors and plain values"),
])
def test_bad_finetune_files_are_named_without_advice_to_load_unsafely(tmp_path, content, reason):
    from dmjd_encoders.pretrained import PretrainedWeightsError, load_encoder
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save({"model": {}, "extra": _NotAWeight()}, path)
    else:
        path.write_bytes(content)
    model = timm.create_model("convvit_tiny_patch16", img_size=64)
    with pytest.raises(PretrainedWeightsError, match=rf"--finetune {path} {reason}") as stop:
        load_encoder(model, str(path))
    assert "weights_only=False" not in str(stop.value) and "weights_only set to False" not in str(stop.value)


def test_a_resaved_checkpoint_gets_a_new_checksum_and_a_changed_value_is_found(tmp_path):
    from dmjd_encoders.checkpoint import CheckpointError, load_checkpoint
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, str(tmp_path / "a.pth"))
    ckpt = torch.load(tmp_path / "a.pth", weights_only=True)
    ckpt["epoch"] = 2
    torch.save(ckpt, tmp_path / "edited.pth")  # edited without a new checksum
    with pytest.raises(CheckpointError, match="edited.pth is damaged"):
        load_checkpoint(str(tmp_path / "edited.pth"))
    save_checkpoint(ckpt, str(tmp_path / "resaved.pth"))
    assert load_checkpoint(str(tmp_path / "resaved.pth"))["epoch"] == 2


def test_a_hub_export_of_another_architecture_is_refused_naming_both(tmp_path):
    from dmjd_encoders.pretrained import ArchitectureMismatch
    torch.manual_seed(0)
    model = timm.create_model("convvit_tiny_patch16", img_size=64)
    save_checkpoint({"model": model.state_dict(), "args": {"model": "convvit_tiny_patch16", "input_size": 64}},
                    str(tmp_path / "enc.pth"))
    export_encoder(str(tmp_path / "enc.pth"), str(tmp_path / "hub"))
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    config["architecture"] = "convvit_small_patch16"  # weights that fit, a folder that says they are another model's
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureMismatch, match=rf"{tmp_path / 'hub'} is an export of convvit_small_patch16 \(its "
                                                   r"config.json\), not of this model's convvit_tiny_patch16"):
        load_pretrained(timm.create_model("convvit_tiny_patch16", img_size=64), str(tmp_path / "hub"))


def test_random_bytes_and_legacy_pickles_are_named_for_what_they_are(tmp_path):
    from dmjd_encoders.checkpoint import CheckpointError, load_checkpoint
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 8)
    for mmap in (False, True):  # a look at the keys (resume's) as well as a whole load
        with pytest.raises(CheckpointError, match="it is not a PyTorch checkpoint: neither torch.save's zip format "
                                                  "nor a pickle") as err:
            load_checkpoint(str(tmp_path / "random.pth"), mmap=mmap)
        assert "mmap" not in str(err.value)
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)  # PyTorch's format before 1.6
    assert load_checkpoint(str(tmp_path / "legacy.pth"), mmap=True)["epoch"] == 3


def test_a_full_disk_inside_torch_save_is_named_as_such(tmp_path, monkeypatch):
    import builtins
    import errno

    from dmjd_encoders.checkpoint import save_checkpoint as save
    save({"epoch": 1}, str(tmp_path / "c.pth"))
    real_open = builtins.open

    class FullDisk:
        """A file on a device that fills up after 300 bytes."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 300:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: FullDisk(real_open(path, mode, *a, **k))
                        if "w" in mode else real_open(path, mode, *a, **k))
    with pytest.raises(OSError, match=rf"no space left on the device of {tmp_path} \(\d+ MiB free\) while writing "
                                      rf"{tmp_path / 'c.pth'}; the previous file is kept") as err:
        save({"epoch": 2, "model": {"w": torch.randn(1000)}}, str(tmp_path / "c.pth"))
    assert "enforce fail" not in str(err.value) and "unexpected pos" not in str(err.value)
    monkeypatch.undo()
    assert torch.load(tmp_path / "c.pth", weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_load_notes_are_log_records_that_a_caller_can_silence_or_redirect(tmp_path, capsys, caplog):
    """The package logs its load notes (logger dmjd_encoders.*, INFO); the scripts and these tests print them
    (util.misc.print_library_notes), and a caller sets the level or adds a handler as with any library."""
    import logging

    from helpers import encoder_checkpoint
    encoder_checkpoint(tmp_path / "ft.pth", "convvit_tiny_patch16")
    note = "resampled pos_embed from the checkpoint's 4 x 4 grid to this model's 6 x 6"
    with caplog.at_level(logging.INFO, logger="dmjd_encoders"):
        load_pretrained(timm.create_model("convvit_tiny_patch16", img_size=96), str(tmp_path / "ft.pth"))
    assert [r.name for r in caplog.records if note in r.getMessage()] == ["dmjd_encoders.checkpoint"]
    assert note in capsys.readouterr().out
    logger = logging.getLogger("dmjd_encoders")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        load_pretrained(timm.create_model("convvit_tiny_patch16", img_size=96), str(tmp_path / "ft.pth"))
    finally:
        logger.setLevel(level)
    assert note not in capsys.readouterr().out
