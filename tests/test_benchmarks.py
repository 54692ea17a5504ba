"""benchmarks/: the memory accounting, the JPEG folder, the data mode and the one-command GPU check (run on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import throughput
from benchmarks.jpeg_folder import SIZES, make_jpeg_folder
from helpers import run_script

ROOT = Path(__file__).resolve().parents[1]


class _TwoLayers(torch.nn.Module):
    """Saves, per image: the input (10 floats) for the first weight's gradient, the ReLU output (20, shared by
    the ReLU and the second layer) and the output (5) for the square: 35 floats, 140 bytes."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))

    def forward(self, x, teacher=None):
        return self.net(x.float()).pow(2).mean(), {}


@pytest.mark.parametrize("batch", [1, 3])
def test_saved_activation_bytes_counts_each_storage_once_without_weights(batch):
    model = _TwoLayers()
    got = throughput.saved_activation_bytes(model, None, torch.ones(batch, 10), torch.device("cpu"), None)
    assert got == 140 * batch


def test_memory_estimate_is_linear_in_the_batch():
    args = throughput.parse_args(["--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64",
                                  "--memory_gib", "1"])
    per_image, fixed, largest, capacity = throughput.memory_estimate(args, torch.device("cpu"), "none")
    model = throughput.build(args, torch.device("cpu"), throughput.Path(sparse_stages=True, fused_attn=True))[0]
    images = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    at_4 = throughput.saved_activation_bytes(model, None, images, torch.device("cpu"), None)
    n_params = sum(p.numel() for p in model.parameters())
    assert per_image > 0 and fixed >= 16 * n_params and capacity == 2 ** 30
    assert at_4 == pytest.approx(fixed - 16 * n_params + 4 * per_image, rel=1e-6)
    assert largest == int((0.9 * capacity - fixed) // per_image)
    dense_per_image = throughput.memory_estimate(args, torch.device("cpu"), "none", sparse_stages=False)[0]
    assert dense_per_image > 1.3 * per_image  # the sparse conv stages keep only the visible tokens' activations


def test_jpeg_folder_writes_readable_imagenet_sized_photos(tmp_path):
    mean_bytes, mean_pixels = make_jpeg_folder(str(tmp_path), 12, workers=2, seed=3)
    files = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(files) == 12 and len({f.parent.name for f in files}) == 10
    for f in files:
        with Image.open(f) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size in SIZES
    assert 20_000 < mean_bytes < 400_000 and mean_pixels == pytest.approx(
        sum(Image.open(f).size[0] * Image.open(f).size[1] for f in files) / 12)


def test_data_mode_times_at_least_ten_queues(tmp_path, capsys):
    make_jpeg_folder(str(tmp_path), 10, workers=1)
    args = throughput.parse_args(["--data", str(tmp_path), "--num_workers", "1", "--batch_size", "4",
                                  "--batches", "3", "--input_size", "64", "--device", "cpu"])
    assert throughput.run_data(args) > 0
    assert "20 batches of 4" in capsys.readouterr().out  # 10 x (1 worker x 2 batches queued) > --batches 3


def test_data_mode_rejects_a_folder_smaller_than_the_batch(tmp_path):
    make_jpeg_folder(str(tmp_path), 3, workers=1)
    args = throughput.parse_args(["--data", str(tmp_path), "--batch_size", "4", "--device", "cpu"])
    with pytest.raises(SystemExit, match="fewer than --batch_size 4"):
        throughput.run_data(args)


def test_peak_flag_takes_a_number_or_measure():
    assert throughput.parse_args(["--peak_tflops", "989"]).peak_tflops == 989.0
    assert throughput.parse_args(["--peak_tflops", "measure"]).peak_tflops == "measure"
    with pytest.raises(SystemExit):
        throughput.parse_args(["--peak_tflops", "fast"])


def test_gpu_check_runs_on_the_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out), "--device", "cpu",
           "--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64", "--batch_size", "2",
           "--target_batch", "4", "--paths", "plain,fused_attn", "--target_paths", "fused_adamw",
           "--last_paths", "channels_last", "--warmup", "1", "--steps", "1", "--num_images", "16",
           "--data_batch", "4", "--num_workers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    for heading in ("## Machine", "## Dense peak", "## Input pipeline", "## Pre-training step", "## Memory",
                    "fused_adamw at batch 4", "## Where the time goes (all_eager, batch 4)",
                    "## channels_last at batch 2", "## Verdict"):
        assert heading in report
    assert "data pipeline:" in report and "| fused_adamw (batch 4) |" in report and "| channels_last |" in report
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["paths"]["plain"]["ratio"] == 1.0 and figures["paths"]["fused_attn"]["images_per_s"] > 0
    assert figures["memory"]["bf16"]["activation_mib_per_image"] > 0
    profile = figures["profile"]
    assert profile["wall_ms_per_step"] > 0 and 0 < profile["matmul_fraction"] < 1 and len(profile["top"]) == 20
    assert sum(row["fraction"] for row in profile["top"]) <= 1 + 1e-9 and "| aten::mm |" in report
    verdict = figures["verdict"]
    assert verdict["data_images_per_s"] == figures["data_images_per_s"] > 0
    assert verdict["dense_equivalent_fraction_of_peak"] == pytest.approx(
        verdict["images_per_s"] * figures["paths"]["plain"]["gflops_fwd_bwd"] / 1e3 / figures["peak_tflops"])


