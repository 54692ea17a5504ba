"""The transfer report card of pre-trained checkpoints, in one command: the four transfers that judge an encoder, each
run by its own script with its recipe, and one table of their numbers beside the paper's and the anchors'.

    python main_transfer.py --checkpoint out/dmjd_convit_b/checkpoint-399.pth --output_dir out/transfer_convit_b \\
        --linprobe_data /path/to/imagenet --finetune_data /path/to/imagenet \\
        --segment_data /path/to/ADEChallengeData2016 --detect_data /path/to/coco
    python main_transfer.py --suite check --checkpoint output_dir/demo/pretrain/checkpoint-last.pth \\
        --output_dir output_dir/transfer_check

Each checkpoint's task runs in `<output_dir>/<checkpoint label>/<task>`: a finished one is not run again, an
interrupted one resumes from its checkpoint when the same command runs again (the script's own resume), a failed one
is reported with its error and the others still run. report.json and REPORT.md hold the numbers, the runs, their
curves and the checks' pictures. See README.md, "The transfer report".
"""
if __name__ == "__main__":  # first: a stop signal while the command starts ends it at once, nothing run (status 75)
    from training.signals import handle_from_start
    handle_from_start([])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

import engine_transfer  # noqa: E402  (imports no torch: the runs are subprocesses)
from engine_transfer import DONE, FAILED, INTERRUPTED, NOT_RUN, SUITES, TASKS  # noqa: E402
from util.demo_commands import ROOT, shown  # noqa: E402

DOC_BLOCK = "transfer_check"  # the README's block of the check suite's report card (--doc)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "main_transfer.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The transfer report of pre-trained checkpoints: the four transfers, linear probe "
                    "(main_linprobe.py), fine-tuning (main_finetune.py), semantic segmentation (main_segment.py) and "
                    "detection (main_detect.py), each with its recipe, and one report (report.json, REPORT.md). "
                    "Commands run from the repository's root; a finished task is not run again, an interrupted one "
                    "resumes when the same command runs again.")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                   help="pre-trained checkpoints (pre-training's, an export folder or .pth of export_encoder.py, the "
                        "authors' release): each is one column of the report")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="a name per checkpoint, its runs' folder and column (none: its file name)")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                   help="--output_dir of earlier reports of the same suite, whose checkpoints join this report's "
                        "table (their runs are read, not run)")
    p.add_argument("--output_dir", default=os.path.join("output_dir", "transfer"),
                   help="the runs (<label>/<task>), report.json and REPORT.md")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                   help="the transfers to run (those run before in --output_dir are reported too)")
    p.add_argument("--suite", default="paper", choices=list(SUITES),
                   help="paper: the recipes and data of the paper's tables (ImageNet-1K, ADE20K, COCO; 8 GPUs a "
                        "task); check: the small Fashion-MNIST checks that run on a CPU (data made on first use)")
    p.add_argument("--model", default=None,
                   help="the encoder's classifier or backbone name (none: the suite's, convvit_base_patch16 for "
                        "paper, convvit_mini_patch8 for check); the paper suite has the recipes of ConViT-B, ConViT-L "
                        "and ViT-B")
    for task, data in (("linprobe", "an ImageFolder root (train/, val/)"),
                       ("finetune", "an ImageFolder root (train/, val/)"),
                       ("segment", "a dataset root in ADE20K's layout"), ("detect", "a dataset root in COCO's layout")):
        p.add_argument(f"--{task}_data", default=None, metavar="PATH",
                       help=f"{task}'s data, {data} (none: the suite's; paper: the script's default, check: the "
                            f"check's own set, made there if missing)")
    p.add_argument("--source", default=None, help="check suite: folder of the Fashion-MNIST idx files (none: the "
                                                  "demo's, /usr/share/datasets/fashion-mnist)")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="local: one task after another, each through the scripts' launcher (python -m training.launch "
                        "on GPUs); slurm: a submitit job per task with its recipe's GPUs (python -m "
                        "training.submitit_launch); run the same command again to read back the jobs that ended")
    p.add_argument("--gpus", default=None, type=int,
                   help="GPUs (processes) of every task (none: the recipe's, 8 for paper, one process for check); the "
                        "batch per GPU stays the recipe's unless --task_flags changes it")
    p.add_argument("--slurm_flags", default="", help="training.submitit_launch's flags for every job, e.g. "
                                                     "'--partition learn --timeout 2880'")
    p.add_argument("--task_flags", action="append", default=[], metavar="TASK:FLAGS",
                   help="flags in place of (or added to) the recipe's, for a task or `all`, e.g. --task_flags "
                        "'segment: --batch_size 4 --iters 80000'; the report lists them (repeatable)")
    p.add_argument("--dry_run", action="store_true",
                   help="print each run's command, one a line, and exit: nothing is written or run")
    p.add_argument("--doc", default=None,
                   help=f"check suite: a markdown file whose {DOC_BLOCK} block gets the report card and its wall time "
                        f"(README.md)")
    return p


