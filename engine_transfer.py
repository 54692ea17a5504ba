"""The transfer report of pre-trained checkpoints: the four transfers that judge an encoder (linear probe and
fine-tuning top-1, segmentation mIoU, detection box and mask AP), each run by its own script with its recipe, one
after another or as SLURM jobs, resumed where they stopped, and read back into one table beside the paper's and the
anchors' numbers. `main_transfer.py` is its command.

- The suites (`SUITES`): each task's recipe as data, its script, flags, GPU count and data (`Recipe`); `paper`, the
  recipes of the paper's tables on ImageNet-1K, ADE20K and COCO; `check`, the small Fashion-MNIST checks of
  util/demo_commands.py, the recipes benchmarks/*_check.py and demo.py run.
- The plan (`plan`): (suite, tasks, checkpoints, data, output folder, flags given) -> one `TransferRun` per checkpoint
  and task, its command and its run folder `<output_dir>/<checkpoint label>/<task>`.
- The runners: `run_local` (each command as a subprocess: the script itself, or `python -m training.launch` for a
  recipe on GPUs), `run_slurm` (each command submits a job through training.submitit_launch).
- The record of a run (`transfer.json` in its folder: the command, each attempt and its outcome, the scores of a
  finished run) and the report (`write_report`: report.json and REPORT.md).

Planning and running import no torch and no engine: the scripts run as subprocesses, and resume themselves from their
folder's last checkpoint. Only the report's curves (matplotlib) and what it says of a checkpoint's saved flags load
more, when it is written.
"""
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from training.signals import REQUEUE_EXIT_CODE
from util.demo_commands import (CLASSIFIER, ROOT, DemoFinetune, DemoProbe, DetectionCheck, SegmentationCheck,
                                shown)

TASKS = ("linprobe", "finetune", "segment", "detect")
TASK_NAMES = {"linprobe": "linear probe", "finetune": "fine-tuning", "segment": "semantic segmentation (UperNet)",
              "detect": "detection and instance segmentation (Mask R-CNN)"}
# The numbers of each task (its log.txt keys): the first ones are the report card's, the others are kept beside them.
METRICS = {"linprobe": {"test_acc1": "linear probe top-1 (%)"},
           "finetune": {"test_acc1": "fine-tune top-1 (%)"},
           "segment": {"test_mIoU": "segmentation mIoU (%)"},
           "detect": {"test_bbox_AP": "detection box AP", "test_segm_AP": "detection mask AP"}}
MORE_SCORES = {"linprobe": ("test_acc5",), "finetune": ("test_acc5",), "segment": ("test_mAcc", "test_aAcc"),
               "detect": ("test_bbox_AP50", "test_bbox_AP75", "test_segm_AP50", "test_segm_AP75")}
RECORD = "transfer.json"  # in a run folder: the orchestrator's record of the run
OUTPUT = "output.txt"  # in a run folder: what the command printed, every attempt
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the scripts' default --stop_signals: passed on to the run
DONE, INTERRUPTED, FAILED, NOT_RUN, SUBMITTED, NOT_REQUESTED = (
    "done", "interrupted", "failed", "not run", "submitted", "not requested")


class Recipe(NamedTuple):
    """A task's recipe in a suite. `command(data, output_dir, checkpoint)` is the script's command
    (`[python, script, flags...]`); `gpus` the processes it runs on (0: one process, on the device it finds, as the
    CPU checks run); `data` its default data location; `prepare(root, sources)` makes that data when missing (the
    check suite's Fashion-MNIST sets), None when it is the user's; `data_options` what the prepared set's marker
    file must say for the run to be the recipe's (its sizes)."""
    command: Callable[[str, str, str], List[str]]
    gpus: int
    data: str
    prepare: Optional[Callable] = None
    data_options: Optional[dict] = None


class Reference(NamedTuple):
    """A column of reference numbers: `title`, {(task, log key): value, or (low, high) for a spread}, and the
    effective epochs of its pre-training (epochs x views) when it says them."""
    title: str
    scores: Dict[Tuple[str, str], object]
    effective_epochs: Optional[int] = None


def _script(name: str, flags: Sequence[str]) -> Callable[[str, str, str], List[str]]:
    """A paper recipe's command: the script, its flags, then the checkpoint, the data and the run folder."""
    return lambda data, output_dir, checkpoint: [shown(sys.executable), name, *flags, "--finetune", shown(checkpoint),
                                                 "--data_path", shown(data), "--output_dir", shown(output_dir)]


