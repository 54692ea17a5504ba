"""What the documentation promises about the repository: the outputs of its commands stay out of git."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
OUTPUT_FLAGS = r"--(?:output_dir|output|out|root)"


def documented_outputs():
    """Relative paths that documented commands write (absolute ones are the user's own folders)."""
    found = set()
    for doc in DOCS:
        for path in re.findall(OUTPUT_FLAGS + r"[ =]([\w./-]+)", doc.read_text()):
            if not path.startswith(("/", "docs/", "$")):
                found.add(path.rstrip("."))
    return sorted(found)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_outputs_of_documented_commands_are_ignored_by_git():
    outputs = documented_outputs()
    assert "vis.png" in outputs and "out/dmjd_convit_b" in outputs  # the scan finds the README's commands
    for path in outputs:
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert result.returncode == 0, f"{path} (written by a documented command) is not git-ignored"


def test_pretrain_md_asks_slurm_for_a_stop_signal_to_every_step_and_requeues_on_the_launchers_status():
    """The batch script of PRETRAIN.md, "Preemption and requeueing without submitit": the signal it asks for is one
    the run stops on, sent to the job's steps (not `B:`, the batch shell alone), the launcher is the one the tests
    signal (tests/test_pretrain.py) with flags torchrun's parser takes, and the status it requeues on is the run's."""
    import shlex

    from torch.distributed.run import get_args_parser

    import main_pretrain
    from training.errors import REQUEUE_EXIT_CODE
    text = (ROOT / "PRETRAIN.md").read_text()
    script = re.search(r"### Preemption and requeueing without submitit.*?```bash\n(.*?)```", text, re.S).group(1)
    signal_name = re.search(r"#SBATCH .*--signal=(\S+)@\d+", script).group(1)
    assert not signal_name.startswith("B:")
    assert signal_name in main_pretrain.get_args_parser().get_default("stop_signals").split(",")
    srun = shlex.split(re.search(r"^srun (.*?)(?<!\\)$", script.replace("\\\n", " "), re.M).group(1))
    assert srun[:3] == ["python", "-m", "training.launch"]
    launched = get_args_parser().parse_args(srun[3:])
    assert launched.training_script == "main_pretrain.py"
    main_pretrain.get_args_parser().parse_args(launched.training_script_args)
    assert f"[ $status -eq {REQUEUE_EXIT_CODE} ] && scontrol requeue" in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="runs the batch script with bash")
def test_pretrain_mds_batch_script_requeues_a_job_stopped_while_it_starts(tmp_path):
    """The batch script run as SLURM would (srun starting its command, scontrol recording the requeue), on a tiny
    folder, stopped with its signal while the training processes start (importing torch, building the model): the
    run exits with 75 having written nothing, and the script requeues the job."""
    import os
    import signal
    import sys
    import time

    from helpers import write_image_folder
    from training.launch import child_pids
    text = (ROOT / "PRETRAIN.md").read_text()
    script = re.search(r"### Preemption and requeueing without submitit.*?```bash\n(.*?)```", text, re.S).group(1)
    signal_name = re.search(r"#SBATCH .*--signal=(\S+)@\d+", script).group(1)
    data, out = write_image_folder(tmp_path / "data", {"train": 4}), tmp_path / "out"
    script = (script.replace("/path/to/imagenet", str(data)).replace("/shared/out/dmjd_convit_b", str(out))
              .replace("--nproc_per_node=8", "--nproc_per_node=2").replace("python ", f"{sys.executable} "))
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (shims / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.txt"}\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    job = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    signum = getattr(signal, "SIG" + signal_name)

    def catches(pid: int) -> bool:
        """The process has installed its handler of the signal (a script's first line: training.signals); before
        that, the interpreter itself is still starting, which no script can cover."""
        try:
            with open(f"/proc/{pid}/status") as f:
                mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False
        return bool(int(mask, 16) >> (signum - 1) & 1)

    deadline, step = time.time() + 60, []
    while time.time() < deadline and len(step) < 3:  # until the launcher has started its two training processes
        step = [(launcher, child_pids(launcher)) for launcher in child_pids(job.pid)]
        step = [pid for launcher, workers in step if len(workers) == 2 for pid in [launcher, *workers]]
        step = step if all(catches(pid) for pid in step) else []
        time.sleep(0.05)
    assert len(step) == 3, "the launcher and its two training processes did not start within 60 s"
    for pid in step:  # SLURM's --signal without B: every process of the job's steps, not the batch shell
        os.kill(pid, signum)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 75, output
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert not out.exists() or not any(out.iterdir()), output  # nothing written


# --- every documented command, as written after the quick start ---------------------------------------------------

TASK_DOCS = ("README.md", "PRETRAIN.md", "FINETUNE.md", "SEGMENT.md", "DETECT.md")
QUICK_START = [["bash", "demo.sh"], ["source", ".venv/bin/activate"]]


def bash_blocks(doc: str):
    return re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S)


