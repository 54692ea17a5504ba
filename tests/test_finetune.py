"""Fine-tuning and linear probing: checkpoint loading, layer decay, the probe, and both scripts end to end."""
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

import models_convvit  # noqa: F401
import models_dmjd  # noqa: F401
from engine_linprobe import lars_param_groups, resumed_probe_features
from main_linprobe import get_args_parser as linprobe_args_parser
from dmjd_encoders.models_convvit import LinearProbe
from export_encoder import export_encoder
from helpers import as_script, pretrain_checkpoint, run_script, script_env, stop_with_signal
from dmjd_encoders.checkpoint import save_checkpoint
from dmjd_encoders.pretrained import check_encoder_loaded, load_pretrained
from dmjd_encoders.models_convvit import check_classifier_name

ROOT = Path(__file__).resolve().parents[1]


def released_style(dmjd_state):
    """Our pre-training state dict renamed to the authors' release: no `encoder.` prefix, `proj_embed` and
    `predictor.0` for the visible branch; the decoder keys already match."""
    out = {}
    for k, v in dmjd_state.items():
        k = k.removeprefix("encoder.")
        k = k.replace("visible_branch.projector.", "proj_embed.").replace("visible_branch.predictor.", "predictor.0.")
        out[k] = v
    return out


@pytest.mark.parametrize("classifier, dmjd", [("convvit_tiny_patch16", "dmjd_convit_tiny_patch16_dec1_hog"),
                                              ("vit_test_patch16_gap_sincos", "dmjd_vit_tiny_patch16_dec1_hog")])
def test_pretraining_checkpoint_loads_every_encoder_weight(tmp_path, classifier, dmjd):
    pretrained = pretrain_checkpoint(tmp_path / "pre.pth", dmjd)
    model = timm.create_model(classifier, img_size=64, num_classes=5, fc_norm=True)  # as main_finetune.py builds it
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model.forward_features(x)
    missing, unexpected = load_pretrained(model, str(tmp_path / "pre.pth"))
    check_encoder_loaded(missing, unexpected, "pre.pth")
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(unexpected) == ["norm.bias", "norm.weight"]  # global pooling uses fc_norm instead
    state = model.state_dict()
    for k, v in pretrained.encoder.state_dict().items():
        if k in state:
            assert torch.equal(state[k], v), k
    with torch.no_grad():
        assert not torch.allclose(model.forward_features(x), before)


def test_released_checkpoint_key_names_load_completely(tmp_path):
    pretrained = pretrain_checkpoint(tmp_path / "ours.pth")
    released = released_style(pretrained.state_dict())
    assert {"patch_embed1.proj.weight", "patch_embed4.weight", "blocks1.0.attn.weight", "blocks3.0.attn.qkv.weight",
            "stage1_output_decode.weight", "proj_embed.0.weight", "predictor.0.weight", "decoder_pred.weight",
            "mask_token", "norm.weight"} <= set(released)
    torch.save({"model": released, "epoch": 399}, tmp_path / "released.pth")
    encoder = timm.create_model("convvit_tiny_patch16", img_size=64)
    missing, unexpected = load_pretrained(encoder, str(tmp_path / "released.pth"))
    assert missing == [] and unexpected == []
    for k, v in pretrained.encoder.state_dict().items():
        if not k.startswith("stage"):
            assert torch.equal(encoder.state_dict()[k], v), k