# The released recipes (FINETUNE.md, SEGMENT.md, DETECT.md), each on one 8-GPU node; what another encoder changes.
PAPER_FLAGS = {
    "linprobe": ["--batch_size", "512", "--epochs", "90", "--warmup_epochs", "10", "--blr", "0.1",
                 "--weight_decay", "0", "--dist_eval"],
    "finetune": ["--batch_size", "128", "--epochs", "100", "--warmup_epochs", "5", "--blr", "5e-4",
                 "--layer_decay", "0.65", "--weight_decay", "0.05", "--drop_path", "0.1", "--aa",
                 "rand-m9-mstd0.5-inc1", "--smoothing", "0.1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
                 "--dist_eval"],
    "segment": [],  # main_segment.py's defaults are ConvMAE-B's ADE20K recipe
    "detect": [],  # main_detect.py's defaults are ConvMAE-B's COCO recipe (ViTDet's for a ViT)
}
PAPER_MODEL_FLAGS = {
    "convvit_base_patch16": {},
    "convvit_large_patch16": {"linprobe": ["--epochs", "50", "--blr", "0.05"],
                              "finetune": ["--epochs", "50", "--layer_decay", "0.75", "--drop_path", "0.2"]},
    "vit_base_patch16_gap_sincos": {"segment": ["--simple_pyramid", "--rel_pos_bias", "--layer_scale", "1.0",
                                                "--layer_decay", "0.65", "--drop_path", "0.1"]},
}
PAPER_DATA = {"linprobe": "/datasets/imagenet", "finetune": "/datasets/imagenet",
              "segment": "/datasets/ADEChallengeData2016", "detect": "/datasets/coco"}  # the scripts' defaults
PAPER_GPUS = 8

# The numbers to compare with, for the same encoder: the paper's table (README.md), ConvMAE's and MAE's (SEGMENT.md,
# DETECT.md); ETE = effective epochs of pre-training, epochs x views.
PAPER_REFERENCES = {
    "convvit_base_patch16": [
        Reference("DMJD, paper (800 ETE)", {("finetune", "test_acc1"): 85.2, ("linprobe", "test_acc1"): 76.7}, 800),
        Reference("ConvMAE-B, anchor (1600 ETE)", {("finetune", "test_acc1"): 85.0, ("linprobe", "test_acc1"): 70.9,
                                                   ("segment", "test_mIoU"): 51.7, ("detect", "test_bbox_AP"): 53.2,
                                                   ("detect", "test_segm_AP"): 47.1}, 1600)],
    "convvit_large_patch16": [
        Reference("DMJD, paper (800 ETE)", {("finetune", "test_acc1"): 86.3, ("linprobe", "test_acc1"): 79.7}, 800),
        Reference("ConvMAE-L, anchor (800 ETE)", {("finetune", "test_acc1"): 86.2}, 800)],
    "vit_base_patch16_gap_sincos": [
        Reference("MaskFeat + DMJD, paper (1600 ETE)", {("finetune", "test_acc1"): 84.1,
                                                        ("linprobe", "test_acc1"): 71.9}, 1600),
        Reference("MaskFeat, anchor (1600 ETE)", {("finetune", "test_acc1"): 84.0, ("linprobe", "test_acc1"): 68.5},
                  1600),
        Reference("MAE ViT-B, anchor (1600 ETE)", {("segment", "test_mIoU"): 48.1, ("detect", "test_bbox_AP"): 51.6,
                                                   ("detect", "test_segm_AP"): 45.9}, 1600)],
}

# The checks' documented figures (README.md's demo table, FINETUNE.md's first run, SEGMENT.md's and DETECT.md's
# check blocks; tests/test_transfer.py finds each there), from the demo's checkpoint and from a random encoder.
CHECK_REFERENCES = [
    Reference("documented, the demo's checkpoint", {("linprobe", "test_acc1"): 74.73, ("finetune", "test_acc1"): 80.23,
                                                    ("segment", "test_mIoU"): (17.89, 18.14),
                                                    ("detect", "test_bbox_AP"): 12.41,
                                                    ("detect", "test_segm_AP"): 10.26}),
    Reference("documented, random init", {("linprobe", "test_acc1"): 56.87, ("segment", "test_mIoU"): (14.39, 15.57),
                                          ("detect", "test_bbox_AP"): 7.43, ("detect", "test_segm_AP"): 6.57}),
]