class Problem(Exception):
    """Input that stops the command before any run, said as `error: <message>`."""


def has_block(path: str) -> bool:
    """Whether the markdown file `path` holds the lines <!-- DOC_BLOCK --> and <!-- /DOC_BLOCK --> (read as
    benchmarks.doc_block reads them, whose module loads torch)."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        lines = f.read().splitlines()
    return f"<!-- {DOC_BLOCK} -->" in lines and f"<!-- /{DOC_BLOCK} -->" in lines


def parse_task_flags(given_flags) -> dict:
    """--task_flags 'TASK: FLAGS' ...: {task or "all": its flags}, a task given twice merged (the later flag wins)."""
    task_flags = {}
    for given in given_flags:
        task, colon, flags = given.partition(":")
        task = task.strip()
        if not colon or task not in (*TASKS, "all"):
            raise Problem(f"--task_flags {given!r}: start with the task, one of {', '.join(TASKS)} or all, and a "
                          f"colon, e.g. 'segment: --batch_size 4'")
        try:
            tokens = shlex.split(flags)
            engine_transfer.flag_groups(tokens)
        except ValueError as err:
            raise Problem(f"--task_flags {given!r}: {err}") from None
        task_flags[task] = engine_transfer.merge_flags(task_flags.get(task, []), tokens)
    return task_flags


def earlier_report(folder: str, suite: str) -> dict:
    """--compare's folder: the report.json main_transfer.py wrote there, of the same suite."""
    report = os.path.join(folder, "report.json")
    if not os.path.isfile(report):
        raise Problem(f"--compare {folder!r} holds no report.json of main_transfer.py")
    with open(report) as f:
        earlier = json.load(f)
    if earlier["suite"] != suite:
        raise Problem(f"--compare {folder!r} is a report of the {earlier['suite']} suite, not {suite}")
    return earlier