PROGRAMS = ("python", ".venv/bin/python", "bash", "torchrun", "pip", "source", "docker")


def documented_commands():
    """(doc, argument list) of each command of the README and the task docs: the lines of their bash blocks
    (continued lines joined, comments dropped) and the inline code that starts with a program and has arguments, but
    no placeholder (`CHECKPOINT`, `[--key teacher]`, `<index>`); `&&` chains split. Left out: batch scripts (`#!`, run
    by SLURM on a cluster, tested above) and what runs in Docker (the image's environment: tests/test_docker.py)."""
    import shlex
    for doc in TASK_DOCS:
        text = (ROOT / doc).read_text()
        lines = []
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            if not block.startswith("#!"):
                lines += [re.sub(r"(^|\s)#.*$", "", line) for line in block.replace("\\\n", " ").splitlines()]
        for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            words = span.split()
            if len(words) > 1 and words[0] in PROGRAMS and not re.search(r"[<\[]|\b[A-Z]{3,}\b(?!\.)", span):
                lines.append(span)
        for line in lines:
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                command = shlex.split(part)
                if command[0] != "docker":
                    yield doc, command


def caught_parser(entry):
    """The parser that `entry([])` builds, caught as it parses (before it does any work)."""
    import argparse

    class Caught(Exception):
        pass

    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise Caught

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(Caught):
            entry([])
    return caught[0]


def parse_as_the_script_does(module_name: str, argv):
    """The script's or module's own parsing of `argv` (not the checks that read files: the docs' paths are
    examples)."""
    import importlib
    module = importlib.import_module(module_name)
    if module_name == "submitit_pretrain":  # the launcher's flags, then main_pretrain's
        import main_pretrain
        from training.submitit_launch import parse_args
        parse_args(main_pretrain, module_name, argv)
    elif hasattr(module, "get_args_parser"):
        module.get_args_parser().parse_args(argv)
    elif hasattr(module, "parse_args"):
        module.parse_args(argv)
    else:  # a main(argv) that parses, then works: only its parser runs
        caught_parser(module.main).parse_args(argv)


def check_python_command(argv) -> None:
    """`python SCRIPT ARGS` or `python -m MODULE ARGS` from the checkout: the script or module is there and takes
    the arguments."""
    import importlib.util
    if argv[0] == "-m":
        assert importlib.util.find_spec(argv[1]) is not None, f"no module {argv[1]}"
        if argv[1].startswith(("benchmarks.", "util.")):
            parse_as_the_script_does(argv[1], argv[2:])
    else:
        assert (ROOT / argv[0]).is_file(), f"no script {argv[0]}"
        parse_as_the_script_does(argv[0].removesuffix(".py"), argv[1:])


def test_the_quick_start_makes_and_activates_the_environment_the_commands_run_in():
    """After `bash demo.sh`, `source .venv/bin/activate` puts the environment's python, pip and torchrun (demo.sh
    adds one when the system's PyTorch is reused) first: the docs' bare `python`, `pip` and `torchrun` are its."""
    import shlex
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1)
    assert [shlex.split(line) for line in block.splitlines()] == QUICK_START
    demo_sh = (ROOT / "demo.sh").read_text()
    assert "-m venv" in demo_sh and "add_torchrun\n" in demo_sh


