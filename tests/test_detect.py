"""main_detect.py and engine_detect.py end to end on a tiny COCO-format set made from Fashion-MNIST canvases: train,
evaluate (COCO's box and mask AP), a shorter last round, exact resume after a stop signal, --eval in batches of any
size and in bf16, the flags and the recipes they resolve, the optimizer's groups, checked evaluation data and the
detector's checkpoints."""
import re
import signal
import sys

import pytest
import torch

from helpers import ROOT, as_script, load, read_log, run_script as run, script_env, stop_with_signal, \
    write_fashion_idx


@pytest.fixture(scope="module")
def det_data(tmp_path_factory):
    from util.demo_det_data import prepare_fashion_mnist_det
    root = tmp_path_factory.mktemp("det")
    write_fashion_idx(root / "idx", train=40, test=10)
    return prepare_fashion_mnist_det(str(root / "data"), sources=[str(root / "idx")], num_train=12, num_val=4,
                                     canvas=64)


# COCO AP points by which a bf16 evaluation of a checkpoint may differ from its fp32 one (DETECT.md)
BF16_TOLERANCE = 1.0


def detect_cmd(data, out, *extra, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return launcher + [str(ROOT / "main_detect.py"), "--model", "convvit_tiny_patch16", "--input_size", "64",
                       "--batch_size", "2", "--fpn_channels", "16", "--rois_per_image", "16", "--window_size", "2",
                       "--global_blocks", "1", "--num_workers", "0", "--device", "cpu", "--print_freq", "1",
                       "--data_path", str(data), "--output_dir", str(out), *extra]


def test_a_run_trains_evaluates_each_interval_and_the_last_and_resumes_exactly_after_a_stop(det_data, tmp_path):
    args = ("--iters", "9", "--eval_interval", "4")
    straight = tmp_path / "straight"
    proc = run(detect_cmd(det_data, straight, *args))
    log = read_log(straight)
    assert [r["iteration"] for r in log] == [4, 8, 9]  # the last interval is shorter
    assert all(r["test_images"] == 4 and "test_bbox_AP" in r and "test_segm_AP" in r for r in log)
    assert "box AP" in proc.stdout and (straight / "coco_results.json").exists()
    assert load(straight / "checkpoint-last.pth")["classes"][0] == "t-shirt_top"  # the file's category names
    # the signal, sent once the first step of the second interval is printed, stops the run within that interval or,
    # if the interval ends first, before the third: either way it resumes to the same weights and log
    out = tmp_path / "stopped"
    rest = stop_with_signal(detect_cmd(det_data, out, *args), script_env(), ROOT, "Iterations 4-8 [1/4]",
                            signal.SIGUSR1, group=False)
    assert "exiting with status 75 (requeue)" in rest
    proc = run(detect_cmd(det_data, out, *args))
    assert "continuing at epoch" in proc.stdout
    a, b = load(straight / "checkpoint-last.pth"), load(out / "checkpoint-last.pth")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert read_log(straight) == read_log(out)
    # evaluated in batches of 3 (the images of 2 batches padded to one square alone): the same scores
    evaluated = tmp_path / "eval"
    run(detect_cmd(det_data, evaluated, "--eval", "--eval_batch_size", "3", "--resume",
                   str(straight / "checkpoint-last.pth")))
    assert read_log(evaluated)[-1]["test_bbox_AP"] == pytest.approx(log[-1]["test_bbox_AP"])
    assert read_log(evaluated)[-1]["test_segm_AP"] == pytest.approx(log[-1]["test_segm_AP"])
    # in bf16 (CUDA's default): boxes decoded and masks pasted in fp32, so only the features' rounding differs
    bf16 = tmp_path / "bf16"
    run(detect_cmd(det_data, bf16, "--eval", "--amp", "bf16", "--resume", str(straight / "checkpoint-last.pth")))
    for name in ("test_bbox_AP", "test_segm_AP", "test_bbox_AP50"):
        assert abs(read_log(bf16)[-1][name] - log[-1][name]) <= BF16_TOLERANCE, name


@pytest.mark.parametrize("flags, message", [
    (["--scale_range", "2", "1"], "--scale_range must be LOW HIGH with LOW <= HIGH"),
    (["--warmup_length", "2"], "--warmup_length must be in [0, 1], got 2.0"),
    (["--eval"], "--eval needs --resume"),
    (["--batch_size", "1"], "--batch_size 1 x 1 processes gives BatchNorm one image per step"),
    (["--model", "convvit_base_patch61"], "did you mean convvit_base_patch16"),
    (["--model", "convvit_tiny_patch16", "--global_blocks", "0", "2"], "--model convvit_tiny_patch16 has "
                                                                        "transformer blocks 0 to 1"),
    (["--window_size", "0", "--global_blocks", "1"], "--global_blocks names the blocks that do not attend in windows"),
    (["--lr_steps", "0.9", "0.5"], "--lr_steps must be increasing"),
    (["--lr_schedule", "step", "--recipe", "convmae"], "--lr_schedule step needs the fractions"),
    (["--lr_steps", "1.5"], "--lr_steps must be in (0, 1)"),
    (["--rel_pos", "global"], "invalid choice: 'global'"),
])
def test_bad_flags_fail_early_naming_the_flag(flags, message, capsys):
    import main_detect
    with pytest.raises(SystemExit) as exit_info:
        as_script(main_detect.validate_args, main_detect.get_args_parser().parse_args(flags))
    assert re.search(re.escape(message), str(exit_info.value) + capsys.readouterr().err)


def test_the_default_recipe_is_convmae_bs_25_epoch_coco_config():
    cfg, line = resolved()
    assert line == "lr = blr 0.00064 x 4 images / 256 = 1e-05"  # 8e-5 at the recipe's 8 x 4 images
    assert (cfg.iters, cfg.eval_interval, cfg.schedule.rounds, cfg.input_size) == (92187, 3688, 25, 1024)
    assert (cfg.weight_decay, cfg.betas, cfg.drop_path, cfg.scale_range) == (0.1, [0.9, 0.999], 0.1, [0.1, 2.0])
    # ConvMAE's ConvViTDet: 16 x 16 windows but in blocks 0, 3, 6, 10; one windowed and one global relative-position
    # table; the position embedding frozen; no layer scale; no layer-wise lr decay
    assert (cfg.window_size, cfg.global_blocks, cfg.rel_pos, cfg.layer_scale) == (16, [0, 3, 6, 10], "shared", None)
    assert (cfg.recipe, cfg.pos_embed, cfg.layer_decay, cfg.lr_schedule) == ("convmae", "frozen", 1.0, "cosine")
    assert cfg.lr_at(0) == pytest.approx(cfg.lr * 0.001) and cfg.lr_at(cfg.iters) == pytest.approx(0.0)
    warm = 0.005 * cfg.iters  # detectron2's warmup multiplies the cosine: at its end, the cosine's value
    assert cfg.lr_at(warm) == pytest.approx(cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.005)).item()))