def paper_recipes(model: str) -> Dict[str, Recipe]:
    if model not in PAPER_MODEL_FLAGS:
        raise ValueError(f"--model {model}: the paper suite has the recipes of {', '.join(PAPER_MODEL_FLAGS)}")
    scripts = {"linprobe": "main_linprobe.py", "finetune": "main_finetune.py", "segment": "main_segment.py",
               "detect": "main_detect.py"}
    return {task: Recipe(_script(scripts[task], ["--model", model, *merge_flags(
        PAPER_FLAGS[task], PAPER_MODEL_FLAGS[model].get(task, []))]), PAPER_GPUS, PAPER_DATA[task])
            for task in TASKS}


def check_recipes(model: str) -> Dict[str, Recipe]:
    if model != CLASSIFIER:
        raise ValueError(f"--model {model}: the check suite fine-tunes the demo's {CLASSIFIER}")
    probe, segment, detect = DemoProbe(), SegmentationCheck(), DetectionCheck()
    probe_data = (shown(probe.data()), probe.prepare, {"max_train": probe.train_images, "max_val": None,
                                                       "counts": {"train": probe.train_images, "val": 10000}})
    return {"linprobe": Recipe(probe.command, 0, *probe_data),
            "finetune": Recipe(DemoFinetune().command, 0, *probe_data),
            "segment": Recipe(segment.command, 0, segment.data, segment.prepare,
                              {"num_train": segment.num_train, "num_val": segment.num_val}),
            "detect": Recipe(detect.command, 0, detect.data, detect.prepare,
                             {"num_train": detect.num_train, "num_val": detect.num_val})}


SUITES = {"paper": (paper_recipes, "convvit_base_patch16"), "check": (check_recipes, CLASSIFIER)}


def references(suite: str, model: str) -> List[Reference]:
    return CHECK_REFERENCES if suite == "check" else PAPER_REFERENCES.get(model, [])


def flag_groups(tokens: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """A command's flags as (flag, its values), in order (`--flag=value` as `--flag value`)."""
    groups = []
    for token in tokens:
        if token.startswith("--"):
            flag, equals, value = token.partition("=")
            groups.append((flag, [value] if equals else []))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise ValueError(f"{token!r} is no flag's value: flags start with --")
    return groups


def _key(flag: str) -> str:
    """`--no-x` is the flag `--x` (argparse's boolean pairs): either replaces the other."""
    return "--" + flag[len("--no-"):] if flag.startswith("--no-") else flag


def merge_flags(flags: Sequence[str], overrides: Sequence[str]) -> List[str]:
    """`flags` with each flag of `overrides` in place of the same flag (its values too), the others appended."""
    given = {_key(flag): (flag, values) for flag, values in flag_groups(overrides)}
    merged = []
    for flag, values in flag_groups(flags):
        flag, values = given.pop(_key(flag), (flag, values))
        merged += [flag, *values]
    for flag, values in given.values():
        merged += [flag, *values]
    return merged


class TransferRun(NamedTuple):
    """One task of one checkpoint: its command (run from the repository's root) and its run folder."""
    label: str
    checkpoint: str
    task: str
    run_dir: str
    command: List[str]
    flags: List[str]  # the script's flags (the recipe's, with those given)
    given: List[str]  # the flags given (--task_flags) in place of or beside the recipe's
    gpus: int
    data: str


def launched(command: List[str], gpus: int, launcher: str, run_dir: str, slurm_flags: Sequence[str]) -> List[str]:
    """The script's command through the launcher the scripts use: as it stands for one process, torchrun with the
    requeue status (training.launch) on GPUs, a submitit job (training.submitit_launch) on SLURM."""
    python, script = command[:2]
    if launcher == "slurm":
        return [python, "-m", "training.submitit_launch", "--nodes", "1", "--ngpus", str(max(gpus, 1)),
                "--job_dir", shown(os.path.join(run_dir, "submitit")), *slurm_flags, *command[1:]]
    if gpus:
        return [python, "-m", "training.launch", "--nproc_per_node", str(gpus), *command[1:]]
    return command


def labels_of(checkpoints: Sequence[str], given: Sequence[str] = ()) -> List[str]:
    """A folder name per checkpoint: `given`, else its file name without extension (with its folder's name before a
    generic `checkpoint-*`), made unique."""
    labels = []
    for index, path in enumerate(checkpoints):
        if given:
            name = given[index]
        else:
            name = os.path.basename(os.path.normpath(path))
            name = re.sub(r"\.(pth|pt|safetensors)$", "", name)
            if name.startswith("checkpoint"):
                name = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{name}"
        name = re.sub(r"[^\w.-]+", "_", name).strip("._") or "checkpoint"
        unique, count = name, 1
        while unique in labels:
            count += 1
            unique = f"{name}-{count}"
        labels.append(unique)
    return labels


def plan(recipes: Dict[str, Recipe], tasks: Sequence[str], checkpoints: Dict[str, str], data: Dict[str, str],
         output_dir: str, task_flags: Dict[str, List[str]], launcher: str = "local", gpus: Optional[int] = None,
         slurm_flags: Sequence[str] = ()) -> List[TransferRun]:
    """The runs of `tasks` for each checkpoint ({label: path}), in that order: `data` {task: its data location},
    `task_flags` {task or "all": flags that replace or add to the recipe's}, `gpus` in place of the recipes'."""
    runs = []
    for label, checkpoint in checkpoints.items():
        for task in tasks:
            recipe = recipes[task]
            run_dir = os.path.join(output_dir, label, task)
            command = recipe.command(data[task], run_dir, checkpoint)
            given = merge_flags(task_flags.get("all", []), task_flags.get(task, []))
            flags = merge_flags(command[2:], given)
            count = recipe.gpus if gpus is None else gpus
            runs.append(TransferRun(label, checkpoint, task, run_dir,
                                    launched(command[:2] + flags, count, launcher, run_dir, slurm_flags), flags,
                                    given, count, data[task]))
    return runs


# --- a checkpoint's identity and a run's record ---

def checkpoint_identity(path: str) -> dict:
    """What identifies a checkpoint without loading it: its path, size and the sha256 of its bytes (of an export
    folder's weights file)."""
    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise ValueError(f"{path} is a folder without model.safetensors: not an export of export_encoder.py")
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(weights), "sha256": digest.hexdigest()}


