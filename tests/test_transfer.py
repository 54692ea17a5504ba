"""main_transfer.py and engine_transfer.py: the dry run's commands are the scripts' own, a check-suite run at toy
sizes writes a complete report, a finished task is not run again, a stopped one resumes, a failed one is reported
while the others complete, and a run folder of another run is named rather than reused."""
import importlib
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import engine_transfer
import main_transfer
from helpers import ROOT, pretrain_checkpoint, script_env, stop_with_signal, write_fashion_idx
from test_cli import run_without_torch

# The check suite at toy sizes: a few steps of each task on a few images, on the CPU.
TOY_FLAGS = {"all": "--num_workers 0 --device cpu --print_freq 1",
             "linprobe": "--epochs 1 --batch_size 8",
             "finetune": "--epochs 1 --batch_size 8 --warmup_epochs 0",
             "segment": "--iters 2 --eval_interval 2 --warmup_iters 1 --batch_size 2 --decoder_channels 8 "
                        "--aux_channels 8",
             "detect": "--iters 2 --eval_interval 2 --batch_size 2 --fpn_channels 8 --rois_per_image 8"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A pre-training checkpoint of the demo's model, Fashion-MNIST-like idx files (the probe's data is made from
    them by the command) and tiny canvas sets for segmentation and detection."""
    from util.demo_det_data import prepare_fashion_mnist_det
    from util.demo_seg_data import prepare_fashion_mnist_seg
    root = tmp_path_factory.mktemp("transfer")
    pretrain_checkpoint(root / "pre.pth", "dmjd_convit_mini_patch8_hog", img_size=32)
    idx = write_fashion_idx(root / "idx")
    prepare_fashion_mnist_seg(str(root / "seg"), [str(idx)], 8, 3)
    prepare_fashion_mnist_det(str(root / "det"), [str(idx)], 8, 3)
    return root


def toy_args(toy, out, *more, flags=TOY_FLAGS):
    args = ["--suite", "check", "--checkpoint", str(toy / "pre.pth"), "--output_dir", str(out), "--source",
            str(toy / "idx"), "--linprobe_data", str(toy / "probe"), "--finetune_data", str(toy / "probe"),
            "--segment_data", str(toy / "seg"), "--detect_data", str(toy / "det")]
    for task, given in flags.items():
        args += ["--task_flags", f"{task}: {given}"]
    return args + list(more)


def transfer(*args, timeout=300):
    return subprocess.run([sys.executable, "main_transfer.py", *args], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_help_answers_without_torch_and_names_the_four_transfers():
    proc = run_without_torch("main_transfer.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for script in ("main_linprobe.py", "main_finetune.py", "main_segment.py", "main_detect.py"):
        assert script in proc.stdout
    for flag in ("--checkpoint", "--output_dir", "--tasks", "--suite", "--launcher", "--dry_run", "--segment_data"):
        assert flag in proc.stdout


def script_and_flags(argv):
    """(script, its flags) of a printed command: plain, through training.launch (torchrun's parser takes its flags)
    or through training.submitit_launch (its launcher parser takes those before the script)."""
    assert argv[0] == sys.executable
    if argv[1:3] == ["-m", "training.launch"]:
        from torch.distributed.run import get_args_parser
        launched = get_args_parser().parse_args(argv[3:])
        assert launched.nproc_per_node == "8"
        return launched.training_script, launched.training_script_args
    if argv[1:3] == ["-m", "training.submitit_launch"]:
        from training.submitit_launch import launcher_parser
        at = next(i for i, arg in enumerate(argv) if arg.endswith(".py"))
        opts = launcher_parser("test").parse_args(argv[3:at])
        assert (opts.ngpus, opts.nodes, opts.partition) == (8, 1, "learn")
        return argv[at], argv[at + 1:]
    return argv[1], argv[2:]


@pytest.mark.parametrize("suite, launcher", [("paper", "local"), ("paper", "slurm"), ("check", "local")])
def test_the_dry_run_prints_each_runs_command_which_its_scripts_own_parser_takes(suite, launcher, tmp_path):
    checkpoints = [tmp_path / "a" / "checkpoint-399.pth", tmp_path / "b.pth"]
    for path in checkpoints:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    data = {task: tmp_path / task for task in engine_transfer.TASKS}
    for folder in data.values():
        folder.mkdir()
    out = tmp_path / "out"
    slurm = ["--slurm_flags", "--partition learn"] if launcher == "slurm" else []
    proc = transfer("--suite", suite, "--launcher", launcher, *slurm, "--checkpoint", *map(str, checkpoints),
                    "--output_dir", str(out), "--task_flags", "segment: --batch_size 4 --no-photometric",
                    "--dry_run", *[a for task, d in data.items() for a in (f"--{task}_data", str(d))])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 8  # one a line: four tasks of each checkpoint
    for line, (label, task) in zip(lines, [(label, task) for label in ("a_checkpoint-399", "b")
                                           for task in engine_transfer.TASKS]):
        script, flags = script_and_flags(shlex.split(line))
        assert script == f"main_{task}.py"
        args = importlib.import_module(f"main_{task}").get_args_parser().parse_args(flags)
        assert args.output_dir == str(out / label / task) and args.data_path == str(data[task])
        assert args.finetune == str(checkpoints[0] if label.startswith("a") else checkpoints[1])
        if task == "segment":
            assert args.batch_size == 4 and not args.photometric  # the flags given replace the recipe's
    assert not out.exists()  # a dry run writes nothing


def test_the_check_suite_at_toy_sizes_writes_a_complete_report_and_skips_finished_tasks(toy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    printed = transfer(*toy_args(toy, out, "--dry_run")).stdout.splitlines()
    proc = transfer(*toy_args(toy, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "check" and report["wall_seconds"] > 0
    identity = report["checkpoints"]["pre"]
    assert identity["sha256"] == engine_transfer.checkpoint_identity(str(toy / "pre.pth"))["sha256"]
    assert identity["saved"]["model"] == "dmjd_convit_mini_patch8_hog"
    for task in engine_transfer.TASKS:
        entry = report["runs"]["pre"][task]
        assert entry["status"] == "done" and entry["wall_seconds"] > 0
        assert all(isinstance(v, float) for v in entry["metrics"].values()) and entry["metrics"]
        log = [json.loads(line) for line in (out / "pre" / task / "log.txt").read_text().splitlines()]
        key = next(iter(engine_transfer.METRICS[task]))
        assert entry["scores"][key] == log[-1][key]
        assert entry["run_dir"] == str(out / "pre" / task) and entry["command"] in printed  # the dry run's command
        assert shlex.split(TOY_FLAGS[task])[0] in entry["flags_given"] and entry["departures"]
        assert (out / "curves" / f"{task}.png").is_file()
    markdown = (out / "REPORT.md").read_text()
    assert "| linear probe top-1 (%) |" in markdown and "documented, the demo's checkpoint" in markdown
    assert "| detection mask AP |" in markdown and "12.41" in markdown
    assert "data: num_val 3 (the check's 200)" in markdown
    for picture in ("curves/segment.png", "pictures/segment.png", "pictures/detect.png"):
        assert f"]({picture})" in markdown and (out / picture).is_file()

    # again: every task is done, so no command starts, and the report is written again
    started = []
    monkeypatch.setattr(engine_transfer, "execute", lambda run, stops: started.append(run))
    (out / "report.json").unlink()
    assert main_transfer.main(main_transfer.get_args_parser().parse_args(toy_args(toy, out))) == 0
    assert started == [] and (out / "report.json").is_file()
    assert all(len(json.loads((out / "pre" / t / "transfer.json").read_text())["attempts"]) == 1
               for t in engine_transfer.TASKS)


def test_a_task_stopped_midway_resumes_when_the_same_command_runs_again(toy, tmp_path):
    """Through training.launch (a recipe's GPUs: here one process on the CPU), as the paper suite runs its tasks."""
    out = tmp_path / "out"
    args = toy_args(toy, out, "--tasks", "segment", "--gpus", "1",
                    flags={**TOY_FLAGS, "segment": TOY_FLAGS["segment"].replace(
                        "--iters 2 --eval_interval 2", "--iters 20 --eval_interval 10")})
    cmd = [sys.executable, "main_transfer.py", *args]
    # the signal reaches main_transfer.py alone, which passes it on to the launcher, which passes it on to the
    # script: it saves the step it is in and exits 75 (the steps after the first leave time for the signal to get
    # there)
    said = stop_with_signal(cmd, script_env(), ROOT, "Iterations 0-10 [1/10]", signal.SIGTERM, status=75,
                            group=False)
    assert "run the same command again to resume" in said
    record = json.loads((out / "pre" / "segment" / "transfer.json").read_text())
    assert record["command"][1:5] == ["-m", "training.launch", "--nproc_per_node", "1"]
    assert record["status"] == "interrupted" and record["attempts"][-1]["exit_status"] == 75
    assert json.loads((out / "report.json").read_text())["runs"]["pre"]["segment"]["status"] == "interrupted"

    proc = transfer(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout  # the script's own resume, from its stop checkpoint
    record = json.loads((out / "pre" / "segment" / "transfer.json").read_text())
    assert record["status"] == "done" and [a["outcome"] for a in record["attempts"]] == ["interrupted", "done"]
    log = [json.loads(line) for line in (out / "pre" / "segment" / "log.txt").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [10, 20]


def test_a_failed_task_is_reported_with_its_error_and_the_others_still_run(toy, tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    args = toy_args(toy, out, "--tasks", "segment", "linprobe")
    args[args.index("--segment_data") + 1] = str(empty)  # no ADE20K layout: main_segment.py refuses it
    proc = transfer(*args)
    assert proc.returncode == 1
    runs = json.loads((out / "report.json").read_text())["runs"]["pre"]
    assert runs["segment"]["status"] == "failed" and "error: --data_path" in runs["segment"]["error"]
    assert runs["linprobe"]["status"] == "done" and runs["detect"]["status"] == "not requested"
    markdown = (out / "REPORT.md").read_text()
    assert "| pre | segment | failed |" in markdown and "has no 'images/training/' folder" in markdown


def test_a_run_folder_of_another_checkpoint_or_of_other_flags_is_named_not_reused(toy, tmp_path):
    out = tmp_path / "out"
    parsed = main_transfer.get_args_parser().parse_args(toy_args(toy, out, "--tasks", "segment"))
    run, = main_transfer.check_args(parsed)["runs"]
    identity = engine_transfer.checkpoint_identity(str(toy / "pre.pth"))
    record = {**engine_transfer.new_record(run, identity, None), "status": "done"}
    engine_transfer.write_record(run.run_dir, {**record, "flags": engine_transfer.merge_flags(run.flags,
                                                                                              ["--iters", "9"])})
    with pytest.raises(SystemExit, match=r"a finished segment run of other flags \(--iters 9 -> 2\)"):
        main_transfer.main(parsed)
    engine_transfer.write_record(run.run_dir, {**record, "checkpoint": {**identity, "sha256": "0" * 64}})
    with pytest.raises(SystemExit, match="holds the segment run of another checkpoint"):
        main_transfer.main(parsed)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "segment", "--task_flags", "segmentation: --iters 2"],
     "--task_flags 'segmentation: --iters 2': start with the task, one of"),
    (["--task_flags", "segment: iters 2"], "'iters' is no flag's value"),
    (["--labels", "a", "b"], "--labels gives 2 names for 1 checkpoints"),
    (["--model", "convvit_base_patch16"], "the check suite fine-tunes the demo's convvit_mini_patch8"),
    (["--doc", "FINETUNE.md"], "--doc FINETUNE.md: the check suite's report card goes into a markdown file's "
                               "transfer_check block"),
    (["--suite", "paper", "--tasks", "segment"], "--source is where the check suite makes its Fashion-MNIST sets"),
    (["--slurm_flags", "--partition learn"], "--slurm_flags are the jobs' flags: give them with --launcher slurm"),
])
def test_bad_input_is_named_before_anything_runs(argv, message, toy, tmp_path):
    parsed = main_transfer.get_args_parser().parse_args(toy_args(toy, tmp_path / "out", *argv, flags={}))
    with pytest.raises(SystemExit, match=message):
        main_transfer.main(parsed)
    assert not (tmp_path / "out").exists()


def test_the_paper_suites_data_must_be_there_before_any_run(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"")
    parsed = main_transfer.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "a.pth"), "--tasks", "detect",
                                                         "--detect_data", str(tmp_path / "coco")])
    with pytest.raises(SystemExit, match=f"--detect_data '{tmp_path / 'coco'}' is not a folder"):
        main_transfer.main(parsed)


