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


def test_a_new_run_replaces_the_runs_the_demo_made_and_keeps_the_others(tmp_path):
    """The fine-tuning that the demo's third next step writes into its folder, and anything else there, survive
    the next demo; the runs the demo made are replaced by fresh ones."""
    out = tmp_path / "demo"
    demo.clear_runs(str(out), ["pretrain", "probe_pretrained"])  # a first demo
    for name in ("pretrain", "probe_pretrained", "finetune", "mine"):
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "log.txt").write_text("{}\n")
    demo.clear_runs(str(out), ["pretrain", "probe_pretrained"])
    assert not (out / "pretrain").exists() and not (out / "probe_pretrained").exists()
    assert (out / "finetune" / "log.txt").is_file() and (out / "mine" / "log.txt").is_file()
    assert demo.made_by_demo(str(out)) == ["pretrain", "probe_pretrained"]


def test_a_run_folder_the_demo_did_not_make_stops_it_before_anything_is_removed(tmp_path):
    out = tmp_path / "demo"
    demo.clear_runs(str(out), ["pretrain"])
    (out / "pretrain").mkdir()
    (out / "finetune").mkdir()  # written by the third next step, not by the demo
    with pytest.raises(SystemExit, match=r"finetune is not a run that the demo made .*Move it away"):
        demo.clear_runs(str(out), ["pretrain", "finetune"])  # a demo with --finetune
    assert (out / "pretrain").is_dir() and (out / "finetune").is_dir()


FIGURES = {"command": "bash demo.sh --doc README.md FINETUNE.md", "provenance": "2031-01-02, 3 CPU cores (3 threads), "
           "torch 9.9.9", "pretrain_epochs": 2, "pretrain_images": 60000, "probe_epochs": 2, "probe_train": 20000,
           "probe_pretrained": 71.234, "probe_random": 55.5, "finetune": [70.1, 76.2, 79.87],
           "minutes": {"environment": 0.25, "pretrain": 6.83, "probe_pretrained": 1.2, "probe_random": 1.1,
                       "demo": 10.47, "finetune": 3.52}}


def test_the_docs_blocks_get_the_runs_figures_and_nothing_else(tmp_path):
    """`--doc README.md FINETUNE.md` on copies of the two docs, with the figures of a tiny made-up run: each
    block holds them, with the command and the machine and torch they came from; the rest of each doc is as it was."""
    import re
    docs = [tmp_path / "README.md", tmp_path / "FINETUNE.md"]
    for doc in docs:
        doc.write_text(open(os.path.join(demo.ROOT, doc.name)).read())
    demo.write_docs([str(doc) for doc in docs], FIGURES)
    readme, finetune = (doc.read_text() for doc in docs)
    table = readme.split("<!-- demo_results -->", 1)[1].split("<!-- /demo_results -->", 1)[0]
    assert "`bash demo.sh --doc README.md FINETUNE.md` (2031-01-02, 3 CPU cores (3 threads), torch 9.9.9)" in table
    assert "| linear probe of the pre-trained encoder (2 epochs, 20,000 images) | 71.23% top-1 | 1.2 |" in table
    assert "| linear probe of the same encoder, randomly initialised | 55.50% top-1 | 1.1 |" in table
    assert "| the demo in all (with its data, curves and picture) | +15.73 points from pre-training | 10.5 |" in table
    assert "| fine-tuning, the third next step (3 epochs; FINETUNE.md) | 79.87% top-1 | 3.5 |" in table
    text = finetune.split("<!-- demo_finetune -->", 1)[1].split("<!-- /demo_finetune -->", 1)[0]
    assert "**79.87%** top-1 on the 10,000 test images (70.10, 76.20 and 79.87% after epochs 1 to 3)" in text
    assert "torch 9.9.9" in text and "71.23% against 55.50%" in text
    assert "shared the machine" not in readme + finetune  # no load recorded: no note
    for doc in docs:  # outside the blocks, nothing changed
        original = open(os.path.join(demo.ROOT, doc.name)).read()
        assert re.sub(r"<!-- (\w+) -->.*?<!-- /\1 -->", "", doc.read_text(), flags=re.S) == \
            re.sub(r"<!-- (\w+) -->.*?<!-- /\1 -->", "", original, flags=re.S)


def test_doc_is_checked_before_the_demo_runs_and_runs_the_finetuning_too(tmp_path):
    args = demo.parse_args(["--doc", os.path.join(demo.ROOT, "README.md"), os.path.join(demo.ROOT, "FINETUNE.md")])
    assert args.finetune  # FINETUNE.md's figures are the fine-tuning's
    (tmp_path / "NOTES.md").write_text("no block here\n")
    with pytest.raises(SystemExit):
        demo.parse_args(["--doc", str(tmp_path / "NOTES.md")])


def test_figures_made_on_a_busy_machine_say_so_beside_their_minutes(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(open(os.path.join(demo.ROOT, "README.md")).read())
    demo.write_docs([str(doc)], dict(FIGURES, load=2.5, cores=3))  # below the cores: a quiet machine
    assert "shared the machine" not in doc.read_text()
    demo.write_docs([str(doc)], dict(FIGURES, load=7.25, cores=2))
    table = doc.read_text().split("<!-- demo_results -->", 1)[1].split("<!-- /demo_results -->", 1)[0]
    assert "(5-minute load average up to 7.2 on 2 cores): the minutes are longer than the demo takes alone" in table