def saved_facts(path: str) -> dict:
    """What a checkpoint says of itself: the model it was trained as, its epoch and its pre-training schedule (loads
    torch; for the report only)."""
    try:
        from dmjd_encoders.checkpoint import load_checkpoint
        from dmjd_encoders.pretrained import checkpoint_origin, export_architecture
        checkpoint = load_checkpoint(path, mmap=True)
    except Exception as err:  # the runs say what is wrong with it; the report says it could not be read
        return {"unreadable": str(err).splitlines()[0]}
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    facts = {"model": args.get("model") or export_architecture(checkpoint), "epoch": checkpoint.get("epoch")}
    origin = checkpoint_origin(args)
    if origin:
        facts["written_by"] = origin.script
    if "num_views" in args and "epochs" in args:
        facts["pretraining"] = {"epochs": args["epochs"], "views": args["num_views"],
                                "effective_epochs": args["epochs"] * args["num_views"]}
    return {k: v for k, v in facts.items() if v is not None}


def read_record(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_record(run_dir: str, record: dict) -> None:
    """Atomically: a record is never half written."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, RECORD)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


COMPARED_AWAY = ("--data_path", "--output_dir", "--finetune")  # paths: the checkpoint is compared by its bytes


def conflicts(run: TransferRun, record: Optional[dict], identity: dict) -> Optional[str]:
    """Why the run folder's record is another run than `run`: another checkpoint's (whatever its status: the script
    would resume it), or a finished run of other flags or GPUs; None when it is this run's or there is none."""
    if record is None:
        return None
    where = shown(run.run_dir)
    if record["checkpoint"]["sha256"] != identity["sha256"]:
        return (f"{where} holds the {run.task} run of another checkpoint ({record['checkpoint']['path']}, sha256 "
                f"{record['checkpoint']['sha256'][:12]}), not of {run.checkpoint}")
    if record["status"] != DONE:
        return None  # the script's resume checks its own flags
    ours = dict((f, v) for f, v in flag_groups(run.flags) if f not in COMPARED_AWAY)
    theirs = dict((f, v) for f, v in flag_groups(record["flags"]) if f not in COMPARED_AWAY)
    changed = sorted((set(ours) ^ set(theirs)) | {f for f in set(ours) & set(theirs) if ours[f] != theirs[f]})
    if changed or record["gpus"] != run.gpus:
        said = ", ".join(f"{f} {' '.join(theirs.get(f, ['(not given)']))} -> {' '.join(ours.get(f, ['(not given)']))}"
                         for f in changed)
        if record["gpus"] != run.gpus:
            said = ", ".join(filter(None, [said, f"GPUs {record['gpus']} -> {run.gpus}"]))
        return f"{where} holds a finished {run.task} run of other flags ({said})"
    return None


def new_record(run: TransferRun, identity: dict, record: Optional[dict]) -> dict:
    """The run's record, continuing the attempts of the folder's earlier one."""
    return {"label": run.label, "task": run.task, "run_dir": os.path.abspath(run.run_dir), "checkpoint": identity,
            "command": run.command, "flags": run.flags, "given": run.given, "gpus": run.gpus, "data": run.data,
            "status": NOT_RUN,
            "attempts": record["attempts"] if record else []}


def last_scores(run_dir: str, task: str) -> Optional[dict]:
    """The scores of the run's last evaluation (its last log.txt record with the task's first metric), with the best
    value of that metric over the run; None without one."""
    log = os.path.join(run_dir, "log.txt")
    if not os.path.isfile(log):
        return None
    first = next(iter(METRICS[task]))
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    scored = [r for r in records if isinstance(r.get(first), (int, float))]
    if not scored:
        return None
    keys = [*METRICS[task], *MORE_SCORES[task]]
    scores = {k: scored[-1][k] for k in keys if k in scored[-1]}
    scores[f"best_{first}"] = max(r[first] for r in scored)
    return scores


def departures(record: dict, recipe: Optional[Recipe]) -> List[str]:
    """How a run departs from its recipe: the flags given, and data prepared with other sizes than the check's (or
    not prepared as a check's set at all)."""
    found = [f"flags given: {shlex.join(record['given'])}"] if record.get("given") else []
    if recipe is not None and recipe.data_options is not None and record.get("data"):
        prepared = data_record(record["data"]).get("prepared")
        if prepared is None:
            found.append(f"data: {record['data']} is no prepared set of the check")
        else:
            found += [f"data: {k} {_plain(prepared.get(k))} (the check's {_plain(v)})"
                      for k, v in recipe.data_options.items() if prepared.get(k) != v]
    return found


def _plain(value) -> str:
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def data_record(path: str) -> dict:
    """The data a run read: its path, and the options of a prepared Fashion-MNIST set (its marker file)."""
    found = {"path": os.path.abspath(path)}
    marker = os.path.join(path, ".prepared.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            found["prepared"] = {k: v for k, v in json.load(f).items() if k != "source"}
    return found


# --- the runners ---

class StopRequest:
    """The stop signals while the runs go: each is passed on to the running command (which saves its step and
    exits 75), and no further run starts."""

    def __init__(self):
        self.requested, self.process, self._previous = None, None, {}

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        print(f"main_transfer.py: received {self.requested}; the running transfer saves its step and stops, no other "
              f"starts", file=sys.stderr, flush=True)
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass


def say(text: str) -> None:
    print(text, flush=True)  # in order with the scripts' lines, through a pipe too


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def execute(run: TransferRun, stops: StopRequest) -> Tuple[int, str]:
    """Runs the command from the repository's root, its output printed and appended to the run folder's
    output.txt; returns its exit status (negative: killed by that signal) and its last lines."""
    os.makedirs(run.run_dir, exist_ok=True)
    kept: List[str] = []
    with open(os.path.join(run.run_dir, OUTPUT), "a") as out:
        out.write(f"\n$ {shlex.join(run.command)}  # {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
        process = subprocess.Popen(run.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1)
        stops.process = process
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()  # line by line, as the script prints it, through a pipe too
                out.write(line)
                kept = (kept + [line])[-40:]
            status = process.wait()
        finally:
            stops.process = None
    return status, "".join(kept)


def outcome(status: int, output: str) -> Tuple[str, str]:
    """(status, what to say) of a finished command: 0 done; 75 (stopped after saving) or killed: interrupted, the
    same command resumes it; else failed, with its last lines."""
    if status == 0:
        return DONE, "finished"
    if status == REQUEUE_EXIT_CODE or status < 0:
        how = (f"stopped after saving its step (status {REQUEUE_EXIT_CODE})" if status > 0 else
               f"killed by {signal.Signals(-status).name}")
        return INTERRUPTED, f"{how}: run the same command again to resume it"
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    return FAILED, (errors[-1] if errors else f"exit status {status}") + "\n" + tail(output)


def run_local(runs: Sequence[TransferRun], identities: Dict[str, dict], stops: StopRequest,
              announce: Callable[[str], None] = say) -> Dict[Tuple[str, str], dict]:
    """Each run not done, one after another; a stop signal (`stops`, entered) ends the current one (saved) and
    starts no other. Returns the record of every run, {(label, task): record}."""
    records = {}
    for run in runs:
        earlier = read_record(run.run_dir)
        if earlier and earlier["status"] == DONE:
            announce(f"{run.label} {run.task}: done ({shown(run.run_dir)}), not run again")
            records[run.label, run.task] = earlier
            continue
        record = new_record(run, identities[run.label], earlier)
        if stops.requested:
            records[run.label, run.task] = record
            continue
        announce(f"\n=== {run.label} {run.task}: {TASK_NAMES[run.task]} ({shown(run.run_dir)})\n$ "
                 f"{shlex.join(run.command)}")
        start = time.time()
        status, output = execute(run, stops)
        record["status"], said = outcome(status, output)
        if record["status"] == DONE:
            record["scores"] = last_scores(run.run_dir, run.task)
            if record["scores"] is None:
                record["status"], said = FAILED, "finished without an evaluation in its log.txt"
        record["attempts"].append({"started": _stamp(start), "seconds": round(time.time() - start, 1),
                                   "exit_status": status, "outcome": record["status"], "said": said})
        write_record(run.run_dir, record)
        records[run.label, run.task] = record
        announce(f"=== {run.label} {run.task}: {record['status']}: {said.splitlines()[0]}")
    return records


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).isoformat(timespec="seconds")


def slurm_job_state(run_dir: str, job_id: str) -> Tuple[bool, Optional[str]]:
    """(whether the job still runs or waits, its error when it ended with one) from submitit's records of it."""
    import submitit
    job = submitit.SlurmJob(folder=os.path.join(run_dir, "submitit"), job_id=job_id)
    if not job.done(force_check=True):
        return True, None
    error = job.exception()
    return False, None if error is None else str(error)


def run_slurm(runs: Sequence[TransferRun], identities: Dict[str, dict], stops: Optional[StopRequest] = None,
              announce: Callable[[str], None] = say,
              job_state: Callable[[str, str], Tuple[bool, Optional[str]]] = slurm_job_state
              ) -> Dict[Tuple[str, str], dict]:
    """A job for each run that is neither done nor queued or running; a job that ended since the last call is read
    back (its scores, or its error). Returns the record of every run. (A stop signal, `stops`, waits for the
    submissions: each takes seconds.)"""
    records = {}
    for run in runs:
        record = read_record(run.run_dir)
        if record and record["status"] == SUBMITTED:
            job = record["attempts"][-1]["job"]
            running, error = job_state(run.run_dir, job)
            if running:
                announce(f"{run.label} {run.task}: job {job} is queued or running, not submitted again")
                records[run.label, run.task] = record
                continue
            scores = last_scores(run.run_dir, run.task) if error is None else None
            record["status"] = DONE if scores else FAILED
            record["scores"] = scores
            record["attempts"][-1].update(outcome=record["status"], said=error or "finished")
            write_record(run.run_dir, record)
        if record and record["status"] == DONE:
            announce(f"{run.label} {run.task}: done ({shown(run.run_dir)}), not run again")
            records[run.label, run.task] = record
            continue
        record = new_record(run, identities[run.label], record)
        announce(f"{run.label} {run.task}: submitting\n$ {shlex.join(run.command)}")
        proc = subprocess.run(run.command, cwd=ROOT, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        found = re.search(r"submitted job (\S+?):", proc.stdout)
        if proc.returncode or not found:
            record["status"] = FAILED
            record["attempts"].append({"started": _stamp(time.time()), "outcome": FAILED,
                                       "said": tail(proc.stdout + proc.stderr)})
        else:
            record["status"] = SUBMITTED
            record["attempts"].append({"started": _stamp(time.time()), "job": found.group(1), "outcome": SUBMITTED})
        write_record(run.run_dir, record)
        records[run.label, run.task] = record
    return records


# --- the report ---

def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return f"{value[0]:.2f} - {value[1]:.2f}"
    return f"{value:.2f}"


def machine() -> dict:
    """Where the report was written (the runs' own logs say on which device each ran)."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch_version, "platform": platform.platform()}


def report_rows(labels: Sequence[str], records: Dict[Tuple[str, str], dict], refs: Sequence[Reference]) -> List[str]:
    """The report card: a row per number, a column per checkpoint, then the references."""
    head = ["", *labels, *(r.title for r in refs)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task in TASKS:
        for key, name in METRICS[task].items():
            cells = []
            for label in labels:
                record = records.get((label, task))
                scores = (record or {}).get("scores") if (record or {}).get("status") == DONE else None
                cells.append(format_value(scores.get(key)) if scores else _status_cell(record))
            cells += [format_value(r.scores.get((task, key))) for r in refs]
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def _status_cell(record: Optional[dict]) -> str:
    if record is None or record["status"] == NOT_REQUESTED:
        return ""
    return f"({record['status']})"


def write_report(output_dir: str, suite: str, model: str, launcher: str, checkpoints: Dict[str, dict],
                 records: Dict[Tuple[str, str], dict], refs: Sequence[Reference], recipes: Dict[str, Recipe],
                 pictures: Dict[str, Callable[[Dict[str, str], str], None]] = None) -> dict:
    """report.json and REPORT.md in `output_dir`, with the curves of each task's runs (util/curves.py) and the
    pictures of `pictures` {task: draw(runs {label: run folder}, path)} of the tasks done; each run's departures
    from its recipe (`recipes`) are said. Returns the report."""
    labels = list(checkpoints)
    wall = sum(a.get("seconds", 0) for r in records.values() for a in r.get("attempts", []))
    report = {"suite": suite, "model": model, "launcher": launcher, "output_dir": os.path.abspath(output_dir),
              "written": _stamp(time.time()),
              "machine": machine(), "wall_seconds": round(wall, 1), "checkpoints": checkpoints,
              "references": [{"title": r.title, "effective_epochs": r.effective_epochs,
                              "scores": {f"{t} {k}": v for (t, k), v in r.scores.items()}} for r in refs],
              "runs": {label: {task: _run_entry(records.get((label, task)), task, recipes[task]) for task in TASKS}
                       for label in labels}}
    os.makedirs(output_dir, exist_ok=True)
    figures = _figures(output_dir, labels, records, pictures or {})
    report["figures"] = [{"caption": caption, "path": path} for caption, path in figures]
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(output_dir, "REPORT.md"), "w") as f:
        f.write(report_markdown(report, records, refs, figures))
    return report


def _run_entry(record: Optional[dict], task: str, recipe: Recipe) -> dict:
    if record is None:
        return {"status": NOT_REQUESTED}
    entry = {"status": record["status"], "metrics": {name: (record.get("scores") or {}).get(key)
                                                     for key, name in METRICS[task].items()},
             "scores": record.get("scores"), "run_dir": record["run_dir"],
             "command": shlex.join(record["command"]), "flags": record["flags"],
             "flags_given": record.get("given", []), "gpus": record["gpus"],
             "data": data_record(record["data"]) if record.get("data") else None,
             "wall_seconds": round(sum(a.get("seconds", 0) for a in record["attempts"]), 1),
             "attempts": record["attempts"], "checkpoint": record["checkpoint"],
             "departures": departures(record, recipe)}
    if record["status"] in (FAILED, INTERRUPTED) and record["attempts"]:
        entry["error" if record["status"] == FAILED else "note"] = record["attempts"][-1].get("said")
    return entry


def _figures(output_dir: str, labels: Sequence[str], records: Dict[Tuple[str, str], dict],
             pictures: Dict[str, Callable]) -> List[Tuple[str, str]]:
    """(caption, path relative to output_dir) of each task's curves and pictures; one that cannot be drawn is
    captioned with why."""
    figures = []
    for task in TASKS:
        runs = {label: records[label, task]["run_dir"] for label in labels if (label, task) in records and
                os.path.isfile(os.path.join(records[label, task]["run_dir"], "log.txt"))}
        if not runs:
            continue
        path = os.path.join("curves", f"{task}.png")
        try:
            from util.curves import plot_runs
            plot_runs(list(runs.values()), os.path.join(output_dir, path), list(runs))
            figures.append((f"{TASK_NAMES[task]}: the curves of each run", path))
        except (FileNotFoundError, ValueError) as err:
            figures.append((f"{TASK_NAMES[task]}: no curves ({err})", None))
        done = {label: d for label, d in runs.items() if records.get((label, task), {}).get("status") == DONE}
        if task in pictures and done:
            path = os.path.join("pictures", f"{task}.png")
            try:
                pictures[task](done, os.path.join(output_dir, path))
                figures.append((f"{TASK_NAMES[task]}: the check's picture (image, ground truth, each run's "
                                f"predictions)", path))
            except Exception as err:  # a picture is an extra: the numbers stand without it
                figures.append((f"{TASK_NAMES[task]}: no picture ({type(err).__name__}: {err})", None))
    return figures


SUITE_NAMES = {"paper": "the recipes of the paper's tables: ImageNet-1K linear probe and fine-tuning, ADE20K UperNet, "
                        "COCO Mask R-CNN",
               "check": "the small Fashion-MNIST checks on a CPU (demo.py's probe and fine-tuning, "
                        "benchmarks/segmentation_check.py, benchmarks/detection_check.py)"}


def report_markdown(report: dict, records: Dict[Tuple[str, str], dict], refs: Sequence[Reference],
                    figures: Sequence[Tuple[str, Optional[str]]]) -> str:
    m = report["machine"]
    lines = ["# Transfer report", "",
             f"Suite `{report['suite']}`: {SUITE_NAMES[report['suite']]}; encoder `{report['model']}`; launcher "
             f"`{report['launcher']}`. Written {report['written']} on {m['host']} ({m['cpus']} CPU cores, Python "
             f"{m['python']}, torch {m['torch']}); the runs took {report['wall_seconds'] / 60:.1f} minutes of wall "
             f"time in all.", "", *report_rows(list(report["checkpoints"]), records, refs), ""]
    for label, identity in report["checkpoints"].items():
        ete = identity.get("saved", {}).get("pretraining", {}).get("effective_epochs")
        others = sorted({r.effective_epochs for r in refs if r.effective_epochs and r.effective_epochs != ete})
        if ete and others:
            lines += [f"{label} was pre-trained for {ete} effective epochs; the references for "
                      f"{' and '.join(map(str, others))}: a schedule apart.", ""]
    if refs:
        lines += ["References: " + "; ".join(r.title for r in refs) + (
            ". A range is the spread of the documented runs. The documented figures are the demo checkpoint's "
            "(`python demo.py`), and a run compares with them when it departs in nothing from its recipe (Runs, "
            "below)." if report["suite"] == "check" else
            ". ETE: effective epochs of pre-training (epochs x views)."), ""]
    lines += ["## Checkpoints", ""]
    for label, identity in report["checkpoints"].items():
        facts = identity.get("saved", {})
        said = ", ".join(filter(None, [
            facts.get("model") and f"`{facts['model']}`",
            facts.get("written_by") and f"written by {facts['written_by']}",
            facts.get("epoch") is not None and f"at epoch {facts['epoch']} (counted from 0)",
            facts.get("pretraining") and "pre-trained {epochs} epochs x {views} views = {effective_epochs} ETE".format(
                **facts["pretraining"]),
            facts.get("unreadable") and f"unreadable here: {facts['unreadable']}"]))
        lines.append(f"- **{label}**: `{identity['path']}` ({identity['bytes']:,} bytes, sha256 "
                     f"`{identity['sha256'][:16]}`){': ' + said if said else ''}")
    lines += ["", "## Runs", "", "| checkpoint | task | status | minutes | run folder | departs from the recipe |",
              "|---|---|---|---|---|---|"]
    notes = []
    for label, runs in report["runs"].items():
        for task, entry in runs.items():
            if entry["status"] == NOT_REQUESTED:
                continue
            said = "; ".join(entry["departures"]).replace("|", "\\|") or "no"
            lines.append(f"| {label} | {task} | {entry['status']} | {entry['wall_seconds'] / 60:.1f} | "
                         f"`{shown_in(entry['run_dir'], report['output_dir'])}` | {said} |")
            if entry.get("error") or entry.get("note"):
                notes += [f"**{label} {task}** ({entry['status']}):", "", "```", entry.get("error") or entry["note"],
                          "```", ""]
    lines += [""] + notes
    lines += ["## Commands", "", "Each run's command, from the repository's root (report.json has its flags, attempts "
              "and data):", "", "```bash"]
    lines += [entry["command"] for runs in report["runs"].values() for entry in runs.values() if "command" in entry]
    lines += ["```", ""]
    if figures:
        lines += ["## Curves and pictures", ""]
        for caption, path in figures:
            lines += [f"{caption}:", "", f"![{caption.split(':')[0]}]({path})", ""] if path else [caption, ""]
    return "\n".join(lines)



def shown_in(path: str, folder: str) -> str:
    """`path` relative to `folder` when inside it."""
    rel = os.path.relpath(path, folder)
    return path if rel.startswith("..") else rel
