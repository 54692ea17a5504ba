"""The demo's commands: every one it prints can be pasted back and is accepted by the script it runs."""
import importlib
import os
import re
import shlex
import sys

import pytest

import demo
import main_pretrain
from dmjd_encoders.models_convvit import check_classifier_name


@pytest.fixture(scope="module")
def commands():
    args = demo.parse_args([])
    args.output_dir = os.path.join(demo.ROOT, "output_dir", "demo")
    return demo.stage_commands(args, os.path.join(demo.ROOT, "data", "fashion_mnist"),
                               os.path.join(demo.ROOT, "data", "fashion_mnist_probe20000"))


def test_the_demo_runs_and_suggests_every_stage(commands):
    assert list(commands) == ["pretrain", "probe_pretrained", "probe_random", "picture", "picture_3_views",
                              "finetune", "tensorboard"]


@pytest.mark.parametrize("stage", ["pretrain", "probe_pretrained", "probe_random", "picture", "picture_3_views",
                                   "finetune"])
def test_each_printed_command_pastes_back_and_parses(commands, stage):
    cmd = commands[stage]
    printed = demo.command_line(cmd)
    assert shlex.split(printed) == cmd  # the shell gives the script exactly these arguments
    assert all(arg.strip() for arg in cmd), f"an empty argument in {printed}"
    script = importlib.import_module(cmd[1].removesuffix(".py"))
    args = script.get_args_parser().parse_args(cmd[2:])
    if script is main_pretrain:
        main_pretrain.validate_args(args)
    elif cmd[1] in ("main_finetune.py", "main_linprobe.py"):
        check_classifier_name(args.model)
        assert args.warmup_epochs <= args.epochs


def test_every_printed_command_starts_as_printed(commands):
    """The program, script or module of each command the demo runs or suggests is there: TensorBoard runs from the
    demo's own interpreter (demo.sh's .venv puts no `tensorboard` on the shell's PATH)."""
    assert commands["tensorboard"][1:3] == ["-m", "tensorboard.main"]
    for name, cmd in commands.items():
        assert demo.start_problem(cmd) is None, f"{name}: {demo.command_line(cmd)}"
    assert demo.start_problem(["no-such-program", "--help"]) == "no-such-program is not an executable program"
    assert "has no module no_such_module" in demo.start_problem([commands["tensorboard"][0], "-m", "no_such_module"])


def documented_demo_commands():
    """The commands that SEGMENT.md's CPU check and demo.sh print for the demo's environment, split as the shell
    splits them."""
    text = open(os.path.join(demo.ROOT, "SEGMENT.md")).read()
    block = text.split("## A small check on a CPU", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0] for line in block.replace("\\\n", " ").splitlines()]
    ready = re.search(r"ready: run the tests with +(.*)\"", open(os.path.join(demo.ROOT, "demo.sh")).read()).group(1)
    inline = [found for doc in ("README.md", "FINETUNE.md", "SEGMENT.md")  # `.venv/bin/python ...` in the text
              for found in re.findall(r"(\.venv/bin/python [^`]+)`", open(os.path.join(demo.ROOT, doc)).read())]
    return [shlex.split(line) for line in [*lines, ready, *inline] if line.strip()]


def test_documented_demo_commands_start_in_the_demos_environment():
    """SEGMENT.md's check, demo.sh's test command and the docs' `.venv/bin/python ...` commands use the interpreter demo.sh creates (`.venv/bin/python`, no bare
    `python`, which stock Debian lacks), and start with it; without a .venv here, this interpreter (holding the same
    requirements) stands in for it."""
    venv_python = re.search(r"^VENV_PYTHON=(\S+)", open(os.path.join(demo.ROOT, "demo.sh")).read(), re.M).group(1)
    found = documented_demo_commands()
    assert any("benchmarks.segmentation_check" in cmd for cmd in found)
    assert any("tensorboard.main" in cmd for cmd in found)  # README's quick start
    for cmd in found:
        assert cmd[0] in ("bash", venv_python), f"{shlex.join(cmd)} does not run in the demo's environment"
        if cmd[0] == venv_python and not os.path.exists(os.path.join(demo.ROOT, venv_python)):
            cmd = [sys.executable, *cmd[1:]]
        assert demo.start_problem(cmd) is None, shlex.join(cmd)


def test_paths_with_spaces_are_quoted(commands):
    cmd = commands["pretrain"] + ["--output_dir", "my runs/demo"]
    assert shlex.split(demo.command_line(cmd)) == cmd


def test_finetune_md_shows_the_command_the_demo_suggests(commands):
    """FINETUNE.md's first run at demo size is the demo's third next step, flag for flag (the documented result was
    measured with it)."""
    text = open(os.path.join(demo.ROOT, "FINETUNE.md")).read()
    section = text.split("## A first run at demo size", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    assert shlex.split(block.replace("\\\n", " "))[1:] == commands["finetune"][1:]


def test_the_curves_command_pastes_back_and_draws_the_pretraining_log(tmp_path):
    import plot_logs
    args = demo.parse_args(["--output_dir", str(tmp_path / "demo")])
    cmd = demo.curves_command(args)
    assert shlex.split(demo.command_line(cmd)) == cmd and cmd[1] == "plot_logs.py"
    parsed = plot_logs.parse_args(cmd[2:])
    (tmp_path / "demo" / "pretrain").mkdir(parents=True)
    (tmp_path / "demo" / "pretrain" / "log.txt").write_text('{"train_loss": 1.0, "train_lr": 0.001, "epoch": 0}\n')
    plot_logs.main(parsed)
    assert (tmp_path / "demo" / "pretrain_curves.png").is_file()