def test_gpu_check_skips_stages_past_its_budget(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out), "--device", "cpu",
           "--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64", "--batch_size", "2",
           "--num_images", "8", "--data_batch", "4", "--num_workers", "0", "--budget_s", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert "plain          skipped: out of time" in report and "no step was measured" in report


def _break_time_path(monkeypatch, error, when, calls=None):
    """Replaces throughput.time_path by one that raises `error` for the paths where `when(args, path)` holds, and
    appends each call's (path, keyword arguments) to `calls` when given."""
    real_time_path = throughput.time_path

    def time_path(args, device, path, images, **kwargs):
        if calls is not None:
            calls.append((path, kwargs))
        if when(args, path):
            raise error
        return real_time_path(args, device, path, images, **kwargs)

    monkeypatch.setattr(throughput, "time_path", time_path)


def test_a_failing_path_is_reported_and_the_others_still_run(monkeypatch, capsys):
    _break_time_path(monkeypatch, RuntimeError("the compiler broke\nsecond line"), lambda args, path: path.fused_adamw)
    args = throughput.parse_args(["--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64",
                                  "--batch_size", "2", "--paths", "plain,fused_adamw,fused_attn", "--warmup", "0",
                                  "--steps", "1", "--device", "cpu"])
    with pytest.raises(RuntimeError, match="the compiler broke"):
        throughput.run_steps(args)
    results = throughput.run_steps(args, keep_going=True)
    assert results["paths"]["fused_adamw"] == {"error": "RuntimeError: the compiler broke"}
    assert results["paths"]["plain"]["images_per_s"] > 0 and results["paths"]["fused_attn"]["images_per_s"] > 0
    out = capsys.readouterr().out
    assert "Traceback" in out and "fused_adamw    failed: RuntimeError: the compiler broke" in out


def test_all_eager_is_all_but_compile():
    for device in (torch.device("cpu"), torch.device("cuda")):
        every, eager = throughput.path_config("all", device), throughput.path_config("all_eager", device)
        assert every.compile and not eager.compile
        assert every.amp == eager.amp == ("bf16" if device.type == "cuda" else "none")
        others = [s for s in throughput.SWITCHES if s != "compile"]
        assert len(others) == 7 and all(getattr(every, s) and getattr(eager, s) for s in others)
        plain = throughput.path_config("plain", device)
        assert plain.amp == "none" and not any(getattr(plain, s) for s in throughput.SWITCHES)
        for switch in throughput.SWITCHES:  # each switches on one thing over plain
            assert [s for s in throughput.SWITCHES if getattr(throughput.path_config(switch, device), s)] == [switch]


@pytest.mark.parametrize("name", ["plain", "all_eager"])
def test_plain_step_is_the_releases_and_the_fast_one_reads_nothing_back(name, monkeypatch, host_read_recorder):
    """plain computes HOG for every view, draws masks on the host and reads the loss back every step; all_eager
    computes HOG once per image, draws masks on the device and reads nothing back."""
    import models_dmjd
    device = torch.device("cpu")
    args = throughput.parse_args(["--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64",
                                  "--batch_size", "2", "--device", "cpu"])
    step, model, _, _, optimizer = throughput.make_step(args, device, throughput.path_config(name, device),
                                                        throughput.synthetic_images(2, 64, device))
    hog_rows, drawn_on = [], []
    real_hog, real_masks = models_dmjd.hog_targets, model.make_masks
    for module in (models_dmjd, throughput):  # the model's HOG per image, and the plain path's per view
        monkeypatch.setattr(module, "hog_targets", lambda images, *a: hog_rows.append(len(images)) or
                            real_hog(images, *a))
    monkeypatch.setattr(model, "make_masks", lambda batch, device=None, generator=None: drawn_on.append(device) or
                        real_masks(batch, device, generator))
    step()  # the optimizer's state exists from here on
    recorder = host_read_recorder(optimizer)
    with recorder:
        step()
    fast = name == "all_eager"
    assert hog_rows == [2 if fast else 4] * 2  # 2 images, 2 views
    assert drawn_on == [device if fast else None] * 2  # the model's draw on the images' device, or the host's
    reads = [op for _, op in recorder.seen]
    assert (reads == []) if fast else ("_local_scalar_dense" in reads)  # loss.item()


def test_gpu_check_retries_only_the_paths_out_of_memory_at_the_target_batch(tmp_path, monkeypatch):
    from benchmarks import gpu_check
    _break_time_path(monkeypatch, torch.OutOfMemoryError("pretend the card is full"),
                     lambda args, path: path.fused_adamw and args.batch_size == 4)
    cli = gpu_check.parse_args([
        "--out", str(tmp_path), "--device", "cpu", "--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size",
        "64", "--batch_size", "2", "--target_batch", "4", "--paths", "plain", "--target_paths",
        "fused_attn,fused_adamw", "--profile_path", "fused_adamw", "--last_paths", "", "--warmup", "0", "--steps", "1",
        "--num_images", "8", "--data_batch", "4", "--num_workers", "0"])
    gpu_check.main(cli)
    target = json.loads((tmp_path / "gpu_check.json").read_text())["target"]
    assert target["fused_adamw (batch 4)"] == {"out_of_memory": True}
    assert target["fused_attn (batch 4)"]["images_per_s"] > 0 and target["fused_adamw (batch 2)"]["images_per_s"] > 0
    assert "fused_attn (batch 2)" not in target  # what fitted is not run again
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| fused_adamw (batch 4) | out of memory |" in report
    assert "## Where the time goes (fused_adamw, batch 2)" in report