def test_encoder_names_match_the_released_convvit_base():
    """Every encoder key of the released ConViT-B (from its module structure) exists here with the same shape."""
    expected = {"pos_embed": (1, 196, 768), "patch_embed4.weight": (768, 768), "norm.weight": (768,),
                "stage1_output_decode.weight": (768, 256, 4, 4), "stage2_output_decode.weight": (768, 384, 2, 2)}
    for i, (dim, cin, k) in enumerate([(256, 3, 4), (384, 256, 2), (768, 384, 2)], start=1):
        expected[f"patch_embed{i}.proj.weight"] = (dim, cin, k, k)
        expected[f"patch_embed{i}.norm.weight"] = (dim,)
    for stage, dim in ((1, 256), (2, 384)):
        for b in range(2):
            pre = f"blocks{stage}.{b}."
            expected.update({pre + "norm1.weight": (dim,), pre + "conv1.weight": (dim, dim, 1, 1),
                             pre + "attn.weight": (dim, 1, 5, 5), pre + "conv2.weight": (dim, dim, 1, 1),
                             pre + "norm2.weight": (dim,), pre + "mlp.fc1.weight": (8 * dim, dim, 1, 1),
                             pre + "mlp.fc2.weight": (dim, 8 * dim, 1, 1)})
    for b in range(11):
        pre = f"blocks3.{b}."
        expected.update({pre + "norm1.weight": (768,), pre + "attn.qkv.weight": (2304, 768),
                         pre + "attn.qkv.bias": (2304,), pre + "attn.proj.weight": (768, 768),
                         pre + "norm2.weight": (768,), pre + "mlp.fc1.weight": (3072, 768),
                         pre + "mlp.fc2.weight": (768, 3072)})
    state = timm.create_model("dmjd_convit_base_patch16_dec8_hog").encoder.state_dict()
    for k, shape in expected.items():
        assert k in state and tuple(state[k].shape) == shape, k
    # the released pre-training model keeps a single learned mask token and an 8-block, 512-wide decoder
    model_state = timm.create_model("dmjd_convit_base_patch16_dec8_hog").state_dict()
    assert tuple(model_state["decoder_blocks.7.mlp.fc1.weight"].shape) == (4096, 512)


def test_missing_encoder_weights_fail_with_the_keys(tmp_path):
    pretrain_checkpoint(tmp_path / "pre.pth")
    state = torch.load(tmp_path / "pre.pth", weights_only=True)
    del state["model"]["encoder.blocks3.0.attn.qkv.weight"]
    save_checkpoint(state, str(tmp_path / "broken.pth"))
    model = timm.create_model("convvit_tiny_patch16", img_size=64, num_classes=5)
    missing, unexpected = load_pretrained(model, str(tmp_path / "broken.pth"))
    with pytest.raises(RuntimeError, match="blocks3.0.attn.qkv.weight"):
        check_encoder_loaded(missing, unexpected, "broken.pth")
    other = timm.create_model("vit_test_patch16_gap_sincos", img_size=64, num_classes=5)
    missing, unexpected = load_pretrained(other, str(tmp_path / "pre.pth"))
    with pytest.raises(RuntimeError, match="lacks"):
        check_encoder_loaded(missing, unexpected, "pre.pth")


def test_position_embedding_is_resampled_and_teacher_can_be_loaded(tmp_path):
    pre = pretrain_checkpoint(tmp_path / "pre.pth", vis_target="ema")
    teacher = models_dmjd.EMATeacher(pre.encoder)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    ckpt = torch.load(tmp_path / "pre.pth", weights_only=True)
    ckpt["teacher"] = teacher.state_dict()
    save_checkpoint(ckpt, str(tmp_path / "pre.pth"))
    model = timm.create_model("convvit_tiny_patch16", img_size=96, num_classes=5)
    missing, _ = load_pretrained(model, str(tmp_path / "pre.pth"), key="teacher")
    check_encoder_loaded(missing, [], "pre.pth")
    assert model.pos_embed.shape == (1, 36, 64)
    torch.testing.assert_close(model.patch_embed4.weight, teacher.encoder.patch_embed4.weight)


def test_encoder_only_export_loads(tmp_path):
    pretrain_checkpoint(tmp_path / "pre.pth")
    export_encoder(str(tmp_path / "pre.pth"), str(tmp_path / "enc.pth"))
    exported = torch.load(tmp_path / "enc.pth", weights_only=True)["model"]
    assert not any(k.startswith(("decoder", "visible", "mask_token", "stage")) for k in exported)
    encoder = timm.create_model("convvit_tiny_patch16", img_size=64)
    missing, unexpected = load_pretrained(encoder, str(tmp_path / "enc.pth"))
    assert missing == [] and unexpected == []