def test_torchrun_two_processes_evaluate_each_image_once_with_synchronised_batchnorm(det_data, tmp_path):
    """One image per process and step: BatchNorm of the FPN and the heads over both processes; the validation images
    are sharded without padding and their detections gathered: each scored once."""
    out = tmp_path / "ddp"
    proc = run(detect_cmd(det_data, out, "--batch_size", "1", "--iters", "2", "--eval_interval", "2", torchrun=True))
    assert "world size 2" in proc.stdout
    record = read_log(out)[-1]
    assert record["test_images"] == 4 and record["iteration"] == 2
    single = tmp_path / "single"
    run(detect_cmd(det_data, single, "--eval", "--resume", str(out / "checkpoint-last.pth")))
    assert read_log(single)[-1]["test_bbox_AP"] == pytest.approx(record["test_bbox_AP"])  # the same on one process


def resolved(*flags):
    import main_detect
    from engine_detect import resolve_config
    parser = main_detect.get_args_parser()
    return resolve_config(parser.parse_args([*flags, "--device", "cpu"]), parser)


def test_a_vit_takes_vitdets_100_epoch_recipe_and_backbone():
    cfg, line = resolved("--model", "vit_base_patch16_gap_sincos")
    assert line == "lr = blr 0.0004 x 8 images / 256 = 1.25e-05"  # 1e-4 at ViTDet's 64 images
    assert (cfg.batch_size, cfg.accum_iter) == (1, 8)  # 64 images on 8 GPUs, one image a GPU at a time
    assert (cfg.recipe, cfg.iters, cfg.eval_interval, cfg.layer_decay, cfg.drop_path) == ("vitdet", 184375, 5000,
                                                                                          0.7, 0.1)
    assert (cfg.window_size, cfg.global_blocks, cfg.rel_pos, cfg.pos_embed) == (14, [2, 5, 8, 11], "decomposed",
                                                                                "learned")
    # MultiStepParamScheduler: x0.1 from iteration 163889, x0.01 from 177546; 250 warmup iterations from x0.001
    assert cfg.lr_at(0) == pytest.approx(cfg.lr * 0.001) and cfg.lr_at(250) == pytest.approx(cfg.lr)
    assert cfg.lr_at(163888) == pytest.approx(cfg.lr) and cfg.lr_at(163889) == pytest.approx(cfg.lr * 0.1)
    assert cfg.lr_at(177545) == pytest.approx(cfg.lr * 0.1) and cfg.lr_at(177546) == pytest.approx(cfg.lr * 0.01)
    large, _ = resolved("--model", "vit_large_patch16_gap_sincos")
    assert (large.layer_decay, large.drop_path, large.global_blocks) == (0.8, 0.4, [5, 11, 17, 23])  # ViTDet's L
    convvit_l, _ = resolved("--model", "convvit_large_patch16")
    assert (convvit_l.recipe, convvit_l.global_blocks) == ("convmae", [0, 7, 13, 22])  # ConvMAE's, scaled
    given, _ = resolved("--model", "vit_base_patch16_gap_sincos", "--recipe", "convmae", "--iters", "100",
                        "--layer_decay", "0.9", "--window_size", "0")
    assert (given.recipe, given.iters, given.lr_schedule, given.layer_decay) == ("convmae", 100, "cosine", 0.9)
    assert (given.window_size, given.global_blocks) == (0, [])  # no windows: no global blocks to name