def test_flags_given_replace_the_recipes_own_and_the_others_are_added():
    recipe = ["--iters", "400", "--photometric", "--img_scale", "64", "64", "--blr", "0.016"]
    merged = engine_transfer.merge_flags(recipe, ["--no-photometric", "--img_scale", "32", "32", "--iters", "2",
                                                  "--amp", "bf16"])
    assert merged == ["--iters", "2", "--no-photometric", "--img_scale", "32", "32", "--blr", "0.016", "--amp",
                      "bf16"]


def test_labels_follow_the_checkpoints_and_are_unique():
    assert engine_transfer.labels_of(["out/dmjd/checkpoint-399.pth", "mae_pretrain_vit_base.pth",
                                      "other/mae_pretrain_vit_base.pth", "export_folder/"]) == [
        "dmjd_checkpoint-399", "mae_pretrain_vit_base", "mae_pretrain_vit_base-2", "export_folder"]
    assert engine_transfer.labels_of(["a.pth", "b.pth"], ["DMJD 800 ETE", "MAE"]) == ["DMJD_800_ETE", "MAE"]


def test_slurm_submits_a_job_per_task_and_reads_each_back_once_it_ended(tmp_path, monkeypatch):
    (tmp_path / "a.pth").write_bytes(b"weights")
    recipes = engine_transfer.paper_recipes("convvit_base_patch16")
    runs = engine_transfer.plan(recipes, ["segment"], {"a": str(tmp_path / "a.pth")},
                                {t: str(tmp_path) for t in recipes}, str(tmp_path / "out"), {}, "slurm")
    identities = {"a": engine_transfer.checkpoint_identity(str(tmp_path / "a.pth"))}
    submitted, state = [], {"running": True}

    def submit(cmd, **kwargs):
        submitted.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "submitted job 4242: logs in ..., checkpoints in ...\n", "")

    monkeypatch.setattr(engine_transfer.subprocess, "run", submit)
    job_state = lambda run_dir, job: (state["running"], None)  # noqa: E731
    records = engine_transfer.run_slurm(runs, identities, job_state=job_state)
    assert records["a", "segment"]["status"] == "submitted" and len(submitted) == 1
    assert submitted[0][1:3] == ["-m", "training.submitit_launch"]
    records = engine_transfer.run_slurm(runs, identities, job_state=job_state)
    assert records["a", "segment"]["status"] == "submitted" and len(submitted) == 1  # queued: not again
    state["running"] = False
    (Path(runs[0].run_dir) / "log.txt").write_text(json.dumps({"iteration": 16000, "test_mIoU": 51.2}) + "\n")
    records = engine_transfer.run_slurm(runs, identities, job_state=job_state)
    assert records["a", "segment"]["status"] == "done" and len(submitted) == 1
    assert records["a", "segment"]["scores"]["test_mIoU"] == 51.2