def test_layer_decay_groups_follow_the_convvit_recipe():
    # as main_finetune.py builds it; 1 + 1 conv blocks, 2 blocks
    model = timm.create_model("convvit_tiny_patch16", img_size=64, num_classes=5, fc_norm=True)
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.65)
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert set(scale_of) == set(names.values())
    depth = 2
    for name, (scale, wd) in scale_of.items():
        if name.startswith(("patch_embed", "pos_embed", "blocks1.", "blocks2.")):
            layer = 0
        elif name.startswith("blocks3."):
            layer = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            layer = depth + 1
        assert scale == pytest.approx(0.65 ** (depth + 1 - layer)), name
        param = dict(model.named_parameters())[name]
        assert wd == (0.0 if param.ndim == 1 or name == "pos_embed" else 0.05), name


def test_linear_probe_trains_only_the_head():
    encoder = timm.create_model("convvit_tiny_patch16", img_size=64)
    probe = LinearProbe(encoder, 3)
    frozen = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head = {k: v.clone() for k, v in probe.head.state_dict().items()}
    optimizer = timm.optim.Lars(lars_param_groups(probe.head, 0.0), lr=0.5, momentum=0.9)
    probe.train()
    assert not probe.encoder.training and probe.head.training
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(probe(torch.randn(8, 3, 64, 64)), torch.randint(0, 3, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, frozen[k]) for k, v in probe.encoder.state_dict().items())
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    for k in ("1.weight", "1.bias", "0.running_mean", "0.running_var"):  # every part that should learn did
        assert not torch.equal(probe.head.state_dict()[k], head[k]), k


@pytest.mark.parametrize("classifier, dmjd", [("convvit_tiny_patch16", "dmjd_convit_tiny_patch16_dec1_hog"),
                                              ("vit_test_patch16_gap_sincos", "dmjd_vit_tiny_patch16_dec1_hog")])
