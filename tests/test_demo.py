"""The demo's commands: every one it prints can be pasted back and is accepted by the script it runs."""
import importlib
import os
import shlex

import pytest

import demo
import main_pretrain
from models_convvit import check_classifier_name


@pytest.fixture(scope="module")
def commands():
    args = demo.parse_args([])
    args.output_dir = os.path.join(demo.ROOT, "output_dir", "demo")
    return demo.stage_commands(args, os.path.join(demo.ROOT, "data", "fashion_mnist"),
                               os.path.join(demo.ROOT, "data", "fashion_mnist_probe20000"))


def test_the_demo_runs_and_suggests_every_stage(commands):
    assert list(commands) == ["pretrain", "probe_pretrained", "probe_random", "picture", "picture_3_views",
                              "finetune"]


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