@pytest.mark.parametrize("doc, block, task, key", [("README.md", "demo_results", "linprobe", "test_acc1"),
                                                    ("FINETUNE.md", "demo_finetune", "finetune", "test_acc1"),
                                                    ("SEGMENT.md", "segmentation_check", "segment", "test_mIoU"),
                                                    ("DETECT.md", "detection_check", "detect", "test_bbox_AP"),
                                                    ("DETECT.md", "detection_check", "detect", "test_segm_AP")])
def test_the_check_suites_references_are_the_figures_its_docs_show(doc, block, task, key):
    text = (ROOT / doc).read_text()
    shown = text.split(f"<!-- {block} -->", 1)[1].split(f"<!-- /{block} -->", 1)[0]
    for reference in engine_transfer.CHECK_REFERENCES:
        value = reference.scores.get((task, key))
        for number in (value if isinstance(value, tuple) else [value] if value is not None else []):
            assert f"{number:.2f}" in shown, f"{reference.title}: {number} is not in {doc}'s {block} block"


def test_a_paper_report_sets_the_numbers_beside_the_paper_and_the_anchors():
    rows = engine_transfer.report_rows(["mine"], {("mine", "finetune"): {"status": "done",
                                                                         "scores": {"test_acc1": 84.91}}},
                                       engine_transfer.references("paper", "convvit_base_patch16"))
    assert rows[0] == "|  | mine | DMJD, paper (800 ETE) | ConvMAE-B, anchor (1600 ETE) |"
    assert "| fine-tune top-1 (%) | 84.91 | 85.20 | 85.00 |" in rows
    assert "| segmentation mIoU (%) |  |  | 51.70 |" in rows
    assert "| detection mask AP |  |  | 47.10 |" in rows


