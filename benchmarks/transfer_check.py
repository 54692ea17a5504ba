"""What the small transfer checks on the CPU share (benchmarks.segmentation_check, benchmarks.detection_check): the
demo's pre-trained checkpoint (made on request), the common flags, the two fine-tunings (from the DMJD-pre-trained
encoder and from a random one, the same flags and seed otherwise) started as printed commands of the real script,
their last scores, a run's config rebuilt from its checkpoint, and the summary file and report."""
import argparse
import dataclasses
import json
import os
import shutil
import shlex
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from util.demo_commands import DATA_DIR, DEMO_CHECKPOINT, PRETRAIN_EPOCHS, PRETRAIN_MODEL, pretrain_command, shown
from util.demo_data import prepare_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"pretrained": "DMJD pre-trained", "random_init": "random init"}


def check_parser(description: str, recipe, output_dir: str) -> argparse.ArgumentParser:
    """The flags every check has, their defaults the check's recipe (util.demo_commands: SegmentationCheck,
    DetectionCheck); a check adds its model's own, and `recipe_of` reads them back into its recipe."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained", default=DEMO_CHECKPOINT,
                   help="the demo's DMJD pre-training checkpoint (made by `python demo.py`)")
    p.add_argument("--pretrain", action="store_true",
                   help="if --pretrained is missing, make it with the demo's pre-training stage first")
    p.add_argument("--data", default=recipe.data, help="dataset root")
    p.add_argument("--source", default=None, help="folder of the Fashion-MNIST idx files (none: the demo's)")
    p.add_argument("--num_train", default=recipe.num_train, type=int, help="training canvases")
    p.add_argument("--num_val", default=recipe.num_val, type=int, help="validation canvases")
    p.add_argument("--output_dir", default=output_dir, help="both runs, the summary and the picture")
    p.add_argument("--iters", default=recipe.iters, type=int, help="fine-tuning iterations of each run")
    p.add_argument("--batch_size", default=recipe.batch_size, type=int, help="images per iteration")
    p.add_argument("--picture", default=None, help="where the picture goes (none: <output_dir>/predictions.png)")
    p.add_argument("--num_workers", default=recipe.num_workers, type=int,
                   help="data-loading workers of each run (on 2 cores more than 1 slows the step down)")
    p.add_argument("--device", default=recipe.device, help="auto, cpu or cuda")
    p.add_argument("--seed", default=recipe.seed, type=int,
                   help="seeds both runs alike (the dataset is always the same)")
    return p


def recipe_of(args, recipe):
    """The check's recipe with the values of its command line (a flag of the same name as each field)."""
    return dataclasses.replace(recipe, **{f.name: (tuple(getattr(args, f.name)) if isinstance(f.default, tuple)
                                                   else getattr(args, f.name))
                                          for f in dataclasses.fields(recipe)})


def run(cmd: List[str]) -> float:
    """Runs a printed command from the checkout's root; returns its seconds."""
    print("\n$ " + shlex.join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def make_pretrained(args) -> None:
    """The demo's pre-training stage, as demo.py runs it, into --pretrained's folder."""
    out = os.path.dirname(os.path.abspath(args.pretrained))
    data = prepare_fashion_mnist(DATA_DIR, sources=[args.source] if args.source else None, verbose=True)
    run(pretrain_command(data, out, PRETRAIN_EPOCHS, args.num_workers, args.device))


def ensure_pretrained(args) -> None:
    """--pretrained exists, or is made with --pretrain; else the check stops saying how to make it."""
    if os.path.isfile(args.pretrained):
        return
    if not args.pretrain:
        raise SystemExit(f"error: no pre-trained checkpoint at {args.pretrained}. Make it with "
                         f"`{shown(sys.executable)} demo.py` (about 10-20 minutes on 2 CPU cores), or run this check "
                         f"with --pretrain to run only the demo's pre-training stage, or give another DMJD "
                         f"checkpoint of {PRETRAIN_MODEL} with --pretrained")
    make_pretrained(args)


def prepared_data(recipe, args) -> str:
    """The check's dataset at --data (`recipe.prepare`; its own fixed seed: --seed seeds the two runs, not the data);
    a bad source stops the check naming it."""
    try:
        return recipe.prepare(args.data, [args.source] if args.source else None)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def last_scores(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "log.txt")) as f:
        return json.loads(f.read().splitlines()[-1])


def fine_tune_both(args, command: Callable[[str, Optional[str]], List[str]]) -> Dict[str, dict]:
    """Both runs, each in a fresh `<output_dir>/<run>` (never a resumed one): `command(output_dir, finetune)` with
    --pretrained for the pre-trained run and None for the random one. Returns {run: {"dir", "seconds", "scores"}}
    (scores: the last log.txt record)."""
    runs = {}
    for name in RUNS:
        out = os.path.join(args.output_dir, name)
        if os.path.isdir(out):  # the benchmark's own folder, subfolders too (a bf16 evaluation's)
            shutil.rmtree(out)
        seconds = run(command(out, args.pretrained if name == "pretrained" else None))
        runs[name] = {"dir": out, "seconds": seconds, "scores": last_scores(out)}
    return runs


def saved_config(ckpt: dict, parser: argparse.ArgumentParser, config_cls):
    """A run's config from its checkpoint's saved flags, on the CPU in fp32; a flag the checkpoint predates takes the
    value its run had (training.flags.flag's `absent`)."""
    from training.flags import absent_values
    saved = {**absent_values(parser), **ckpt["args"], "device": "cpu", "amp": "none"}
    return config_cls(**{f.name: saved[f.name] for f in dataclasses.fields(config_cls)})


def write_summary(args, summary: Dict[str, dict]) -> None:
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"iters": args.iters, "batch_size": args.batch_size, "pretrained": args.pretrained, **summary}, f,
                  indent=1)


def report(title: str, lines: Dict[str, str], summary: Dict[str, dict], gain: str, picture: str,
           start: float) -> None:
    """The closing block: `title`, a line per run (`lines[run]`, then its minutes), the gain of pre-training."""
    print("\n" + "=" * 78)
    print(title)
    for name, label in RUNS.items():
        print(f"  {label:<17} {lines[name]}  ({summary[name]['minutes']:.1f} min)")
    print(f"  pre-training gives {gain}; picture: {picture}; check time {(time.time() - start) / 60:.1f} min")
    print("=" * 78)