def check_args(args) -> dict:
    """Every input checked before anything runs or is written; returns what the runs need."""
    recipes_of, default_model = SUITES[args.suite]
    model = args.model or default_model
    try:
        recipes = recipes_of(model)
    except ValueError as err:
        raise Problem(str(err)) from None
    for path in args.checkpoint:
        if not os.path.exists(path):
            raise Problem(f"--checkpoint {path!r} is neither a checkpoint file nor an export folder")
    if args.labels is not None and len(args.labels) != len(args.checkpoint):
        raise Problem(f"--labels gives {len(args.labels)} names for {len(args.checkpoint)} checkpoints")
    task_flags = parse_task_flags(args.task_flags)
    if args.gpus is not None and args.gpus < 0:
        raise Problem(f"--gpus must be >= 0, got {args.gpus}")
    if args.slurm_flags and args.launcher != "slurm":
        raise Problem("--slurm_flags are the jobs' flags: give them with --launcher slurm")
    if args.source and args.suite != "check":
        raise Problem("--source is where the check suite makes its Fashion-MNIST sets from: the paper suite reads "
                      "its data as it is")
    try:
        slurm_flags = shlex.split(args.slurm_flags)
    except ValueError as err:
        raise Problem(f"--slurm_flags {args.slurm_flags!r}: {err}") from None
    data = {}
    for task in TASKS:
        given = getattr(args, f"{task}_data")
        data[task] = os.path.abspath(given) if given else os.path.join(ROOT, recipes[task].data)
        if task in args.tasks and recipes[task].prepare is None and not os.path.isdir(data[task]):
            raise Problem(f"--{task}_data {data[task]!r} is not a folder")
    if args.doc and (args.suite != "check" or not has_block(args.doc)):
        raise Problem(f"--doc {args.doc}: the check suite's report card goes into a markdown file's {DOC_BLOCK} block "
                      f"(the lines <!-- {DOC_BLOCK} --> and <!-- /{DOC_BLOCK} -->)")
    compared = {folder: earlier_report(folder, args.suite) for folder in args.compare}
    if args.launcher == "slurm":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise Problem("--launcher slurm submits through submitit: pip install submitit") from None
    output_dir = os.path.abspath(args.output_dir)
    labels = engine_transfer.labels_of(args.checkpoint, args.labels or ())
    checkpoints = dict(zip(labels, (os.path.abspath(path) for path in args.checkpoint)))
    tasks = [task for task in TASKS if task in args.tasks]  # each once, in the report's order
    runs = engine_transfer.plan(recipes, tasks, checkpoints, data, output_dir, task_flags, args.launcher,
                                args.gpus, slurm_flags)
    return {"recipes": recipes, "model": model, "data": data, "output_dir": output_dir, "checkpoints": checkpoints,
            "runs": runs, "compared": compared}


def dry_run(args, found: dict) -> None:
    """The commands on stdout, one a line; what a run would do otherwise (data to make, runs done) on stderr."""
    for task in args.tasks:
        recipe, data = found["recipes"][task], found["data"][task]
        if recipe.prepare is not None and not os.path.exists(data):
            print(f"# {task}: {shown(data)} is made first (the check's data)", file=sys.stderr)
    for run in found["runs"]:
        record = engine_transfer.read_record(run.run_dir)
        if record and record["status"] == DONE:
            print(f"# {run.label} {run.task}: done in {shown(run.run_dir)}, not run again", file=sys.stderr)
        print(shlex.join(run.command))


def compared_records(compared: dict, labels: list) -> tuple:
    """The checkpoints and run records of earlier reports (--compare), under labels unique beside `labels`."""
    checkpoints, records = {}, {}
    for earlier in compared.values():
        for label, identity in earlier["checkpoints"].items():
            taken = [*labels, *checkpoints]
            unique = engine_transfer.labels_of(taken + [label], taken + [label])[-1]
            checkpoints[unique] = identity
            for task, entry in earlier["runs"][label].items():
                record = engine_transfer.read_record(entry["run_dir"]) if entry.get("run_dir") else None
                if record:
                    records[unique, task] = record
    return checkpoints, records


def check_pictures(data: dict) -> dict:
    """The pictures the checks draw, of the runs of each checkpoint: segmentation's predictions and detection's."""
    def segment(runs, path):
        from benchmarks import segmentation_check
        segmentation_check.picture(data["segment"], runs, segmentation_check.PICTURE_IMAGES, path)

    def detect(runs, path):
        from benchmarks import detection_check
        detection_check.picture(data["detect"], runs, detection_check.PICTURE_IMAGES, path,
                                detection_check.PICTURE_THRESHOLD)
    return {"segment": segment, "detect": detect}