def test_the_optimizer_has_each_recipes_decay_and_layer_wise_lr_groups():
    from engine_detect import build_detector, detection_optimizer
    tiny = ("--input_size", "64", "--fpn_channels", "16", "--rois_per_image", "16", "--window_size", "2",
            "--global_blocks", "1")
    cfg, _ = resolved("--model", "vit_test_patch16_gap_sincos", *tiny)
    model = build_detector(cfg, 3)
    groups = detection_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    of = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    encoder = "backbone.body.model."
    # ViTDet's get_vit_lr_decay_rate: 0.7 ** (depth + 1 - layer), layer 0 the embeddings, block i layer i + 1
    assert of[encoder + "pos_embed"] == (pytest.approx(0.7 ** 3), 0.0)
    assert of[encoder + "patch_embed.proj.weight"] == (pytest.approx(0.7 ** 3), 0.1)
    assert of[encoder + "blocks.0.attn.qkv.weight"] == (pytest.approx(0.7 ** 2), 0.1)
    assert of[encoder + "blocks.1.rel_pos.rel_pos_h"] == (pytest.approx(0.7), 0.1)  # ViTDet decays them
    assert of[encoder + "blocks.1.norm1.weight"][1] == 0.0 and of[encoder + "blocks.1.attn.qkv.bias"][1] == 0.1
    assert of[encoder + "pyramid.outputs.0.0.weight"] == (1.0, 0.1)
    assert of["roi_heads.box_head.0.1.weight"] == (1.0, 0.0)  # a LayerNorm of the box head
    cfg, _ = resolved("--model", "convvit_tiny_patch16", *tiny)
    model = build_detector(cfg, 3)
    groups = detection_optimizer(model, cfg).param_groups
    assert {g["lr_scale"] for g in groups} == {1.0}  # ConvMAE's recipe: no layer-wise decay
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert encoder + "rel_pos_tables.global.relative_position_bias_table" in no_decay
    trained = {names[id(p)] for g in groups for p in g["params"]}
    assert encoder + "pos_embed" not in trained  # frozen (ConvMAE's DET): not trained at all
    assert not model.backbone.body.model.pos_embed.requires_grad


def test_an_empty_or_unreadable_validation_set_stops_the_run_before_training(tmp_path):
    import json
    from engine_detect import checked_validation_set
    from training.errors import RunError
    from util.coco import coco_split_paths
    images, annotations = coco_split_paths(str(tmp_path), "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    with open(annotations, "w") as f:
        json.dump(data, f)
    cfg, _ = resolved("--data_path", str(tmp_path), "--input_size", "64")
    with pytest.raises(RunError, match="lists no image: there is nothing to evaluate"):
        checked_validation_set(cfg)
    data["images"] = [{"id": 1, "file_name": "gone.jpg", "height": 8, "width": 8}]
    with open(annotations, "w") as f:
        json.dump(data, f)
    with pytest.raises(RunError, match="none of the 1 validation images .*gone.jpg: not found"):
        checked_validation_set(cfg)


def test_an_evaluation_that_read_no_image_is_never_a_score(tmp_path):
    import json
    from engine_detect import DetectTask
    from training.errors import RunError
    from training.loop import evaluate
    from util.coco import CocoDetection
    with open(tmp_path / "val.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}], "annotations": [],
                   "categories": [{"id": 1, "name": "a"}]}, f)
    cfg, _ = resolved("--input_size", "64", "--output_dir", str(tmp_path))
    task = DetectTask(torch.nn.Identity(), cfg, torch.device("cpu"), CocoDetection(str(tmp_path), str(tmp_path /
                                                                                                      "val.json")))
    # every batch of the evaluation lost its images while loading (each named in a warning)
    with pytest.raises(RunError, match=re.escape(f"no image of {cfg.split_paths('val')[1]} could be read in this "
                                                 f"evaluation (3 unreadable files skipped")):
        evaluate(task, [(None, None, 2), (None, None, 1)], torch.device("cpu"), 1)
    assert not (tmp_path / "coco_results.json").exists()


def test_a_checkpoint_of_the_earlier_detector_is_named_as_such(tmp_path):
    from engine_detect import check_detection_checkpoint
    from training.errors import RunError
    from dmjd_encoders.checkpoint import save_checkpoint
    save_checkpoint({"model": {}, "args": {"model": "convvit_base_patch16", "rois_per_image": 512}},
                    str(tmp_path / "old.pth"))
    with pytest.raises(RunError, match="saved by an earlier main_detect.py.* neither resumed nor evaluated"):
        check_detection_checkpoint(str(tmp_path / "old.pth"))
    save_checkpoint({"model": {}, "args": {"model": "convvit_base_patch16", "rois_per_image": 512,
                                           "recipe": "convmae"}}, str(tmp_path / "new.pth"))
    check_detection_checkpoint(str(tmp_path / "new.pth"))
