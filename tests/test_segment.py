"""main_segment.py and engine_segment.py: the script end to end on a tiny dataset in ADE20K's layout (train,
evaluate, exact resume, --eval, torchrun with 2 processes on gloo), its flag checks, the iteration schedule and
the batches of bad files."""
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import main_segment
from dmjd_encoders.pretrained import architecture_kwargs
from engine_segment import EvalCollate, SegmentTask, full_batch
from main_segment import validate_args


def resolve_config(args):
    """engine_segment's config of main_segment.py's flags, as the script resolves them."""
    import engine_segment
    return engine_segment.resolve_config(args, main_segment.get_args_parser())
from helpers import (as_script, load, pretrain_checkpoint, read_log, run_script as run, script_env, stop_with_signal,
                     write_segmentation_folder)
from util.schedules import poly_lr

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "red", "green", "blue"]


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    """6 training and 3 validation images of other sizes (so evaluation runs one image at a time, by windows), 4
    classes; classes.txt names them; a pre-training checkpoint of the tiny ConViT at 64 px."""
    root = write_segmentation_folder(tmp_path_factory.mktemp("ade"), {
        "training": [(64, 80), (72, 64), (64, 64), (80, 96), (64, 72), (70, 70)],
        "validation": [(64, 96), (48, 64), (80, 64)]})
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    pretrain_checkpoint(root / "pre.pth")
    return root


