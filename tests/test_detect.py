"""main_detect.py and engine_detect.py end to end on a tiny COCO-format set made from Fashion-MNIST canvases: train,
evaluate (COCO's box and mask AP), a shorter last round, exact resume after a stop signal, --eval, and the flags."""
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
    evaluated = tmp_path / "eval"
    run(detect_cmd(det_data, evaluated, "--eval", "--resume", str(straight / "checkpoint-last.pth")))
    assert read_log(evaluated)[-1]["test_bbox_AP"] == pytest.approx(log[-1]["test_bbox_AP"])


@pytest.mark.parametrize("flags, message", [
    (["--scale_range", "2", "1"], "--scale_range must be LOW HIGH with LOW <= HIGH"),
    (["--warmup_length", "2"], "--warmup_length must be in [0, 1], got 2.0"),
    (["--eval"], "--eval needs --resume"),
    (["--batch_size", "1"], "--batch_size 1 x 1 processes gives BatchNorm one image per step"),
    (["--model", "convvit_base_patch61"], "did you mean convvit_base_patch16"),
])
def test_bad_flags_fail_early_naming_the_flag(flags, message):
    import main_detect
    args = main_detect.get_args_parser().parse_args(flags)
    with pytest.raises(SystemExit, match=re.escape(message)):
        as_script(main_detect.validate_args, args)


def test_the_default_recipe_is_convmae_bs_25_epoch_coco_config():
    import main_detect
    from engine_detect import resolve_config
    cfg, line = resolve_config(main_detect.get_args_parser().parse_args(["--device", "cpu"]))
    assert line == "lr = blr 0.00064 x 4 images / 256 = 1e-05"  # 8e-5 at the recipe's 8 x 4 images
    assert (cfg.iters, cfg.eval_interval, cfg.schedule.rounds, cfg.input_size) == (92187, 3688, 25, 1024)
    assert (cfg.weight_decay, cfg.betas, cfg.drop_path, cfg.scale_range) == (0.1, [0.9, 0.999], 0.1, [0.1, 2.0])
    assert (cfg.window_size, cfg.global_blocks, cfg.rel_pos_bias, cfg.layer_scale) == (16, [0, 3, 6, 10], True, None)
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
