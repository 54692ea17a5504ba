"""Every command-line entry point: --help explains every option and shows its default; the training scripts answer
--help and a wrong --data_path before importing torch."""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module -> the function that builds and parses its command line
ENTRY_POINTS = {
    "main_pretrain": "get_args_parser",
    "main_finetune": "get_args_parser",
    "main_linprobe": "get_args_parser",
    "main_segment": "get_args_parser",
    "main_detect": "get_args_parser",
    "main_transfer": "get_args_parser",
    "visualize": "get_args_parser",
    "plot_logs": "parse_args",
    "demo": "parse_args",
    "util.demo_data": "main",
    "util.demo_seg_data": "main",
    "export_encoder": "main",
    "benchmarks.throughput": "parse_args",
    "benchmarks.gpu_check": "parse_args",
    "benchmarks.convergence": "parse_args",
    "benchmarks.jpeg_folder": "parse_args",
    "benchmarks.segmentation_check": "parse_args",
    "benchmarks.segmentation_step": "parse_args",
}


class _Parsed(Exception):
    pass


def parser_of(module_name: str, function: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser an entry point builds: returned by it, or caught when it parses."""
    built = getattr(importlib.import_module(module_name), function)
    if function == "get_args_parser":
        return built()
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed):
        built([])
    return caught[0]


@pytest.mark.parametrize("module_name", list(ENTRY_POINTS))
def test_help_describes_every_option_and_shows_its_default(module_name, monkeypatch):
    parser = parser_of(module_name, ENTRY_POINTS[module_name], monkeypatch)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = (action.option_strings or [action.dest])[0]
        assert action.help and action.help.strip(), f"{module_name} {name} has no help"
        # the formatter adds "(default: ...)": a hand-written one would show twice
        assert "(default:" not in action.help.replace("(default: %(default)s)", ""), f"{module_name} {name}"
    text = parser.format_help()
    optional = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
                and a.default is not argparse.SUPPRESS]
    assert text.count("(default:") >= len(optional)


# the command lines ENTRY_POINTS leaves out (their help is plain), for the usage line that every script shares
OTHER_ENTRY_POINTS = {
    "plot_logs": "parse_args",
    "util.demo_det_data": "main",
    "benchmarks.detection_check": "parse_args",
    "benchmarks.detection_step": "parse_args",
    "benchmarks.grad_checkpointing": "parse_args",
    "benchmarks.loop_step": "main",
}
# scripts without a parser of their own: torchrun's command line (training.launch), the package's command whose
# script is export_encoder.py (dmjd_encoders.export), and the SLURM launchers (training.submitit_launch's parser,
# python -m training.submitit_launch's too)
NO_PARSER_OF_THEIR_OWN = {"training.launch", "dmjd_encoders.export", "submitit_pretrain", "submitit_finetune",
                          "training.submitit_launch"}


def test_every_script_is_in_the_usage_test():
    scripts = {str(path.relative_to(ROOT).with_suffix("")).replace("/", ".")
               for folder in (ROOT, ROOT / "util", ROOT / "benchmarks", ROOT / "training", ROOT / "dmjd_encoders")
               for path in folder.glob("*.py") if 'if __name__ == "__main__":' in path.read_text()}
    assert scripts == set(ENTRY_POINTS) | set(OTHER_ENTRY_POINTS) | NO_PARSER_OF_THEIR_OWN


@pytest.mark.parametrize("module_name", sorted({**ENTRY_POINTS, **OTHER_ENTRY_POINTS}))
def test_usage_names_the_script_as_it_was_started_not_its_description(module_name, monkeypatch):
    """`python plot_logs.py --help` says `usage: plot_logs.py ...` (argparse's first argument is the program's
    name; the description comes below the usage line)."""
    path = ROOT / (module_name.replace(".", "/") + ".py")
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    parser = parser_of(module_name, {**ENTRY_POINTS, **OTHER_ENTRY_POINTS}[module_name], monkeypatch)
    assert parser.format_usage().startswith(f"usage: {path.name} "), parser.format_usage()[:200]


@pytest.mark.parametrize("script", ["submitit_pretrain.py", "submitit_finetune.py"])
def test_the_slurm_launchers_usage_names_the_launcher(script, monkeypatch):
    from training.submitit_launch import launcher_parser
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    usage = launcher_parser("Submitit for DMJD pre-training").format_help()
    assert usage.startswith(f"usage: {script} ") and "\nSubmitit for DMJD pre-training\n" in usage, usage[:300]


def test_the_generic_slurm_launchers_help_is_its_own_flags():
    proc = subprocess.run([sys.executable, "-m", "training.submitit_launch", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: submitit_launch.py ") and "--ngpus" in proc.stdout


def test_submitit_launcher_help_shows_defaults():
    from training.submitit_launch import launcher_parser
    parser = launcher_parser("test")
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    assert all(a.help for a in parser._actions)


TRAINING_SCRIPTS = ["main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_segment.py"]


def run_without_torch(script: str, *flags: str, cwd=None) -> subprocess.CompletedProcess:
    """`python script flags...` in a process where importing torch fails: what answers here answers before torch
    is imported."""
    start = ("import runpy, sys; sys.modules['torch'] = None; "
             f"sys.argv = [{script!r}, *{list(flags)!r}]; runpy.run_path({script!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", start], cwd=cwd or ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_help_answers_before_torch_is_imported(script):
    proc = run_without_torch(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--data_path" in proc.stdout


@pytest.mark.parametrize("script, layout", [("main_pretrain.py", "no 'train/' folder"),
                                            ("main_finetune.py", "no 'train/' folder"),
                                            ("main_linprobe.py", "no 'train/' folder"),
                                            ("main_segment.py", "no 'images/training/' folder"),
                                            ("main_detect.py", "is not a file: expected COCO's instance annotations")])
def test_a_wrong_data_path_is_named_before_torch_and_before_any_output(script, layout, tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    missing = "is not a file" if script == "main_detect.py" else "is not a folder"
    for data, message in ((tmp_path / "missing", missing), (tmp_path / "data", layout)):
        proc = run_without_torch(script, "--data_path", str(data), "--output_dir", str(out))
        # detection names the file under --data_path that it reads first
        named = data / "annotations" / "instances_train2017.json" if script == "main_detect.py" else data
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line: no config dump, no traceback
        assert proc.stderr.startswith(f"error: --data_path {str(named)!r} ") and message in proc.stderr
        assert not out.exists()


ALL_TRAINING_SCRIPTS = TRAINING_SCRIPTS + ["main_detect.py"]


@pytest.mark.parametrize("script, flags, message", [
    ("main_pretrain.py", ["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1.0"),
    ("main_finetune.py", ["--smoothing", "1.5"], "--smoothing must be in [0, 1), got 1.5"),
    ("main_finetune.py", ["--drop_path", "1.5"], "--drop_path must be in [0, 1), got 1.5"),
    ("main_linprobe.py", ["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1.0"),
    ("main_segment.py", ["--drop_path", "1"], "--drop_path must be in [0, 1), got 1.0"),
    ("main_detect.py", ["--layer_decay", "0"], "--layer_decay must be in (0, 1], got 0.0"),
    *[(script, ["--allow_flag_changes", "lr,bogus"], "--allow_flag_changes 'bogus' is not a flag of this script")
      for script in ALL_TRAINING_SCRIPTS],
])
def test_a_flag_out_of_its_range_or_an_unknown_allowed_change_is_named_before_torch_and_before_the_data(
        script, flags, message, tmp_path):
    out = tmp_path / "out"
    proc = run_without_torch(script, *flags, "--data_path", str(tmp_path / "missing"), "--output_dir", str(out))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line: no traceback
    assert proc.stderr.startswith(f"error: {message}")  # the flag, not the missing --data_path checked after it
    assert not out.exists()


@pytest.mark.parametrize("script", ALL_TRAINING_SCRIPTS)
@pytest.mark.parametrize("name, message", [("--resume", "is not a file"),
                                           ("--finetune", "is neither a checkpoint file nor an export folder")])
def test_a_missing_checkpoint_is_named_before_torch_and_before_the_data(script, name, message, tmp_path):
    if name == "--finetune" and script == "main_pretrain.py":
        pytest.skip("pre-training starts from scratch: it has no --finetune")
    out, gone = tmp_path / "out", str(tmp_path / "gone.pth")
    proc = run_without_torch(script, name, gone, "--data_path", str(tmp_path / "missing"), "--output_dir", str(out))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {name} {gone!r} {message}"  # one line, before the missing --data_path
    assert not out.exists()


@pytest.mark.parametrize("script, model, stride, sizes", [
    ("main_pretrain", "dmjd_convit_mini_patch8_hog", 8, "56 or 64"),
    ("main_finetune", "convvit_tiny_patch16", 16, "48 or 64"),
    ("main_linprobe", "vit_test_patch16_gap_sincos", 16, "48 or 64"),
    ("main_segment", "convvit_tiny_patch16", 16, "48 or 64"),
    ("main_detect", "vit_test_patch16_gap_sincos", 16, "48 or 64"),
])
def test_an_input_size_off_the_models_stride_is_an_error_line_before_any_output(script, model, stride, sizes,
                                                                               tmp_path):
    module = importlib.import_module(script)
    out = tmp_path / "out"
    args = module.get_args_parser().parse_args(["--model", model, "--input_size", "60", "--device", "cpu",
                                                "--output_dir", str(out)])
    with pytest.raises(SystemExit) as stop:
        module.main(args)
    assert str(stop.value) == (f"error: --input_size 60 must be divisible by the model's stride, {stride} for --model "
                               f"{model} (e.g. {sizes})")
    assert not out.exists()


def test_fine_tuning_at_an_input_size_off_the_stride_prints_one_error_line_not_a_traceback(image_folder, tmp_path):
    data = image_folder("cli_input_size", {"train": 1, "val": 1})
    proc = subprocess.run([sys.executable, "main_finetune.py", "--model", "convvit_tiny_patch16", "--input_size", "60",
                           "--device", "cpu", "--data_path", str(data), "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: --input_size 60 must be divisible by the model's stride, 16 for --model "
                                   "convvit_tiny_patch16 (e.g. 48 or 64)")
    assert not (tmp_path / "out").exists()