def test_repeats_run_rounds_through_all_paths_and_give_medians(monkeypatch, capsys):
    calls = []
    _break_time_path(monkeypatch, RuntimeError("broken"), lambda args, path: path.fused_adamw, calls)
    args = throughput.parse_args(["--model", "dmjd_convit_tiny_patch16_dec1_hog", "--input_size", "64",
                                  "--batch_size", "2", "--paths", "plain,fused_attn,fused_adamw", "--warmup", "0",
                                  "--steps", "1", "--repeats", "3", "--device", "cpu"])
    results = throughput.run_steps(args, keep_going=True)
    # round by round, each starting one path further on; FLOPs counted in the first round only; the failing path
    # is not tried again
    assert [(path.fused_attn, kwargs["with_flops"]) for path, kwargs in calls] == \
        [(False, True), (True, True), (False, True)] + [(True, False), (False, False)] + [(False, False), (True, False)]
    assert list(results["paths"]) == ["plain", "fused_attn", "fused_adamw"]
    plain, fused = results["paths"]["plain"], results["paths"]["fused_attn"]
    assert [r["ratio"] for r in plain["rounds"]] == [1.0] * 3 and plain["ratio"] == 1.0
    steps = sorted(r["step_s"] for r in fused["rounds"])
    assert len(steps) == 3 and fused["step_s"] == steps[1] and fused["images_per_s"] == 2 / steps[1]
    assert fused["ratio"] == sorted(r["ratio"] for r in fused["rounds"])[1]
    assert results["paths"]["fused_adamw"] == {"error": "RuntimeError: broken"}
    out = capsys.readouterr().out
    assert "round 2 of 3, in the order fused_attn,fused_adamw,plain" in out and "median of 3 rounds" in out
    assert "over 3 rounds)" in out
    with pytest.raises(SystemExit):
        throughput.parse_args(["--repeats", "0"])