def test_probe_features_are_the_release_formula(tmp_path, classifier, dmjd):
    """The release's `--global_pool` probe: the mean of the tokens before the pre-trained final norm, a fresh
    LayerNorm (weight 1, bias 0), BatchNorm without affine (eps 1e-6), then the linear head, on the same weights."""
    pretrain_checkpoint(tmp_path / "pre.pth", dmjd)
    probes = {}
    for features in ("pool_then_fresh_norm", "final_norm_then_pool"):
        encoder = timm.create_model(classifier, img_size=64)
        check_encoder_loaded(*load_pretrained(encoder, str(tmp_path / "pre.pth")), "pre.pth", allowed_missing=())
        probes[features] = LinearProbe(encoder, 3, features)
        with torch.no_grad():
            probes[features].head[1].weight.normal_()
            probes[features].head[1].bias.normal_()
    encoder = probes["final_norm_then_pool"].encoder
    seen = []
    hook = encoder.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        final_norm_tokens = encoder.forward_features(x)
    hook.remove()
    before_norm = seen[0]  # the last block's tokens, as the final norm receives them
    width = before_norm.shape[-1]
    pooled = {"pool_then_fresh_norm": F.layer_norm(before_norm.mean(dim=1), (width,), eps=1e-6),
              "final_norm_then_pool": final_norm_tokens.mean(dim=1)}
    for features, probe in probes.items():
        linear = probe.head[1]
        for training in (True, False):  # batch statistics, then the running ones that training left
            probe.train(training)
            bn = probe.head[0]
            mean, var = (None, None) if training else (bn.running_mean.clone(), bn.running_var.clone())
            normed = F.batch_norm(pooled[features], mean, var, training=training, eps=1e-6)
            expected = normed @ linear.weight.T + linear.bias
            torch.testing.assert_close(probe(x), expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{features}: {m}")
    assert not torch.allclose(probes["pool_then_fresh_norm"].pooled_features(x),
                              probes["final_norm_then_pool"].pooled_features(x))


def test_a_resumed_probe_keeps_the_features_it_was_trained_on(tmp_path):
    args = linprobe_args_parser().parse_args([])
    assert resumed_probe_features(args, None) == "pool_then_fresh_norm"
    save_checkpoint({"model": {}, "args": {"model": "convvit_base_patch16"}}, str(tmp_path / "before.pth"))
    assert resumed_probe_features(args, str(tmp_path / "before.pth")) == "final_norm_then_pool"
    save_checkpoint({"model": {}, "args": {"probe_features": "pool_then_fresh_norm"}}, str(tmp_path / "now.pth"))
    assert resumed_probe_features(args, str(tmp_path / "now.pth")) == "pool_then_fresh_norm"
    args.probe_features = "final_norm_then_pool"
    with pytest.raises(SystemExit, match="was trained on pool_then_fresh_norm"):
        as_script(resumed_probe_features, args, str(tmp_path / "now.pth"))


def test_former_classifier_names_are_accepted_with_a_note(capsys):
    check_classifier_name("vit_base_patch16")
    assert "now called vit_base_patch16_gap_sincos" in capsys.readouterr().out
    check_classifier_name("convvit_base_patch16")
    with pytest.raises(SystemExit, match="did you mean vit_base_patch16_gap_sincos"):
        as_script(check_classifier_name, "vit_base_patch16_gap")


# ---------------------------------------------------------------------------------------------------------------------
# The scripts end to end.

@pytest.fixture(scope="module")
def cls_data(image_folder):
    root = image_folder("cls", {"train": 8, "val": 3}, classes=("a", "b", "c"))
    pretrain_checkpoint(root / "pre.pth")
    return root


def script_cmd(name, data, out, *extra, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return launcher + [str(ROOT / name), "--model", "convvit_tiny_patch16", "--input_size", "64", "--batch_size", "4",
                       "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu",
                       "--nb_classes", "3", "--print_freq", "2", "--data_path", str(data), "--output_dir", str(out),
                       *extra]


def script(name, data, out, *extra, torchrun=False):
    # run_script also fails on DDP's warning that the conv weights' gradients lost the weights' layout
    return run_script(script_cmd(name, data, out, *extra, torchrun=torchrun)).stdout


@pytest.mark.parametrize("name", ["main_finetune.py", "main_linprobe.py"])
def test_script_trains_evaluates_and_resumes(cls_data, tmp_path, name):
    out = tmp_path / "run"
    stdout = script(name, cls_data, out, "--finetune", str(cls_data / "pre.pth"))
    assert f"loaded {cls_data / 'pre.pth'}: new (not in the checkpoint)" in stdout  # the package's log note, printed
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["test_images"] == 9 for r in log)
    from util.curves import plot_runs
    assert plot_runs([str(out)], str(tmp_path / "curves.png")) == ["loss", "learning rate",
                                                                   "top-1 / top-5 accuracy (%)"]
    assert (out / "checkpoint-best.pth").exists() and (out / "checkpoint-last.pth").exists()
    assert torch.load(out / "checkpoint-best.pth", weights_only=True)["classes"] == ["a", "b", "c"]
    if name == "main_linprobe.py":
        assert "trainable parameters: ['head.1.weight', 'head.1.bias']" in stdout
        ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
        pre = torch.load(cls_data / "pre.pth", weights_only=True)["model"]
        for k, v in ckpt["model"].items():  # the encoder stayed bit-identical to the pre-trained one
            if k.startswith("encoder."):
                assert torch.equal(v, pre[k]), k
    stdout = script(name, cls_data, out, "--epochs", "3", "--allow_flag_changes", "epochs")  # a deliberate change
    assert "continuing at epoch 2" in stdout
    stdout = script(name, cls_data, tmp_path / "eval", "--eval", "--resume", str(out / "checkpoint-best.pth"))
    assert "accuracy of the network on 9 test images" in stdout
    assert f"labels: the 3 classes that the checkpoint {out / 'checkpoint-best.pth'} was trained on" in stdout


def test_killed_finetuning_with_loader_workers_resumes_to_the_same_weights(cls_data, tmp_path):
    """Crops, RandAugment, erasing and mixup are seeded from (seed, epoch, index / step): a resumed run (with new
    loader workers) continues exactly as an uninterrupted one."""
    args = ("--epochs", "3", "--warmup_epochs", "1", "--num_workers", "2", "--mixup", "0.8", "--cutmix", "1.0",
            "--finetune", str(cls_data / "pre.pth"))
    script("main_finetune.py", cls_data, tmp_path / "straight", *args)
    out = tmp_path / "killed"
    cmd = script_cmd("main_finetune.py", cls_data, out, *args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    script("main_finetune.py", cls_data, out, *args)
    a, b = (torch.load(d / "checkpoint-last.pth", weights_only=True) for d in (tmp_path / "straight", out))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    last = [json.loads(line) for line in (tmp_path / "straight" / "log.txt").read_text().splitlines()][-1]
    assert last == [json.loads(line) for line in (out / "log.txt").read_text().splitlines()][-1]


@pytest.mark.parametrize("name", ["main_finetune.py", "main_linprobe.py"])
def test_script_with_torchrun_two_processes(cls_data, tmp_path, name):
    stdout = script(name, cls_data, tmp_path / "ddp", "--epochs", "1", "--batch_size", "2", "--finetune",
                    str(cls_data / "pre.pth"), torchrun=True)
    assert "world size 2" in stdout and "on 9 images" in stdout  # sharded evaluation counts each image once


@pytest.mark.parametrize("name", ["main_finetune.py", "main_linprobe.py"])
def test_a_missing_or_unreadable_finetune_checkpoint_is_a_flag_error(cls_data, tmp_path, name):
    module = importlib.import_module(name.removesuffix(".py"))
    with pytest.raises(SystemExit, match=re.escape("--finetune 'no/such.pth' is neither a checkpoint file nor an "
                                                   "export folder")):
        as_script(module.validate_args, module.get_args_parser().parse_args(["--finetune", "no/such.pth"]))
    # a file that is there but is no checkpoint: read for its layout before the model is built, it ends the script
    # with the flag's name, not a traceback
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    proc = run_script(script_cmd(name, cls_data, tmp_path / "out", "--finetune", str(tmp_path / "notes.pth")),
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: --finetune {tmp_path / 'notes.pth'} cannot be read as a checkpoint" in proc.stderr


def test_finetune_skips_unreadable_files(cls_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(cls_data / "train", data / "train")
    shutil.copytree(cls_data / "val", data / "val")
    (data / "train" / "a" / "empty.png").write_bytes(b"")
    (data / "val" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    cmd = [sys.executable, str(ROOT / "main_finetune.py"), "--model", "convvit_tiny_patch16", "--input_size", "64",
           "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu",
           "--nb_classes", "3", "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    proc = run_script(cmd)
    assert "empty.png" in proc.stderr and "broken.png" in proc.stderr
    assert "on 9 images" in proc.stdout  # the 9 readable validation images are all counted, the broken one is not


def test_every_pretraining_model_names_the_encoder_that_takes_its_weights():
    from models_dmjd import ENCODER_OF
    from dmjd_encoders.pretrained import PRETRAIN_ONLY_PREFIXES
    assert set(ENCODER_OF) == set(timm.list_models("dmjd_*"))
    for name, encoder_name in ENCODER_OF.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            encoder = timm.create_model(name, img_size=64).encoder.state_dict()
            classifier = timm.create_model(encoder_name, img_size=64).state_dict()
        encoder = {k: v for k, v in encoder.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
        assert {k: v.shape for k, v in classifier.items()} == {k: v.shape for k, v in encoder.items()}, name


def test_another_architecture_is_named_with_the_classifier_to_use(tmp_path, capsys):
    from dmjd_encoders.pretrained import PretrainedWeightsError, load_encoder
    pretrain_checkpoint(tmp_path / "mini.pth", "dmjd_convit_mini_patch8_hog", img_size=32)
    model = timm.create_model("convvit_base_patch16", img_size=32, num_classes=10)
    with pytest.raises(PretrainedWeightsError,
                       match=r"'dmjd_convit_mini_patch8_hog': fine-tune or probe it with --model convvit_mini_patch8"):
        load_encoder(model, str(tmp_path / "mini.pth"))
    assert "resampled" not in capsys.readouterr().out  # no note about a step that never happened
    with pytest.raises(PretrainedWeightsError, match="--model convvit_mini_patch8"):
        load_encoder(timm.create_model("vit_test_patch16_gap_sincos", img_size=32, num_classes=10),
                     str(tmp_path / "mini.pth"))
    # same shapes, other names: found by the check of the loaded keys, with the same hint
    pretrain_checkpoint(tmp_path / "vit.pth", "dmjd_vit_tiny_patch16_dec1_hog", img_size=64)
    with pytest.raises(PretrainedWeightsError, match="--model vit_test_patch16_gap_sincos"):
        load_encoder(timm.create_model("convvit_tiny_patch16", img_size=64, num_classes=10), str(tmp_path / "vit.pth"))


def test_resampling_note_names_both_grids(tmp_path, capsys):
    pretrain_checkpoint(tmp_path / "pre.pth")  # 64 px, patch 16: 4 x 4
    load_pretrained(timm.create_model("convvit_tiny_patch16", img_size=96, num_classes=5), str(tmp_path / "pre.pth"))
    assert "resampled pos_embed from the checkpoint's 4 x 4 grid to this model's 6 x 6" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["main_finetune.py", "main_linprobe.py"])
def test_sigusr1_mid_epoch_saves_that_step_and_the_rerun_equals_an_uninterrupted_run(cls_data, tmp_path, name):
    import signal
    # loader workers, under a signal to the whole process group (test_pretrain.py tries the default count)
    args = ("--epochs", "2", "--print_freq", "1", "--finetune", str(cls_data / "pre.pth"), "--num_workers", "2")
    script(name, cls_data, tmp_path / "straight", *args)
    out = tmp_path / "stopped"
    stop_with_signal(script_cmd(name, cls_data, out, *args), script_env(), ROOT, "Epoch [1] [2/6]", signal.SIGUSR1)
    stopped = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert stopped["resume_at"]["epoch"] == 1 and stopped["best_acc1"] > 0  # epoch 0's evaluation is kept
    script(name, cls_data, out, *args)
    a, b = (torch.load(d / "checkpoint-last.pth", weights_only=True) for d in (tmp_path / "straight", out))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    logs = [[json.loads(line) for line in (d / "log.txt").read_text().splitlines()] for d in (tmp_path / "straight", out)]
    assert logs[0] == logs[1]


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation set, checked before the first step: val/ labelled by the training classes.

def classification_data(root, train_classes, val_classes):
    """train/ with 2 images of each of `train_classes`, val/ with one of each of `val_classes`."""
    from helpers import write_image_folder
    write_image_folder(root, {"train": 2}, classes=train_classes)
    return write_image_folder(root, {"val": 1}, classes=val_classes, seed=1)


def classification_config(data, *flags):
    """main_finetune.py's config at test size for `data`, as the script resolves it."""
    import main_finetune
    from engine_finetune import FinetuneConfig
    from training.classification import resolve_classification
    parser = main_finetune.get_args_parser()
    args = parser.parse_args(["--model", "convvit_tiny_patch16", "--input_size", "64", "--batch_size", "2",
                              "--num_workers", "0", "--device", "cpu", "--nb_classes", "3", "--data_path", str(data),
                              "--output_dir", str(data / "out"), *flags])
    return resolve_classification(FinetuneConfig, parser, args)[0]


def one_process_run():
    """What the loaders need of a Run: one process on the CPU."""
    from types import SimpleNamespace
    from training.distributed import DistInfo
    return SimpleNamespace(device=torch.device("cpu"), dist=DistInfo(), world_size=1)


def loaders_of(cfg):
    from training.classification import classification_loaders
    from util.transforms import eval_transform
    return classification_loaders(one_process_run(), cfg, eval_transform(64), eval_transform(64))


def test_a_val_folder_with_fewer_classes_is_scored_against_the_training_labels(tmp_path, capsys):
    data = classification_data(tmp_path, ("bbb", "cat", "coffee"), ("cat", "coffee"))
    _, val, classes = loaders_of(classification_config(data))
    assert classes == ["bbb", "cat", "coffee"]
    (images, targets, _), = list(val)
    assert targets.tolist() == [1, 2]  # val's own folders would have made cat 0 and coffee 1
    assert (f"{data / 'val'} has no images of 1 of the 3 training classes: bbb; its accuracy covers the other 2"
            in capsys.readouterr().out)


def test_a_val_class_unknown_to_training_stops_the_run_at_start(tmp_path):
    from training.errors import RunError
    data = classification_data(tmp_path, ("cat", "coffee"), ("cat", "dog"))
    with pytest.raises(RunError) as stop:
        loaders_of(classification_config(data, "--nb_classes", "2"))
    assert str(stop.value) == (f"{data / 'val'} has a class 'dog' that {data / 'train'} has not: its images would be "
                               f"scored against another class's label")


def test_an_empty_val_folder_stops_the_run_at_start_naming_it(tmp_path):
    from training.errors import RunError
    data = classification_data(tmp_path, ("cat", "coffee"), ())
    (data / "val").mkdir()
    with pytest.raises(RunError, match=re.escape(f"{data / 'val'} holds no image of any of the 2 classes of "
                                                 f"{data / 'train'}")):
        loaders_of(classification_config(data))


def test_eval_labels_val_by_the_classes_its_checkpoint_was_trained_on(tmp_path, capsys):
    from training.errors import RunError
    data = classification_data(tmp_path, ("bbb", "cat", "coffee"), ("cat", "coffee"))
    checkpoint = tmp_path / "trained.pth"
    save_checkpoint({"model": {}, "classes": ["bbb", "cat", "coffee"]}, str(checkpoint))
    _, val, classes = loaders_of(classification_config(data, "--eval", "--resume", str(checkpoint)))
    assert classes == ["bbb", "cat", "coffee"] and [t for _, t in val.dataset.samples] == [1, 2]
    assert f"labels: the 3 classes that the checkpoint {checkpoint} was trained on" in capsys.readouterr().out
    save_checkpoint({"model": {}, "classes": ["cat", "dog"]}, str(checkpoint))
    with pytest.raises(RunError, match=re.escape(f"{data / 'val'} has a class 'coffee' that the checkpoint "
                                                 f"{checkpoint} has not: its images would be scored")):
        loaders_of(classification_config(data, "--eval", "--resume", str(checkpoint)))


def test_eval_of_a_checkpoint_without_classes_takes_vals_own_folders_and_says_so(tmp_path, capsys):
    data = classification_data(tmp_path, ("bbb", "cat", "coffee"), ("cat", "coffee"))
    checkpoint = tmp_path / "older.pth"
    save_checkpoint({"model": {}}, str(checkpoint))
    _, val, classes = loaders_of(classification_config(data, "--eval", "--resume", str(checkpoint)))
    assert classes == ["cat", "coffee"] and [t for _, t in val.dataset.samples] == [0, 1]
    assert (f"{checkpoint} does not store the classes it was trained on: the labels 0..1 of its outputs are taken to "
            f"be {data / 'val'}'s own class folders, sorted" in capsys.readouterr().out)


def test_a_checkpoint_stores_its_training_classes_and_a_resume_on_other_classes_stops(tmp_path):
    from training.classification import ClassificationTask
    from training.errors import RunError
    cfg = classification_config(tmp_path)
    task = ClassificationTask(None, cfg, torch.device("cpu"), classes=["bbb", "cat"])
    assert task.extra_state() == {"classes": ["bbb", "cat"]}
    task.load_extra_state({"classes": ["bbb", "cat"]}, "same.pth")
    task.load_extra_state({}, "older.pth")  # saved before checkpoints kept their classes
    with pytest.raises(RunError, match=re.escape(f"other.pth was trained on other classes (2: bbb, dog) than "
                                                 f"{tmp_path}/train has (2: bbb, cat): its outputs would stand for "
                                                 f"other classes")):
        task.load_extra_state({"classes": ["bbb", "dog"]}, "other.pth")


def test_an_evaluation_that_read_no_image_is_a_run_error_naming_the_folder_not_a_score():
    from types import SimpleNamespace
    from training.classification import ClassificationTask
    from training.errors import RunError
    from training.loop import evaluate
    batches = [(None, None, 2), (None, None, 1)]  # every file of every batch unreadable
    task = ClassificationTask(torch.nn.Identity(), SimpleNamespace(data_path="data", input_size=8), torch.device("cpu"))
    with pytest.raises(RunError) as stop:
        evaluate(task, batches, torch.device("cpu"), 10)
    assert str(stop.value) == ("no image of data/val could be read in this evaluation (3 unreadable files skipped, see "
                               "the warnings above): there is no score to report")


def test_an_evaluation_that_fails_stops_the_run_before_any_checkpoint(tmp_path):
    """The loop (training.loop.fit) evaluates a round before it saves it: a failed evaluation leaves no checkpoint
    and no log line of that round, and the script ends with its message (no traceback)."""
    data = classification_data(tmp_path, ("a", "b"), ("a", "b"))
    for image in (data / "val").rglob("*.png"):
        image.write_bytes(b"")  # readable at start as a file, unreadable when the evaluation decodes it
    import main_finetune
    args = main_finetune.get_args_parser().parse_args([
        "--model", "convvit_tiny_patch16", "--input_size", "64", "--batch_size", "2", "--epochs", "1",
        "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--nb_classes", "2",
        "--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    with pytest.warns(Warning), pytest.raises(SystemExit, match=re.escape(
            f"error: no image of {data / 'val'} could be read in this evaluation (2 unreadable files skipped")):
        main_finetune.main(args)
    out = tmp_path / "out"
    assert not list(out.glob("checkpoint*")) and not list(out.glob(".*.tmp*"))
    assert not (out / "log.txt").exists() or not (out / "log.txt").read_text()

def other_scripts_checkpoint(path, parser):
    """A tiny checkpoint with the flags that `parser`'s script saves (no weights: it is refused before any load)."""
    save_checkpoint({"model": {}, "args": vars(parser.parse_args([])), "epoch": 0}, str(path))
    return str(path)


@pytest.mark.parametrize("name, task", [("main_finetune.py", "fine-tuning"), ("main_linprobe.py", "linear-probing")])
def test_a_segmentation_or_detection_checkpoint_given_to_the_script_is_named_as_such(cls_data, tmp_path, name, task):
    from main_detect import get_args_parser as detection_parser
    from main_segment import get_args_parser as segmentation_parser
    module = importlib.import_module(name.removesuffix(".py"))
    seg = other_scripts_checkpoint(tmp_path / "seg.pth", segmentation_parser())
    det = other_scripts_checkpoint(tmp_path / "det.pth", detection_parser())
    for start, argv, message in (
            ("resume", ["--resume", seg, "--allow_flag_changes", "all"],
             f"error: {seg} is a segmentation checkpoint, from main_segment.py, not a {task} one: resume it with "
             f"main_segment.py"),
            ("eval", ["--eval", "--resume", det],
             f"error: {det} is a detection checkpoint, from main_detect.py, not a {task} one: evaluate it with "
             f"main_detect.py --eval --resume {det}"),
            ("finetune", ["--finetune", seg],
             f"error: --finetune {seg} is a segmentation checkpoint, from main_segment.py: its encoder was trained "
             f"inside the segmentation model")):
        args = module.get_args_parser().parse_args(script_cmd(name, cls_data, tmp_path / start, *argv)[2:])
        with pytest.raises(SystemExit) as stop:
            module.main(args)
        assert str(stop.value).startswith(message), str(stop.value)
    assert not (tmp_path / "finetune").exists()  # --finetune is refused before the run's output folder is made


def test_a_probe_resumed_from_a_fine_tuning_checkpoint_names_it_rather_than_its_features(tmp_path):
    from main_finetune import get_args_parser as finetune_args_parser
    path = other_scripts_checkpoint(tmp_path / "ft.pth", finetune_args_parser())
    args = linprobe_args_parser().parse_args(["--probe_features", "pool_then_fresh_norm", "--resume", path])
    with pytest.raises(SystemExit) as stop:  # before: "--probe_features ..., but ft.pth was trained on ..."
        as_script(resumed_probe_features, args, path)
    assert str(stop.value) == (f"error: {path} is a fine-tuning checkpoint, from main_finetune.py, not a "
                               f"linear-probing one: resume it with main_finetune.py")


@pytest.mark.parametrize("flags, message", [
    (["--aa", "bogus"], "--aa 'bogus' is not an auto-augment policy of timm (Unknown AA policy bogus)"),
    (["--cutmix_minmax", "0.8", "0.2"], "--cutmix_minmax must be MIN MAX with MIN <= MAX, got [0.8, 0.2]"),
])
def test_augmentation_flags_that_timm_would_refuse_inside_the_run_are_named_before_it(flags, message):
    import main_finetune
    with pytest.raises(SystemExit, match=re.escape(message)):
        as_script(main_finetune.validate_args, main_finetune.get_args_parser().parse_args(flags))
    main_finetune.validate_args(main_finetune.get_args_parser().parse_args(["--aa", ""]))  # '': no auto-augment