def test_compare_adds_the_checkpoints_of_an_earlier_report_as_columns(tmp_path):
    """--compare DIR: the runs of an earlier report join the table under a label of their own."""
    (tmp_path / "a.pth").write_bytes(b"a")
    recipes = engine_transfer.paper_recipes("convvit_base_patch16")
    run, = engine_transfer.plan(recipes, ["linprobe"], {"mine": str(tmp_path / "a.pth")},
                                {t: str(tmp_path) for t in recipes}, str(tmp_path / "earlier"), {})
    identity = engine_transfer.checkpoint_identity(str(tmp_path / "a.pth"))
    engine_transfer.write_record(run.run_dir, {**engine_transfer.new_record(run, identity, None), "status": "done",
                                               "scores": {"test_acc1": 75.5}})
    earlier = {"checkpoints": {"mine": identity},
               "runs": {"mine": {"linprobe": {"status": "done", "run_dir": run.run_dir},
                                 **{t: {"status": "not requested"} for t in ("finetune", "segment", "detect")}}}}
    checkpoints, records = main_transfer.compared_records({"earlier": earlier}, ["mine"])
    assert list(checkpoints) == ["mine-2"] and records["mine-2", "linprobe"]["scores"]["test_acc1"] == 75.5
    rows = engine_transfer.report_rows(["mine", "mine-2"], records, [])
    assert "| linear probe top-1 (%) |  | 75.50 |" in rows