@pytest.mark.parametrize("pred_type", ["hog", "pixel"])
def test_the_plain_paths_hog_per_view_gives_the_losses_of_hog_per_image(pred_type):
    """The views index one HOG per image; computing it for every view's copy (the plain path's hog_per_view) gives
    the same losses (with pixel targets the visible branch alone takes HOG)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("dmjd_convit_tiny_patch16_dec1_hog", img_size=64, pred_type=pred_type).eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    masks = model.make_masks(4, generator=torch.Generator().manual_seed(1))

    def losses():
        with torch.no_grad():
            loss, parts = model(images, masks)
        return torch.stack([loss, parts["loss_mask"], parts["loss_vis"]])

    assert model.hog(images.float()).shape[0] == 4  # the default: once per image
    once = losses()
    throughput.hog_per_view(model)
    assert model.hog(images.float()).shape[0] == 4 * model.num_views
    torch.testing.assert_close(losses(), once, rtol=1e-6, atol=1e-6)


def test_grad_checkpointing_benchmark_reports_the_memory_saved(capsys):
    from benchmarks import grad_checkpointing
    rows = grad_checkpointing.main(["--models", "convvit_tiny_patch16", "--input_size", "64"])
    (name, plain, checkpointed), = rows
    assert name == "convvit_tiny_patch16" and 0 < checkpointed < plain
    assert "| convvit_tiny_patch16 |" in capsys.readouterr().out


def test_segmentation_check_fine_tunes_both_encoders_and_draws_both_predictions(tmp_path):
    """The check end to end at the tiniest size: both main_segment.py runs, their mIoU, the summary and the
    picture (image, ground truth, the pre-trained and the random-init prediction)."""
    from helpers import pretrain_checkpoint, write_fashion_idx

    pretrain_checkpoint(tmp_path / "pre.pth", "dmjd_convit_mini_patch8_hog", img_size=32)
    cmd = [sys.executable, "-m", "benchmarks.segmentation_check", "--pretrained", str(tmp_path / "pre.pth"),
           "--source", str(write_fashion_idx(tmp_path / "idx")), "--data", str(tmp_path / "seg"),
           "--num_train", "8", "--num_val", "3", "--iters", "2", "--warmup_iters", "1", "--batch_size", "2",
           "--decoder_channels", "8", "--aux_channels", "8", "--num_images", "2", "--num_workers", "0",
           "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    proc = run_script(cmd)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for name in ("pretrained", "random_init"):
        log = json.loads((tmp_path / "out" / name / "log.txt").read_text().splitlines()[-1])
        assert summary[name]["mIoU"] == log["test_mIoU"] and log["test_images"] == 3
    assert "--finetune" in proc.stdout.split("random_init")[0]  # the pre-trained run loads the checkpoint
    assert "pre-training gives" in proc.stdout
    picture = Image.open(tmp_path / "out" / "predictions.png")
    assert picture.width == 4 * 128 + 5 * 4  # image, ground truth and two predictions, 64 px panels shown at 128


def test_segmentation_check_says_how_to_make_the_missing_checkpoint(tmp_path):
    from benchmarks.segmentation_check import main, parse_args
    with pytest.raises(SystemExit, match=r"python\S* demo.py.*--pretrain"):
        main(parse_args(["--pretrained", str(tmp_path / "none.pth"), "--data", str(tmp_path / "seg")]))


def test_segmentation_step_benchmark_counts_memory_flops_and_times_the_real_loop(capsys):
    from benchmarks import segmentation_step
    rows = segmentation_step.main(["--model", "convvit_tiny_patch16", "--sizes", "64", "96", "--decoder_channels",
                                   "16", "--nb_classes", "4", "--steps", "1", "--device", "cpu"])
    small, large = rows
    for r in rows:
        assert 0 < r["activation_bytes_per_image_bf16"] < r["activation_bytes_per_image_none"]
        assert r["gflops_forward_backward"] > 2 * r["gflops_forward"] > 0 and r["images_per_s"] > 0
        assert r["fixed_bytes"] == 16 * r["parameters"] and (r["amp"], r["batch_size"]) == ("none", 2)
    assert large["activation_bytes_per_image_none"] > 2 * small["activation_bytes_per_image_none"]  # 2.25x pixels
    assert "| 96 x 96 |" in capsys.readouterr().out


@pytest.mark.parametrize("vis_target", ["hog", "ema"])
def test_loop_step_times_this_checkouts_loop_and_gives_its_loss(vis_target):
    # a subprocess: the benchmark puts the checkout it times first on sys.path
    proc = run_script([sys.executable, "benchmarks/loop_step.py", "--tree", ".", "--vis_target", vis_target,
                       "--steps", "2", "--batch_size", "2"])
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["vis_target"] == vis_target and row["ms_per_step"] > 0 and row["images_per_s"] > 0
    assert row["loss"] == row["loss"] and row["tree"] == str(Path(__file__).resolve().parents[1])  # a number


def test_detection_check_fine_tunes_both_encoders_and_draws_both_detections(tmp_path):
    """The check end to end at the tiniest size: both main_detect.py runs, their box and mask AP, the summary and
    the picture (image, ground truth, the pre-trained and the random-init detections)."""
    from helpers import pretrain_checkpoint, write_fashion_idx

    pretrain_checkpoint(tmp_path / "pre.pth", "dmjd_convit_mini_patch8_hog", img_size=32)
    cmd = [sys.executable, "-m", "benchmarks.detection_check", "--pretrained", str(tmp_path / "pre.pth"),
           "--source", str(write_fashion_idx(tmp_path / "idx")), "--data", str(tmp_path / "det"),
           "--num_train", "8", "--num_val", "3", "--iters", "2", "--batch_size", "2", "--fpn_channels", "8",
           "--rois_per_image", "8", "--num_images", "2", "--num_workers", "0", "--device", "cpu",
           "--output_dir", str(tmp_path / "out")]
    proc = run_script(cmd)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for name in ("pretrained", "random_init"):
        log = json.loads((tmp_path / "out" / name / "log.txt").read_text().splitlines()[-1])
        assert summary[name]["bbox_AP"] == log["test_bbox_AP"] and log["test_images"] == 3
    assert "--finetune" in proc.stdout.split("random_init")[0]  # the pre-trained run loads the checkpoint
    assert "pre-training gives" in proc.stdout
    picture = Image.open(tmp_path / "out" / "predictions.png")
    assert picture.width == 4 * 192 + 5 * 4  # image, ground truth and two models' detections, 64 px shown at 192


def test_detection_step_benchmark_counts_memory_flops_and_times_the_real_loop(capsys):
    from benchmarks import detection_step
    rows = detection_step.main(["--model", "convvit_tiny_patch16", "--sizes", "64", "--steps", "1",
                                "--device", "cpu", "--fpn_channels", "8", "--rois_per_image", "8",
                                "--window_size", "2", "--global_blocks", "1"])
    for r in rows:
        assert 0 < r["activation_bytes_per_image_bf16"] < r["activation_bytes_per_image_none"]
        assert r["images_per_s"] > 0 and r["fixed_bytes"] == 16 * r["parameters"]
        assert r["gflops_forward_backward"] > r["gflops_forward"] > 0
    assert "| 64 x 64 |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/convergence.py: tiny budgets on tiny Fashion-MNIST-like files.

@pytest.fixture
def convergence_args(tmp_path):
    """parse_args of the convergence benchmark at test size (two configurations, one seed, two evaluations of a
    fifth of a compute second each), extra flags appended; torch's thread count is restored afterwards."""
    from benchmarks import convergence
    from helpers import write_fashion_idx
    data = write_fashion_idx(tmp_path / "fashion", train=60, test=30)
    threads = torch.get_num_threads()

    def make(*extra):
        return convergence.parse_args(
            ["--budget", "0.4", "--evals", "2", "--seeds", "0", "--configs", "convmae_pixel", "dmjd_hog",
             "--batch_size", "8", "--probe_train", "60", "--probe_test", "30", "--device", "cpu",
             "--data_dir", str(data), "--out", str(tmp_path / "out"), *extra])
    yield make
    torch.set_num_threads(threads)


def _hand_made_rows(curves, times=(0.0, 300.0, 600.0)):
    """Convergence rows from {config: {seed: [probe accuracy at each time]}} (20-NN the probe's minus 1)."""
    return [dict(setting="s", config=config, seed=seed, budget=times[-1], eval=i, compute_s=t, wall_s=t, steps=10 * i,
                 images=80 * i, probe_acc=acc, knn_acc=acc - 1)
            for config, by_seed in curves.items() for seed, accs in by_seed.items()
            for i, (t, acc) in enumerate(zip(times, accs))]