def test_every_command_of_the_docs_runs_as_written_after_the_quick_start(monkeypatch):
    """Each command of the README's and the task docs' bash blocks starts a program that the quick start provides,
    and the script it runs takes its flags (paths like /path/to/imagenet are the reader's to fill in)."""
    from torch.distributed.run import get_args_parser as torchrun_parser
    monkeypatch.chdir(ROOT)  # the docs' commands run from the checkout's root
    seen = set()
    for doc, command in documented_commands():
        program, argv = command[0], command[1:]
        seen.add(program)
        where = f"{doc}: {' '.join(command)}"
        try:
            if command in QUICK_START:
                continue
            if program in ("python", ".venv/bin/python"):
                check_python_command(argv)
            elif program == "torchrun":
                launched = torchrun_parser().parse_args(argv)
                check_python_command([launched.training_script, *launched.training_script_args])
            elif program == "bash":
                assert argv[0] == "demo.sh", "the only shell script the docs run is demo.sh"
                if argv[1:] != ["--setup"]:
                    parse_as_the_script_does("demo", argv[1:])  # its other arguments go to demo.py
            elif program == "pip":
                assert argv[0] in ("install", "list", "check")
            else:
                raise AssertionError(f"{program} is not a program that the quick start provides")
        except SystemExit as err:
            raise AssertionError(f"{where}: the script refuses its arguments ({err})") from None
        except AssertionError as err:
            raise AssertionError(f"{where}: {err}") from None
    assert {"python", "torchrun", "bash", "pip", ".venv/bin/python"} <= seen  # the scan reads every kind


# The blocks of small-scale figures in the docs, and the module whose `--doc` rewrites each.
FIGURE_BLOCKS = {"demo_results": "demo", "demo_finetune": "demo", "segmentation_check": "benchmarks.segmentation_check",
                 "segmentation_step": "benchmarks.segmentation_step", "detection_check": "benchmarks.detection_check",
                 "detection_step": "benchmarks.detection_step", "transfer_check": "main_transfer",
                 "convergence_summary": "benchmarks.convergence"}


def test_each_block_of_figures_is_rewritten_by_a_command_the_doc_shows():
    """Every block of figures in the README and the task docs has, in the same doc, the command that regenerates it:
    one of the module that writes that block, with `--doc` naming the doc."""
    from benchmarks.doc_block import block_names
    rewriters = {}  # (doc, module) of every documented command with --doc
    for doc, command in documented_commands():
        if "--doc" not in command:
            continue
        module = ("demo" if command[:2] == ["bash", "demo.sh"] else
                  command[command.index("-m") + 1] if "-m" in command else command[1].removesuffix(".py"))
        for target in command[command.index("--doc") + 1:]:
            if target.startswith("--"):
                break
            rewriters.setdefault(target, set()).add(module)
    found = {(doc, name) for doc in TASK_DOCS for name in block_names(str(ROOT / doc))}
    assert {("README.md", "demo_results"), ("FINETUNE.md", "demo_finetune"), ("SEGMENT.md", "segmentation_check"),
            ("SEGMENT.md", "segmentation_step")} <= found
    for doc, name in found:
        assert FIGURE_BLOCKS[name] in rewriters.get(doc, set()), f"{doc}'s {name} block: no command rewrites it"


def test_no_doc_shows_this_machines_interpreter_or_home():
    """The blocks that commands rewrite show commands as the docs write them (`python ...`), never the path of the
    interpreter that ran them."""
    import os
    import sys
    docs = [*TASK_DOCS, *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
    for doc in docs:
        text = (ROOT / doc).read_text()
        for path in (sys.executable, os.path.dirname(sys.executable), os.path.expanduser("~") + "/"):
            assert path not in text, f"{doc} shows {path}"