def segment_cmd(data, out, *extra, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return launcher + [str(ROOT / "main_segment.py"), "--model", "convvit_tiny_patch16", "--input_size", "64",
                       "--nb_classes", "4", "--img_scale", "96", "64", "--batch_size", "2", "--iters", "4",
                       "--eval_interval", "2", "--warmup_iters", "1", "--decoder_channels", "16",
                       "--aux_channels", "8", "--num_workers", "0", "--device", "cpu", "--print_freq", "1",
                       "--data_path", str(data), "--output_dir", str(out), *extra]


def test_script_trains_evaluates_resumes_exactly_and_evaluates_a_checkpoint(seg_data, tmp_path):
    straight = tmp_path / "straight"
    proc = run(segment_cmd(seg_data, straight, "--finetune", str(seg_data / "pre.pth"), "--save_freq", "1"))
    assert "lr = blr 0.0016 x 2 images / 256 = 1.25e-05" in proc.stdout
    assert "loaded " in proc.stdout and "downsample32.0.weight" in proc.stdout  # the stride-32 level is new
    assert "sliding window 64 x 64, stride 42, single scale" in proc.stdout
    log = read_log(straight)
    assert [(r["epoch"], r["iteration"]) for r in log] == [(0, 2), (1, 4)]
    assert all(r["test_images"] == 3 and set(r["test_IoU"]) == set(CLASSES) for r in log)
    assert log[-1]["train_lr"] == pytest.approx(poly_lr(3, 1.25e-5, 4, warmup_iters=1, warmup_ratio=1e-6))
    table = (straight / "per_class_iou.md").read_text()
    assert "# iteration 4" in table and "| blue |" in table and "| aAcc | mIoU | mAcc |" in table
    for name in ("checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-0.pth", "checkpoint-1.pth"):
        assert (straight / name).exists(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(straight)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/loss_decode", "train/loss_aux", "train/lr", "test/mIoU", "test/aAcc"} <= set(tags)
    per_class = {f"test_IoU/{name}" for name, iou in log[-1]["test_IoU"].items() if iou is not None}
    from util.curves import plot_runs
    assert plot_runs([str(straight)], str(tmp_path / "curves.png")) == ["loss", "learning rate", "segmentation (%)",
                                                                        "per-class IoU (%)"]
    assert per_class and per_class <= set(tags)  # per-class IoU, for the classes the validation images show

    # Killed after the first interval: the restarted run (other loader workers) ends exactly where this one did.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-0.pth", resumed / "checkpoint-last.pth")
    proc = run(segment_cmd(seg_data, resumed, "--finetune", str(seg_data / "pre.pth"), "--num_workers", "1"))
    assert "continuing at epoch 1" in proc.stdout
    a, b = load(straight / "checkpoint-last.pth"), load(resumed / "checkpoint-last.pth")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert read_log(resumed)[-1] == log[-1]

    evaluated = tmp_path / "eval"
    proc = run(segment_cmd(seg_data, evaluated, "--eval", "--resume", str(straight / "checkpoint-best.pth")))
    best = max(r["test_mIoU"] for r in log)
    assert f"mIoU {best:.2f}" in proc.stdout
    entry = read_log(evaluated)[-1]
    assert entry["eval"] == str(straight / "checkpoint-best.pth") and entry["test_mIoU"] == pytest.approx(best)
    assert (evaluated / "per_class_iou.md").exists() and not (evaluated / "checkpoint-last.pth").exists()


def test_sigterm_to_the_job_mid_interval_saves_that_step_and_the_rerun_equals_an_uninterrupted_run(seg_data, tmp_path):
    """A scheduler's SIGTERM to every process of the job, loader workers included (test_pretrain.py tries the default
    count)."""
    import signal
    # the signal follows the second interval's first line: 11 steps left in it, room for a loaded machine's delay
    # between the line and the signal
    args = ("--finetune", str(seg_data / "pre.pth"), "--num_workers", "2", "--iters", "24", "--eval_interval", "12")
    straight = tmp_path / "straight"
    run(segment_cmd(seg_data, straight, *args))
    out = tmp_path / "stopped"
    rest = stop_with_signal(segment_cmd(seg_data, out, *args), script_env(), ROOT, "Iterations 12-24 [1/12]",
                            signal.SIGTERM)
    assert "exiting with status 75 (requeue)" in rest
    assert load(out / "checkpoint-last.pth")["resume_at"]["epoch"] == 1
    proc = run(segment_cmd(seg_data, out, *args))
    assert "continuing at epoch 1, iteration" in proc.stdout
    a, b = load(straight / "checkpoint-last.pth"), load(out / "checkpoint-last.pth")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert read_log(straight) == read_log(out)


def test_torchrun_two_processes_one_image_each_with_synchronised_batchnorm(seg_data, tmp_path):
    """One image per process: a process-local BatchNorm fails in the PPM's 1 x 1 pooling branch (one value per
    channel), so the run only passes with BatchNorm over both processes. A broken training image and a broken
    validation pair are skipped, named and counted; each readable validation image is scored once, here with
    multi-scale + flip evaluation."""
    data = tmp_path / "data"
    shutil.copytree(seg_data, data)
    (data / "images" / "training" / "3.png").write_bytes(b"")
    (data / "annotations" / "validation" / "1.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "ddp"
    # 4 iterations of 1 image on each process: the 6 training images are all drawn
    proc = run(segment_cmd(data, out, "--batch_size", "1", "--finetune", str(seg_data / "pre.pth"), "--aug_test",
                           "--aug_test_ratios", "0.75", "1.25", torchrun=True))
    assert "world size 2" in proc.stdout and "scales 0.75, 1.25 and flip" in proc.stdout
    assert "3.png" in proc.stderr and "1.png" in proc.stderr  # both named
    record = read_log(out)[-1]
    assert record["test_images"] == 2 and record["test_bad_images"] == 1
    assert sum(r["train_bad_images"] for r in read_log(out)) >= 1


@pytest.mark.parametrize("flags, message", [
    (["--iters", "10", "--eval_interval", "4"], "--iters 10 must be a multiple of --eval_interval 4"),
    (["--warmup_iters", "20", "--iters", "10", "--eval_interval", "5"], "--warmup_iters must be in [0, --iters 10]"),
    (["--batch_size", "1"], "--batch_size 1 x 1 processes gives BatchNorm one image per step"),
    (["--ignore_index", "100", "--nb_classes", "150"], "--ignore_index 100 is one of the 150 classes"),
    (["--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
    (["--betas", "0.9", "1.0"], "--betas must be in [0, 1)"),
    (["--ratio_range", "2.0", "0.5"], "--ratio_range must be LOW HIGH with 0 < LOW <= HIGH"),
    (["--cat_max_ratio", "0"], "--cat_max_ratio must be in (0, 1]"),
    (["--eval_stride", "600"], "--eval_stride must be in [1, the window 512]"),
    (["--aug_test_ratios", "1.0", "0"], "--aug_test_ratios must be positive"),
    (["--pool_scales", "0", "2"], "--pool_scales must be >= 1"),
    (["--drop_path", "1.0"], "--drop_path must be in [0, 1)"),
    (["--eval"], "--eval needs --resume"),
    (["--finetune", "no/such.pth"], "--finetune 'no/such.pth' is neither a checkpoint file nor an export folder"),
    (["--blr", "0"], "--blr must be > 0"),
    (["--model", "convvit_base_patch61"], "did you mean convvit_base_patch16"),
    (["--simple_pyramid"], "--simple_pyramid is for a plain ViT; --model convvit_base_patch16 has its own"),
    (["--layer_scale", "0"], "--layer_scale must be > 0"),
])
def test_bad_flags_fail_early_naming_the_flag(flags, message):
    args = main_segment.get_args_parser().parse_args(flags)
    with pytest.raises(SystemExit, match=re.escape(message)):
        as_script(validate_args, args)


def test_the_default_recipe_is_convmae_bs_ade20k_config():
    cfg, line = resolve_config(main_segment.get_args_parser().parse_args(["--device", "cpu"]))
    assert line == "lr = blr 0.0016 x 2 images / 256 = 1.25e-05"  # 1e-4 at the recipe's 8 x 2 images
    assert (cfg.iters, cfg.warmup_iters, cfg.eval_interval, cfg.schedule.rounds) == (160000, 1500, 16000, 10)
    assert (cfg.input_size, cfg.img_scale, cfg.ratio_range, cfg.cat_max_ratio) == (512, [2048, 512], [0.5, 2.0], 0.75)
    assert (cfg.eval_mode, cfg.eval_crop_size, cfg.eval_stride) == ("slide", 512, 341)
    assert (cfg.drop_path, cfg.aux_weight, cfg.decoder_channels, cfg.layer_decay) == (0.2, 0.4, 768, 0.75)
    assert (cfg.nb_classes, cfg.reduce_zero_label, cfg.ignore_index, cfg.betas) == (150, True, 255, [0.9, 0.999])
    # ConvMAE's segmentation backbone: use_rel_pos_bias=True, init_values=1.; a ConViT needs no pyramid
    assert (cfg.rel_pos_bias, cfg.layer_scale, cfg.simple_pyramid) == (True, 1.0, False)
    # the lr is a function of the iteration (the loop counts optimizer steps: no intervals in between)
    for iteration in (0, 750, 1500, 80000, 160000):
        assert cfg.lr_at(iteration) == pytest.approx(poly_lr(iteration, cfg.lr, 160000, 1.0, 0.0, 1500, 1e-6))
    schedule = cfg.schedule
    assert (schedule.round_steps, schedule.unit, schedule.label(0)) == (16000, "iteration", "iteration 16000")


def test_a_wrong_layout_fails_at_start_naming_the_folder(tmp_path):
    (tmp_path / "data" / "images" / "training").mkdir(parents=True)
    args = main_segment.get_args_parser().parse_args([
        "--model", "convvit_tiny_patch16", "--input_size", "64", "--device", "cpu", "--nb_classes", "4",
        "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=re.escape(f"--data_path {str(tmp_path / 'data')!r} has no "
                                                   f"'annotations/training/' folder: expected a dataset root in "
                                                   f"ADE20K's layout")):
        main_segment.main(args)
    assert not (tmp_path / "out").exists()  # refused before the run's output folder is made


def test_a_batch_that_lost_samples_is_topped_up_with_fully_ignored_blank_crops():
    images, labels = torch.ones(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long)
    x, y = full_batch(images, labels, 3, 8, 255)
    assert x.shape == (3, 3, 8, 8) and torch.equal(x[0], images[0]) and (x[1:] == 0).all()
    assert (y[1:] == 255).all() and torch.equal(y[0], labels[0])
    assert full_batch(images, labels, 1, 8, 255)[0] is images
    # the task: what a batch holds of readable samples; a batch with none is the task's placeholder, which the loop
    # trains with weight 0 (training.loop.train_round), topped up the same way
    cfg = SimpleNamespace(batch_size=3, input_size=8, ignore_index=255, loss_names=("loss", "loss_decode"))
    task = SegmentTask(None, cfg, torch.device("cpu"), ["a"])
    x, y, readable = task.prepare(images, labels)
    assert x.shape == (3, 3, 8, 8) and readable == 1
    x, y, readable = task.prepare(*task.placeholder())
    assert x.shape == (3, 3, 8, 8) and (y == 255).all() and readable == 0


def test_evaluation_batches_of_images_of_several_sizes_name_the_flag():
    collate = EvalCollate(2)
    same = [(torch.zeros(3, 8, 8), torch.zeros(8, 8)), (torch.zeros(3, 8, 8), torch.zeros(8, 8)), None]
    assert collate(same)[2] == 1
    with pytest.raises(ValueError, match="--eval_batch_size 2 needs validation images of one size"):
        collate([(torch.zeros(3, 8, 8), torch.zeros(8, 8)), (torch.zeros(3, 8, 12), torch.zeros(8, 12))])


def test_the_commands_in_segment_md_parse_with_the_scripts_flags():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "SEGMENT.md").read_text(), re.S)
    commands = [line.split("#")[0] for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if "main_segment.py" in line]
    assert len(commands) >= 4
    parser = main_segment.get_args_parser()
    for command in commands:
        parser.parse_args(command.split("main_segment.py", 1)[1].split())  # an unknown flag or a bad value exits


@pytest.mark.parametrize("class_token", [False, True])
def test_a_resumed_checkpoint_rebuilds_the_encoder_layout_it_was_trained_with(tmp_path, class_token):
    import dmjd_encoders  # noqa: F401  (registers the encoders)
    from models_upernet import create_upernet
    from dmjd_encoders.checkpoint import save_checkpoint
    model = create_upernet("vit_test_patch16_gap_sincos", 4, channels=8, aux_in_index=1, aux_channels=8, img_size=32,
                           class_token=class_token)
    save_checkpoint({"model": model.state_dict()}, str(tmp_path / "seg.pth"))
    assert architecture_kwargs(str(tmp_path / "seg.pth")) == ({"class_token": True} if class_token else {})


def small_segmentation_config(*flags):
    parse = main_segment.get_args_parser().parse_args
    return resolve_config(parse(["--device", "cpu", "--input_size", "32", "--decoder_channels", "8",
                                 "--aux_channels", "8", *flags]))[0]


@pytest.mark.parametrize("model,strides", [("convvit_tiny_patch16", [4, 8, 16, 32]),
                                           ("vit_test_patch16_gap_sincos", [4, 8, 16, 32])])
def test_the_default_recipe_builds_the_dense_options_into_any_encoder(model, strides):
    import dmjd_encoders  # noqa: F401  (registers the encoders)
    from engine_segment import build_segmenter
    cfg = small_segmentation_config("--model", model, "--nb_classes", "3")
    assert cfg.simple_pyramid is (model.startswith("vit"))
    segmenter = build_segmenter(cfg).eval()
    names = list(segmenter.state_dict())
    assert segmenter.backbone.feature_info.reduction() == strides
    assert any("rel_pos.relative_position_bias_table" in k for k in names) and any(".ls1.gamma" in k for k in names)
    assert segmenter.predict(torch.randn(1, 3, 48, 32), (48, 32), mode="whole").shape[-3:] == (3, 48, 32)
    plain = build_segmenter(small_segmentation_config("--model", model, "--nb_classes", "3", "--no-rel_pos_bias",
                                                      "--layer_scale", "none", "--no-simple_pyramid",
                                                      "--aux_in_index", "1"))  # the test ViT has 2 blocks
    assert not any("rel_pos" in k or ".ls1." in k or "pyramid" in k for k in plain.state_dict())


def test_resuming_a_checkpoint_saved_before_the_dense_flags_names_them_and_resumes_with_them_off(tmp_path):
    from training.checkpointing import check_saved_flags
    from training.errors import RunError
    saved = small_segmentation_config().flags()
    for name in ("rel_pos_bias", "layer_scale", "simple_pyramid"):
        del saved[name]  # a checkpoint of a run from before these options: they were off
    with pytest.raises(RunError) as stop:
        check_saved_flags("old.pth", saved, small_segmentation_config("--output_dir", str(tmp_path / "a")))
    for shown in ("--rel_pos_bias: saved False (saved before the flag existed), given True",
                  "--layer_scale: saved None (saved before the flag existed), given 1.0"):
        assert shown in str(stop.value)
    assert "simple_pyramid" not in str(stop.value)  # a ConViT's: off, as before
    off = small_segmentation_config("--output_dir", str(tmp_path / "b"), "--no-rel_pos_bias", "--layer_scale", "none")
    check_saved_flags("old.pth", saved, off)


def test_a_checkpoint_saved_before_the_dense_flags_resumed_for_evaluation_names_their_former_values(tmp_path):
    import dmjd_encoders  # noqa: F401  (registers the encoders)
    from engine_segment import build_segmenter
    from training.errors import RunError
    from training.run import Run
    from dmjd_encoders.checkpoint import save_checkpoint
    old = small_segmentation_config("--model", "convvit_tiny_patch16", "--no-rel_pos_bias", "--layer_scale", "none")
    args = old.flags()
    for name in ("rel_pos_bias", "layer_scale", "simple_pyramid"):
        del args[name]
    save_checkpoint({"model": build_segmenter(old).state_dict(), "args": args, "epoch": 0}, str(tmp_path / "old.pth"))
    cfg = small_segmentation_config("--model", "convvit_tiny_patch16", "--eval", "--resume", str(tmp_path / "old.pth"),
                                    "--output_dir", str(tmp_path / "eval"))
    with Run(cfg) as run:
        with pytest.raises(RunError, match=r"saved before these flags existed .* --rel_pos_bias False, --layer_scale "
                                           r"None \(this run has True, 1.0\)"):
            run.resume(None, build_segmenter(cfg), auto=False)
    former = small_segmentation_config("--model", "convvit_tiny_patch16", "--eval", "--resume",
                                       str(tmp_path / "old.pth"), "--output_dir", str(tmp_path / "eval2"),
                                       "--no-rel_pos_bias", "--layer_scale", "none")
    with Run(former) as run:
        assert run.resume(None, build_segmenter(former), auto=False) == 0  # the weights load


# -- the evaluation set, checked before the first step ----------------------------------------------------------------
@pytest.fixture
def small_seg_data(tmp_path):
    """2 training and 3 validation images of 32 x 32, 4 classes (annotations 0..4, 0 the ignored "other")."""
    return write_segmentation_folder(tmp_path / "ade", {"training": [(32, 32)] * 2, "validation": [(32, 32)] * 3})


def write_label(path, value):
    """Overwrites the annotation at `path` (32 x 32) with a label map of class 1 and one pixel of `value`."""
    label = np.ones((32, 32), np.uint8)
    label[5, 5] = value
    Image.fromarray(label, "L").save(path)


def seg_loaders(data, *flags):
    """engine_segment.segmentation_loaders of a one-process CPU run on `data`, 4 classes."""
    from engine_segment import segmentation_loaders
    from training.distributed import DistInfo
    cfg = small_segmentation_config("--data_path", str(data), "--nb_classes", "4", "--img_scale", "32", "32",
                                    "--num_workers", "0", *flags)
    return segmentation_loaders(SimpleNamespace(device=torch.device("cpu"), dist=DistInfo(), world_size=1), cfg)


def test_a_validation_label_out_of_range_stops_the_run_before_the_first_step(small_seg_data):
    from training.errors import RunError
    bad = small_seg_data / "annotations" / "validation" / "2.png"
    write_label(bad, 9)
    with pytest.raises(RunError) as stop:
        seg_loaders(small_seg_data)
    assert str(stop.value) == (f"{bad}: label 8 is outside the 4 classes (the file's 9, less one by "
                               f"--reduce_zero_label) and is not the ignore index 255; check --nb_classes 4, "
                               f"--reduce_zero_label and --ignore_index 255")


def test_a_training_label_out_of_range_stops_the_run_at_start(small_seg_data):
    from training.errors import RunError
    bad = small_seg_data / "annotations" / "training" / "1.png"
    write_label(bad, 7)
    with pytest.raises(RunError, match=re.escape(f"{bad}: label 6 is outside the 4 classes")):
        seg_loaders(small_seg_data)
    (small_seg_data / "seg.pth").write_bytes(b"")  # --eval needs a --resume file; the loaders do not read it
    seg_loaders(small_seg_data, "--eval", "--resume", str(small_seg_data / "seg.pth"))  # reads no training label


def test_a_validation_set_whose_pixels_are_all_ignored_stops_the_run_naming_the_folder(small_seg_data):
    from training.errors import RunError
    folder = small_seg_data / "annotations" / "validation"
    for path in folder.iterdir():
        Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(path)  # 0: "other", ignored once reduced
    with pytest.raises(RunError) as stop:
        seg_loaders(small_seg_data)
    assert str(stop.value) == (f"{folder}: every pixel of the annotations of all 3 validation images is ignored (label "
                               f"255, or 0 by --reduce_zero_label): there is no pixel to score; check "
                               f"--reduce_zero_label and --ignore_index 255")


def test_validation_annotations_none_of_which_can_be_read_stop_the_run_naming_the_folder(small_seg_data):
    from training.errors import RunError
    folder = small_seg_data / "annotations" / "validation"
    for path in folder.iterdir():
        path.write_bytes(b"")
    with pytest.warns(UserWarning, match="unreadable annotation"), pytest.raises(RunError, match=re.escape(
            f"{folder}: none of the annotations of all 3 validation images can be read")):
        seg_loaders(small_seg_data)


def test_the_label_check_says_whether_it_read_every_annotation_or_a_sample(small_seg_data, capsys, monkeypatch):
    seg_loaders(small_seg_data)
    out = capsys.readouterr().out
    assert "checked the labels of all 3 validation images\n" in out
    assert "checked the label range of all 2 training images (the loader checks each one as it reads it)" in out
    monkeypatch.setattr("engine_segment.FULL_LABEL_CHECK_LIMIT", 2)
    monkeypatch.setattr("engine_segment.LABEL_CHECK_SAMPLE", 2)
    seg_loaders(small_seg_data)
    assert ("checked the labels of a sample of 2 of 3 validation images (a fixed random sample: all are read up to 2)"
            in capsys.readouterr().out)


def test_an_evaluation_with_an_empty_confusion_matrix_is_a_run_error_naming_the_folder():
    from engine_segment import SegmentTask
    from training.errors import RunError
    from training.loop import evaluate

    class Constant(torch.nn.Module):
        def predict(self, images, size, *how):
            return torch.ones(len(images), 4, *size)

    cfg = SimpleNamespace(nb_classes=4, ignore_index=255, amp_dtype=None, eval_mode="whole", eval_crop_size=8,
                          eval_stride=8, test_ratios=[1.0], aug_test=False, data_path="data", loss_names=("loss",))
    batches = [(torch.zeros(2, 3, 8, 8), torch.full((2, 8, 8), 255), 0)]  # every pixel ignored
    with pytest.raises(RunError) as stop:
        evaluate(SegmentTask(Constant(), cfg, torch.device("cpu"), ["a", "b", "c", "d"]), batches,
                 torch.device("cpu"), 10)
    assert str(stop.value) == ("the confusion matrix is empty: every pixel of the 2 validation images evaluated is "
                               "ignored (data/annotations/validation, --ignore_index 255): there is no score to "
                               "report")