def test_convergence_appends_a_row_per_evaluation_and_a_rerun_appends_nothing(convergence_args, tmp_path, capsys):
    from benchmarks import convergence
    args = convergence_args()
    convergence.main(args)
    csv_path = tmp_path / "out" / "convergence.csv"
    rows = convergence.read_rows(str(csv_path))
    key = convergence.Setting.from_args(args, torch.device("cpu")).key
    assert [(r["config"], r["eval"]) for r in rows] == [(c, i) for c in ("convmae_pixel", "dmjd_hog") for i in range(3)]
    for config in ("convmae_pixel", "dmjd_hog"):
        run = [r for r in rows if r["config"] == config]
        assert all(r["setting"] == key and r["seed"] == 0 and r["budget"] == 0.4 for r in run)
        assert run[0]["compute_s"] == run[0]["steps"] == 0
        assert 0.2 <= run[1]["compute_s"] <= run[2]["compute_s"] and run[2]["compute_s"] >= 0.4  # the budget is spent
        assert 0 < run[1]["steps"] <= run[2]["steps"] and run[2]["images"] == 8 * run[2]["steps"]
        assert all(0 <= r["probe_acc"] <= 100 and 0 <= r["knn_acc"] <= 100 and r["wall_s"] >= 0 for r in run)
    written = csv_path.read_bytes()
    capsys.readouterr()
    convergence.main(args)
    assert csv_path.read_bytes() == written
    out = capsys.readouterr().out
    assert "convmae_pixel seed 0: finished before, skipped" in out and "dmjd_hog seed 0: finished before" in out
    assert "| convmae_pixel | 1 |" in (tmp_path / "out" / "convergence.md").read_text()
    assert Image.open(tmp_path / "out" / "convergence.png").size[0] > 0


def test_convergence_runs_again_under_a_changed_flag_and_reports_each_setting_apart(convergence_args, tmp_path):
    from benchmarks import convergence
    first, changed = convergence_args("--configs", "maskfeat"), convergence_args("--configs", "maskfeat",
                                                                               "--mask_ratio", "0.5")
    convergence.main(first)
    md = convergence.main(changed)
    rows = convergence.read_rows(str(tmp_path / "out" / "convergence.csv"))
    keys = [convergence.Setting.from_args(a, torch.device("cpu")).key for a in (first, changed)]
    assert keys[0] != keys[1] and [r["setting"] for r in rows] == [keys[0]] * 3 + [keys[1]] * 3
    assert "masking 0.5" in md and "| maskfeat | 1 |" in md  # one seed: the first setting's run is not in it


def test_two_jobs_run_every_missing_run_once_in_their_own_processes(convergence_args, tmp_path):
    from benchmarks import convergence
    convergence.main(convergence_args("--jobs", "2", "--configs", "convmae_pixel", "dm", "--evals", "1"))
    rows = convergence.read_rows(str(tmp_path / "out" / "convergence.csv"))
    assert sorted((r["config"], r["eval"]) for r in rows) == [("convmae_pixel", 0), ("convmae_pixel", 1), ("dm", 0),
                                                             ("dm", 1)]


def test_the_setting_key_holds_every_flag_that_changes_a_result_and_no_other(convergence_args):
    from benchmarks import convergence
    cpu = torch.device("cpu")
    key = convergence.Setting.from_args(convergence_args(), cpu).key
    for flags in (["--jobs", "2"], ["--seeds", "1", "2"], ["--configs", "dm"], ["--baselines", "maskfeat"],
                  ["--out", "elsewhere"]):
        assert convergence.Setting.from_args(convergence_args(*flags), cpu).key == key, flags
    for flags in (["--budget", "1"], ["--evals", "3"], ["--threads", "2"], ["--blr", "1e-3"], ["--mask_type", "block"],
                  ["--batch_size", "4"], ["--probe_test", "20"], ["--scale", "gpu"], ["--warmup_fraction", "0.1"]):
        assert convergence.Setting.from_args(convergence_args(*flags), cpu).key != key, flags
    assert "machine=" in key and "device=cpu" in key and "threads=1" in key


def test_a_run_without_its_final_evaluation_counts_as_not_finished(convergence_args):
    from benchmarks import convergence
    setting = convergence.Setting.from_args(convergence_args(), torch.device("cpu"))
    rows = [dict(r, setting=setting.key) for r in _hand_made_rows({"maskfeat": {0: [70, 75, 80], 1: [70, 75]}})]
    assert convergence.finished_runs(rows, setting) == {("maskfeat", 0)}
    assert convergence.finished_runs([dict(r, setting="other") for r in rows], setting) == set()


def test_a_csv_with_other_columns_is_named_and_never_appended_to(tmp_path):
    from benchmarks import convergence
    old = tmp_path / "convergence.csv"
    old.write_text("config,seed,seconds,steps,images,probe_acc,knn_acc\nmaskfeat,0,0.0,0,0,72.3,71.7\n")
    with pytest.raises(ValueError, match="convergence.csv has the columns"):
        convergence.read_rows(str(old))


def test_time_to_accuracy_interpolates_between_evaluations_and_is_none_when_never_reached():
    from benchmarks.convergence import time_to_accuracy
    times, accuracies = [0, 100, 200, 300], [70, 80, 84, 86]
    assert time_to_accuracy(times, accuracies, 82) == pytest.approx(150)
    assert time_to_accuracy(times, accuracies, 86) == 300
    assert time_to_accuracy(times, accuracies, 60) == 0
    assert time_to_accuracy(times, accuracies, 86.5) is None
    assert time_to_accuracy(times, [70, 85, 80, 86], 84) == pytest.approx(100 * 14 / 15)  # the first crossing