def write_doc(args, report: dict, records: dict, refs) -> None:
    """The report card into --doc's block, with the command, where and when it ran and the wall time of each run."""
    from benchmarks.doc_block import provenance, rewrite_block
    from util.misc import resolve_device
    minutes = {task: sum(report["runs"][label][task].get("wall_seconds", 0) for label in report["checkpoints"]) / 60
               for task in TASKS}
    command = shlex.join(["python", "main_transfer.py", *sys.argv[1:]])
    text = (f"`{command}` ({provenance(resolve_device('auto'))}; {report['wall_seconds'] / 60:.0f} minutes of runs: "
            + ", ".join(f"{task} {minutes[task]:.1f}" for task in TASKS) + "):\n\n" +
            "\n".join(engine_transfer.report_rows(list(report["checkpoints"]), records, refs)))
    rewrite_block(args.doc, DOC_BLOCK, text)


def main(args) -> int:
    """Returns the exit status: 0 when every requested run is done (or submitted), 1 when one failed, 75 when one was
    interrupted (run the same command again)."""
    try:
        found = check_args(args)
    except Problem as err:
        raise SystemExit(f"error: {err}") from None
    if args.dry_run:
        dry_run(args, found)
        return 0
    identities = {}
    for label, path in found["checkpoints"].items():
        try:
            identities[label] = engine_transfer.checkpoint_identity(path)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --checkpoint {path}: {err}") from None
    problems = [found_problem for run in found["runs"] if (found_problem := engine_transfer.conflicts(
        run, engine_transfer.read_record(run.run_dir), identities[run.label]))]
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + ". Give another --output_dir, or move that run folder "
                                                           "away to run it again")
    # from here a stop signal is passed on to the running script, and no other run starts (training.signals' exit
    # at once was right only while nothing ran)
    with engine_transfer.StopRequest() as stops:
        pending = [run.task for run in found["runs"]
                   if (engine_transfer.read_record(run.run_dir) or {}).get("status") != DONE]
        for task in dict.fromkeys(pending):
            recipe, data = found["recipes"][task], found["data"][task]
            if recipe.prepare is not None and not os.path.exists(data):
                try:
                    recipe.prepare(data, [args.source] if args.source else None)
                except (FileNotFoundError, FileExistsError, ValueError) as err:
                    raise SystemExit(f"error: --{task}_data: {err}") from None
        runner = engine_transfer.run_slurm if args.launcher == "slurm" else engine_transfer.run_local
        records = runner(found["runs"], identities, stops)
        return report_and_status(args, found, identities, records)


def report_and_status(args, found: dict, identities: dict, records: dict) -> int:
    """The report of every run, this command's and the earlier ones' in --output_dir (and --compare's); the exit
    status."""
    # the tasks not asked for this time are reported as an earlier command left them
    for label in found["checkpoints"]:
        for task in TASKS:
            if (label, task) not in records:
                earlier = engine_transfer.read_record(os.path.join(found["output_dir"], label, task))
                if earlier:
                    records[label, task] = earlier
    checkpoints = {label: {**identity, "saved": engine_transfer.saved_facts(found["checkpoints"][label])}
                   for label, identity in identities.items()}
    more_checkpoints, more_records = compared_records(found["compared"], list(checkpoints))
    checkpoints.update(more_checkpoints)
    records.update(more_records)
    refs = engine_transfer.references(args.suite, found["model"])
    pictures = check_pictures(found["data"]) if args.suite == "check" else {}
    report = engine_transfer.write_report(found["output_dir"], args.suite, found["model"], args.launcher, checkpoints,
                                          records, refs, found["recipes"], pictures)
    print("\n" + "\n".join(engine_transfer.report_rows(list(checkpoints), records, refs)))
    print(f"\nreport: {shown(os.path.join(found['output_dir'], 'REPORT.md'))} and report.json")
    statuses = {records[run.label, run.task]["status"] for run in found["runs"]}
    if FAILED in statuses:
        return 1
    if statuses & {INTERRUPTED, NOT_RUN}:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return engine_transfer.REQUEUE_EXIT_CODE
    if args.doc:
        write_doc(args, report, records, refs)
    return 0


if __name__ == "__main__":  # --help and bad flags answer before anything else is imported
    sys.exit(main(get_args_parser().parse_args()))