def test_speedups_divide_the_baselines_time_to_its_final_accuracy_by_each_configurations():
    from benchmarks.convergence import speedups
    rows = _hand_made_rows({"convmae_pixel": {0: [70, 78, 82], 1: [70, 80, 84]},  # final mean 83, reached at 600
                            "dmjd_hog": {0: [70, 84, 86], 1: [70, 82, 84]},       # mean 83 at 300
                            "dm": {0: [70, 75, 80], 1: [70, 76, 81]}})             # never
    probe = speedups(rows, "convmae_pixel", "probe_acc")
    assert probe["convmae_pixel"]["target"] == 83 and probe["convmae_pixel"]["time"] == 600
    assert probe["convmae_pixel"]["speedup"] == 1
    assert probe["dmjd_hog"]["time"] == pytest.approx(300) and probe["dmjd_hog"]["speedup"] == pytest.approx(2)
    assert probe["dmjd_hog"]["per_seed"] == pytest.approx([300 * 13 / 14, 450])
    assert probe["dm"]["time"] is None and probe["dm"]["speedup"] is None and probe["dm"]["per_seed"] == [None, None]
    assert speedups(rows, "convmae_pixel", "knn_acc")["convmae_pixel"]["target"] == 82


def test_the_report_gives_final_accuracies_and_times_to_each_baseline_and_rewrites_the_docs_blocks(
        convergence_args, tmp_path, capsys):
    from benchmarks import convergence
    doc, readme = tmp_path / "CONVERGENCE.md", tmp_path / "README.md"
    doc.write_text("intro\n<!-- convergence -->\nold table\n<!-- /convergence -->\nprose\n")
    readme.write_text("<!-- convergence_summary -->\nold claim\n<!-- /convergence_summary -->\n")
    args = convergence_args("--doc", str(doc), str(readme), "--baselines", "convmae_pixel", "maskfeat")
    setting = convergence.Setting.from_args(args, torch.device("cpu"))
    rows = _hand_made_rows({"convmae_pixel": {0: [70, 78, 82], 1: [70, 80, 84]},
                            "dmjd_hog": {0: [70, 84, 86], 1: [70, 82, 84]}})
    (tmp_path / "out").mkdir()
    convergence.append_rows(str(tmp_path / "out" / "convergence.csv"),
                            [dict(r, setting=setting.key, budget=0.4, eval=r["eval"] * 2 // 2) for r in rows])
    args.evals = 2
    md = convergence.write_report(args, setting, str(tmp_path / "out" / "convergence.csv"))
    assert "| convmae_pixel | 2 | 20 ± 0 | 0.03 ± 0.00 | 0.0 ± 0.0 | 600 ± 0 |" in md and "| 83.00 ± 1.41 |" in md
    assert "| dmjd_hog | 300 [279, 450] | 2.00x |" in md
    assert "maskfeat" not in md.split("Effective epochs")[1]  # a baseline without runs has no table
    text = doc.read_text()
    assert text.startswith("intro\n<!-- convergence -->\n") and text.endswith("<!-- /convergence -->\nprose\n")
    assert "old table" not in text and "![accuracy against compute time](out/convergence.png)" in text
    claim = readme.read_text()
    assert "dmjd_hog reaches it in 300 s (2.00x faster than convmae_pixel)" in claim
    assert "+2.00 points against convmae_pixel (seeds' ranges overlap)" in claim
    assert Image.open(tmp_path / "out" / "convergence.png").size == (2 * 520 + 170, 560)


def test_a_doc_without_a_convergence_block_is_named(convergence_args, tmp_path):
    from benchmarks import convergence
    doc = tmp_path / "NOTES.md"
    doc.write_text("no markers here\n")
    args = convergence_args("--doc", str(doc))
    setting = convergence.Setting.from_args(args, torch.device("cpu"))
    (tmp_path / "out").mkdir()
    rows = _hand_made_rows({"convmae_pixel": {0: [70, 80, 82]}})
    convergence.append_rows(str(tmp_path / "out" / "convergence.csv"), [dict(r, setting=setting.key) for r in rows])
    with pytest.raises(ValueError, match="NOTES.md has neither a convergence nor a convergence_summary block"):
        convergence.write_report(args, setting, str(tmp_path / "out" / "convergence.csv"))


def test_the_convmae_baseline_predicts_normalised_pixels_from_one_view_without_a_visible_branch(convergence_args):
    from benchmarks import convergence
    setting = convergence.Setting.from_args(convergence_args(), torch.device("cpu"))
    model, task, _ = convergence.build_run(setting, "convmae_pixel", torch.device("cpu"))
    assert model.num_views == 1 and model.pred_type == "pixel" and model.theta == 0
    assert model.visible_branch is None and task.teacher is None
    assert model.mask_ratio == 0.6 and model.pred_ratio == 0.6  # one view predicts what it hides
    assert model.decoder_pred.out_features == 8 * 8 * 3  # a patch's pixels, not its 108 HOG numbers
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    parts = task.loss(images, None)  # the loss and its parts, by name
    loss = parts["loss"]
    assert torch.isfinite(loss) and loss.item() == pytest.approx(parts["loss_mask"].item())


def test_every_configuration_starts_from_the_same_encoder_for_a_seed(convergence_args):
    from benchmarks import convergence
    setting = convergence.Setting.from_args(convergence_args(), torch.device("cpu"))
    encoders = []
    for name in convergence.CONFIGS:
        torch.manual_seed(3)
        encoders.append(convergence.build_run(setting, name, torch.device("cpu"))[0].encoder.state_dict())
    for other in encoders[1:]:
        assert other.keys() == encoders[0].keys()
        assert all(torch.equal(other[k], encoders[0][k]) for k in other)


def test_the_gpu_scale_pretrains_convit_b_at_96_pixels_through_the_same_code_on_the_cpu(convergence_args):
    from benchmarks import convergence
    cpu = torch.device("cpu")
    assert convergence.scale_name("auto", torch.device("cuda")) == "gpu"
    assert convergence.scale_name("auto", cpu) == "laptop"
    flags = ("--scale", "gpu", "--batch_size", "1", "--budget", "0.05", "--evals", "1", "--probe_train", "2",
             "--probe_test", "1")
    args = convergence_args(*flags)
    setting = convergence.Setting.from_args(args, cpu)
    assert (setting.model, setting.input_size, setting.blr) == ("dmjd_convit_base_patch16_dec8_hog", 96, 6e-4)
    assert setting.block == "convergence_gpu"  # its report has blocks of its own in the docs
    data = convergence.load_fashion_mnist(args.data_dir, cpu)
    model, task, _ = convergence.build_run(setting, "dmjd_hog", cpu)
    images = convergence.model_input(convergence.augment(data[0][:1], torch.Generator().manual_seed(0)), 96)
    assert images.shape == (1, 3, 96, 96) and images.dtype == torch.float32
    with torch.no_grad():  # ConViT-B's backward on a CPU takes longer than a test should
        parts = task.loss(images, None)
        loss = parts["loss"]
    assert torch.isfinite(loss) and parts["loss_vis"] > 0
    # the whole run at that scale, steps included, with a small encoder for the test's CPU time
    small = convergence.Setting.from_args(convergence_args(*flags, "--model", "dmjd_convit_tiny_patch16_dec1_hog"),
                                          cpu)
    # (a budget of milliseconds, not one: the CPU time of torch's threads spinning after the evaluation can pass a
    # budget of 1 ms before the first step)
    rows = convergence.pretrain_run(small, "dmjd_ema", 0, data, cpu)
    assert [r["eval"] for r in rows] == [0, 1] and rows[1]["steps"] >= 1 and rows[1]["images"] == rows[1]["steps"]


def test_jobs_above_one_are_refused_off_the_cpu(convergence_args):
    from benchmarks import convergence
    with pytest.raises(ValueError, match="--jobs 2 runs several processes on the CPU"):
        convergence.Setting.from_args(convergence_args("--jobs", "2"), torch.device("meta"))


def test_the_probe_leaves_the_training_runs_random_stream_where_it_was():
    from benchmarks.convergence import linear_probe
    x, y = torch.randn(40, 6), torch.arange(40) % 4
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    accuracy = linear_probe(x, y, x, y, epochs=3, seed=5)
    assert torch.equal(torch.rand(3), expected) and accuracy == linear_probe(x, y, x, y, epochs=3, seed=5)


def test_the_compute_clock_counts_the_processs_cpu_time_not_time_spent_waiting():
    import time
    from benchmarks.convergence import ComputeClock
    clock = ComputeClock(torch.device("cpu"))
    clock.start()
    time.sleep(0.3)  # a process waiting for a core, as on a shared machine, spends no CPU time either
    clock.stop()
    assert clock.wall >= 0.3 and clock.compute < clock.wall / 3
    clock.start()
    busy = time.process_time() + 0.05
    while time.process_time() < busy:
        pass
    clock.stop()
    assert clock.compute >= 0.05


def test_a_benchmark_rewrites_its_block_of_a_doc_and_nothing_else(tmp_path):
    from benchmarks.doc_block import rewrite_block
    doc = tmp_path / "DOC.md"
    doc.write_text("before\n<!-- figures -->\nold table\n<!-- /figures -->\nafter\n")
    rewrite_block(str(doc), "figures", "| a | b |\n")
    assert doc.read_text() == "before\n<!-- figures -->\n| a | b |\n<!-- /figures -->\nafter\n"
    with pytest.raises(ValueError, match="no block to rewrite: it needs the lines <!-- other -->"):
        rewrite_block(str(doc), "other", "x")


def test_the_extrapolated_row_is_the_line_through_two_sizes_in_pixels():
    from benchmarks.task_step import extrapolated
    rows = [{"size": 100, "parameters": 5, "fixed_bytes": 80, "activation_bytes_per_image_none": 1.0,
             "activation_bytes_per_image_bf16": 0.5, "gflops_forward": 10.0, "gflops_forward_backward": 30.0},
            {"size": 200, "parameters": 5, "fixed_bytes": 80, "activation_bytes_per_image_none": 4.0,
             "activation_bytes_per_image_bf16": 2.0, "gflops_forward": 40.0, "gflops_forward_backward": 120.0}]
    row = extrapolated(rows, 300)  # 9 units of pixels: 1 + (9 - 1) / (4 - 1) x 3
    assert row["activation_bytes_per_image_none"] == pytest.approx(9.0) and row["gflops_forward"] == pytest.approx(90)
    assert row["fixed_bytes"] == 80 and "images_per_s" not in row


def segmentation_summary(gain: float) -> dict:
    from util.demo_seg_data import SEG_CLASS_NAMES
    iou = {name: 10.0 + i for i, name in enumerate(SEG_CLASS_NAMES)}
    return {"pretrained": {"mIoU": 15.0 + gain, "mAcc": 30.33, "aAcc": 78.24, "IoU": {**iou, "dress": None},
                           "minutes": 1.94},
            "random_init": {"mIoU": 15.0, "mAcc": 23.97, "aAcc": 76.87, "IoU": iou, "minutes": 1.81}}


def test_segmentation_check_writes_every_seed_into_its_block_of_a_doc(tmp_path, monkeypatch):
    """`--seeds 0 1 2 --doc` on a copy of SEGMENT.md, the fine-tunings stood in for by made-up summaries: each seed's
    runs go into a folder of their own, and the block gets every seed's figures, their mean and range and the
    first seed's per-class IoU, with the machine and torch; the rest of the doc stays."""
    from benchmarks import segmentation_check as check
    doc = tmp_path / "SEGMENT.md"
    doc.write_text((ROOT / "SEGMENT.md").read_text())
    seen = []

    def check_seed(args, data, picture):
        seen.append((args.seed, args.output_dir, picture))
        return segmentation_summary({0: 2.5, 1: 1.3, 2: -0.4}[args.seed])

    monkeypatch.setattr(check, "ensure_pretrained", lambda args: None)
    monkeypatch.setattr(check, "prepared_data", lambda prepare, args: str(tmp_path / "data"))
    monkeypatch.setattr(check, "check_seed", check_seed)
    out = tmp_path / "out"
    check.main(check.parse_args(["--seeds", "0", "1", "2", "--doc", str(doc), "--output_dir", str(out),
                                 "--picture", str(tmp_path / "seg.png"), "--device", "cpu"]))
    assert seen == [(0, str(out / "seed0"), str(tmp_path / "seg.png")),
                    (1, str(out / "seed1"), str(out / "seed1" / "predictions.png")),
                    (2, str(out / "seed2"), str(out / "seed2" / "predictions.png"))]
    text = doc.read_text()
    block = text.split("<!-- segmentation_check -->\n", 1)[1].split("<!-- /segmentation_check -->", 1)[0]
    assert "seeds 0, 1, 2 (" in block and f"torch {torch.__version__.split('+')[0]}" in block
    assert ("| mIoU, DMJD pre-trained (the demo's checkpoint) | 17.50 | 16.30 | 14.60 | **16.1** | 14.6 - 17.5 |"
            in block)
    assert "| pre-trained minus random | +2.5 | +1.3 | -0.4 | **+1.1** | -0.4 - +2.5 |" in block
    assert "| minutes per run, pre-trained / random | 1.9 / 1.8 | 1.9 / 1.8 | 1.9 / 1.8 | | |" in block
    assert "wins at 2 of 3 seeds" in block and "| dress | - | 14.0 |" in block
    original = (ROOT / "SEGMENT.md").read_text()
    assert text.replace(block, "") == original.replace(
        original.split("<!-- segmentation_check -->\n", 1)[1].split("<!-- /segmentation_check -->", 1)[0], "")


def test_a_doc_without_the_block_is_refused_before_the_check_runs(tmp_path):
    from benchmarks import segmentation_check
    (tmp_path / "NOTES.md").write_text("no block\n")
    with pytest.raises(SystemExit):
        segmentation_check.parse_args(["--doc", str(tmp_path / "NOTES.md")])


def test_segmentation_step_writes_its_table_with_the_extrapolated_row_into_its_block(tmp_path, monkeypatch):
    """`--doc` on a copy of SEGMENT.md, the measurement stood in for by rows that grow with the pixels: the block
    gets the measured rows and the row at 512 px on the line through them, with the machine and torch."""
    from benchmarks import segmentation_step
    doc = tmp_path / "SEGMENT.md"
    doc.write_text((ROOT / "SEGMENT.md").read_text())

    def measure(args, size):
        pixels = (size / 128) ** 2
        return {"size": size, "parameters": 163e6, "fixed_bytes": 16 * 163e6,
                "activation_bytes_per_image_none": 159 * 2 ** 20 * pixels,
                "activation_bytes_per_image_bf16": 92 * 2 ** 20 * pixels, "gflops_forward": 78.0 * pixels,
                "gflops_forward_backward": 240.0 * pixels, "amp": "none", "batch_size": 2,
                "images_per_s": 0.58 / pixels}

    monkeypatch.setattr(segmentation_step, "measure", measure)
    segmentation_step.main(["--sizes", "128", "192", "--device", "cpu", "--doc", str(doc)])
    block = doc.read_text().split("<!-- segmentation_step -->\n", 1)[1].split("<!-- /segmentation_step -->", 1)[0]
    assert "on convvit_base_patch16, `--amp auto`, batch 2 (" in block and "torch " in block
    assert "| 128 x 128 | 0.16 GiB |" in block and "| 192 x 192 |" in block
    assert "| 512 x 512, extrapolated | 2.48 GiB | 1.44 GiB |" in block  # 16 times the pixels of 128 px


def test_a_transfer_check_rerun_starts_each_run_afresh_even_with_subfolders(tmp_path):
    """A previous run's folder (with its bf16 evaluation's subfolder) is cleared, not resumed, and does not crash."""
    from argparse import Namespace
    from benchmarks.transfer_check import RUNS, fine_tune_both
    for name in RUNS:
        (tmp_path / name / "eval_bf16").mkdir(parents=True)
        (tmp_path / name / "eval_bf16" / "log.txt").write_text("{}\n")
        (tmp_path / name / "checkpoint-last.pth").write_text("old")

    def command(out, finetune):
        record = json.dumps({"finetune": finetune})
        return [sys.executable, "-c", f"import os; os.makedirs({out!r}, exist_ok=True); "
                                      f"open(os.path.join({out!r}, 'log.txt'), 'w').write({record!r} + '\\n')"]

    runs = fine_tune_both(Namespace(output_dir=str(tmp_path), pretrained="p.pth"), command)
    assert runs["pretrained"]["scores"] == {"finetune": "p.pth"} and runs["random_init"]["scores"] == {"finetune": None}
    for name in RUNS:
        assert sorted(os.listdir(tmp_path / name)) == ["log.txt"]
