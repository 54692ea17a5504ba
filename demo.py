"""The DMJD demo on a laptop: Fashion-MNIST, a small ConViT pre-trained with DMJD on the CPU (and a picture of its
curves), linear probes of the pre-trained and of a randomly initialised encoder, and a picture of what the model
predicts. Run it with `bash demo.sh` (which sets up the environment and the data package) or directly with
`python demo.py`.

Every stage runs the project's own scripts, exactly as an ImageNet run would, on the ImageFolder tree that
`util/demo_data.py` writes. The commands are printed as they run, ready to paste into a shell in this folder.

The run folders it makes are named in `<output_dir>/.made_by_demo`; a new run replaces those and keeps every other
(such as the fine-tuning that its third next step writes). `--doc README.md FINETUNE.md` also runs that fine-tuning
and writes the figures into the docs' demo blocks (benchmarks/doc_block.py), with the machine and torch they came
from.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from benchmarks.doc_block import block_names, provenance, rewrite_block
from util.demo_commands import (DATA_DIR, PRETRAIN_EPOCHS, ROOT, DemoFinetune, DemoProbe, pretrain_command,
                                shown)
from util.demo_data import prepare_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DMJD demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DATA_DIR, help="where the ImageFolder goes")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "output_dir", "demo"),
                   help="pre-training, probes and the picture; the run folders that an earlier demo made there are "
                        "replaced, the others kept")
    p.add_argument("--pretrain_epochs", default=PRETRAIN_EPOCHS, type=int, help="DMJD pre-training epochs")
    p.add_argument("--probe_epochs", default=DemoProbe.epochs, type=int, help="linear-probe epochs")
    p.add_argument("--probe_train", default=DemoProbe.train_images, type=int,
                   help="training images of the probe (per-class subsample)")
    p.add_argument("--probe_blr", default=DemoProbe.blr, type=float,
                   help="LARS base lr: far above the 90-epoch ImageNet recipe's 0.1, for a probe of 2 epochs")
    p.add_argument("--max_train", default=None, type=int, help="use a per-class subsample of the training set")
    p.add_argument("--num_workers", default=2, type=int, help="data-loading workers of every stage")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--finetune", action="store_true",
                   help="also run the fine-tuning that the demo suggests as its third next step (FINETUNE.md)")
    p.add_argument("--doc", nargs="+", default=[], metavar="FILE",
                   help="markdown files whose demo blocks (" + ", ".join(DOC_BLOCKS) + ") get this run's figures, "
                        "e.g. README.md FINETUNE.md; implies --finetune")
    args = p.parse_args(argv)
    for doc in args.doc:
        if not set(DOC_BLOCKS) & set(block_names(doc) if os.path.isfile(doc) else []):
            p.error(f"--doc {doc}: no demo block in it (the lines <!-- name --> and <!-- /name --> of one of "
                    f"{', '.join(DOC_BLOCKS)})")
    args.finetune = args.finetune or bool(args.doc)
    return args


DOC_BLOCKS = ("demo_results", "demo_finetune")  # README.md's table of the demo, FINETUNE.md's first run
RUN_STAGES = {"pretrain": "pretrain", "probe_pretrained": "probe_pretrained", "probe_random": "probe_random_init",
              "finetune": "finetune"}  # stage -> its run folder in --output_dir
MADE_BY_DEMO = ".made_by_demo"  # in --output_dir: the run folders the demo made, one per line


def command_line(cmd: List[str]) -> str:
    """The command as a shell line that runs it unchanged (every argument quoted as the shell needs)."""
    return shlex.join(cmd)


def stage_commands(args, data: str, probe_data: str) -> Dict[str, List[str]]:
    """The argument lists of the demo's stages, and of the next steps it suggests; none holds an empty value, so
    each runs as printed."""
    python = shown(sys.executable)
    out = args.output_dir
    pretrained = os.path.join(out, "pretrain", "checkpoint-last.pth")
    checkpoint = shown(pretrained)
    probe = DemoProbe(args.probe_epochs, args.probe_blr, args.probe_train, args.num_workers, args.device)
    return {
        "pretrain": pretrain_command(data, os.path.join(out, "pretrain"), args.pretrain_epochs, args.num_workers,
                                     args.device),
        "probe_pretrained": probe.command(probe_data, os.path.join(out, "probe_pretrained"), pretrained),
        "probe_random": probe.command(probe_data, os.path.join(out, "probe_random_init")),
        "picture": [python, "visualize.py", "--checkpoint", checkpoint, "--data_path", shown(data), "--split", "val",
                    "--num_images", "6", "--output", shown(os.path.join(out, "predictions.png"))],
        # printed as next steps, not run
        "picture_3_views": [python, "visualize.py", "--checkpoint", checkpoint, "--data_path", shown(data),
                            "--split", "val", "--num_images", "6", "--num_views", "3",
                            "--output", shown(os.path.join(out, "predictions_3_views.png"))],
        "finetune": DemoFinetune(args.num_workers, args.device).command(probe_data, os.path.join(out, "finetune"),
                                                                        pretrained),
        # the environment's own TensorBoard: demo.sh's .venv has no `tensorboard` on the shell's PATH
        "tensorboard": [python, "-m", "tensorboard.main", "--logdir", shown(out)],
    }


def curves_command(args) -> List[str]:
    """plot_logs.py on the pre-training run: its loss, learning rate and (with an EMA teacher) momentum curves."""
    return [shown(sys.executable), "plot_logs.py", shown(os.path.join(args.output_dir, "pretrain")),
            "--out", shown(os.path.join(args.output_dir, "pretrain_curves.png"))]


def start_problem(cmd: List[str]) -> Optional[str]:
    """Why `cmd` would not start as printed, run from this folder (None: it would): its program, script or
    `-m` module is missing."""
    program = os.path.join(ROOT, cmd[0]) if os.sep in cmd[0] else shutil.which(cmd[0])
    if not program or not os.access(program, os.X_OK):
        return f"{cmd[0]} is not an executable program"
    if len(cmd) > 2 and cmd[1] == "-m":
        find = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({cmd[2]!r}) is None)"
        if subprocess.run([program, "-c", find], cwd=ROOT, capture_output=True).returncode:
            return f"{cmd[0]} has no module {cmd[2]}"
    elif len(cmd) > 1 and cmd[1].endswith(".py") and not os.path.isfile(os.path.join(ROOT, cmd[1])):
        return f"no script {cmd[1]} in {ROOT}"
    return None


LOAD = []  # the 5-minute load average at the end of each stage: how busy the machine was while it ran


def run(cmd: List[str]) -> float:
    print("\n$ " + command_line(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    if hasattr(os, "getloadavg"):
        LOAD.append(os.getloadavg()[1])
    return time.time() - start


def shared_machine_note(figures: dict) -> str:
    """A sentence when other work ran beside the demo (a 5-minute load average above the machine's cores at the end of
    some stage): its minutes are then longer than the demo takes alone; its accuracies are the same."""
    load, cores = figures.get("load"), figures.get("cores")
    if not load or not cores or load <= cores:
        return ""
    return (f" Other work shared the machine during this run (5-minute load average up to {load:.1f} on {cores} "
            f"cores): the minutes are longer than the demo takes alone; the accuracies do not depend on it.")


def accuracies(cmd: List[str]) -> List[float]:
    """Each epoch's top-1 of a fine-tuning or probing command, from its --output_dir's log.txt."""
    output_dir = os.path.join(ROOT, cmd[cmd.index("--output_dir") + 1])
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line)["test_acc1"] for line in f if line.strip()]


def final_accuracy(cmd: List[str]) -> float:
    """The last epoch's top-1 of a fine-tuning or probing command."""
    return accuracies(cmd)[-1]


def made_by_demo(output_dir: str) -> List[str]:
    path = os.path.join(output_dir, MADE_BY_DEMO)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def clear_runs(output_dir: str, folders: List[str]) -> None:
    """Removes the run folders `folders` of --output_dir that an earlier demo made (a fresh run each time, not a
    resumed one) and records them as the demo's; a folder of that name that the demo did not make stops it, and any
    other folder is left as it is."""
    made = made_by_demo(output_dir)
    for name in folders:
        path = os.path.join(output_dir, name)
        if os.path.lexists(path) and name not in made:
            raise SystemExit(f"error: {shown(path)} is not a run that the demo made (it is not listed in "
                             f"{shown(os.path.join(output_dir, MADE_BY_DEMO))}): the demo writes its {name} run there "
                             f"and keeps what it did not make. Move it away, or give another --output_dir")
    for name in folders:
        if os.path.isdir(os.path.join(output_dir, name)):
            shutil.rmtree(os.path.join(output_dir, name))
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, MADE_BY_DEMO), "w") as f:
        f.write("".join(f"{name}\n" for name in dict.fromkeys(made + folders)))


def results_block(figures: dict) -> str:
    """README.md's demo_results block: what each stage gave and took."""
    minutes = figures["minutes"]
    rows = []
    if "environment" in minutes:
        rows.append(("the environment (demo.sh: .venv, the PyTorch check, the requirements)", "-",
                     minutes["environment"]))
    rows += [(f"DMJD pre-training, {figures['pretrain_epochs']} epochs of {figures['pretrain_images']:,} Fashion-MNIST "
              "images", "-", minutes["pretrain"]),
             (f"linear probe of the pre-trained encoder ({figures['probe_epochs']} epochs, "
              f"{figures['probe_train']:,} images)", f"{figures['probe_pretrained']:.2f}% top-1",
              minutes["probe_pretrained"]),
             ("linear probe of the same encoder, randomly initialised", f"{figures['probe_random']:.2f}% top-1",
              minutes["probe_random"]),
             ("the demo in all (with its data, curves and picture)",
              f"{figures['probe_pretrained'] - figures['probe_random']:+.2f} points from pre-training",
              minutes["demo"])]
    if "finetune" in figures:
        rows.append((f"fine-tuning, the third next step ({len(figures['finetune'])} epochs; FINETUNE.md)",
                     f"{figures['finetune'][-1]:.2f}% top-1", minutes["finetune"]))
    lines = ["| stage | top-1 on the 10,000 test images | minutes |", "|---|---|---|"]
    lines += [f"| {stage} | {result} | {value:.1f} |" for stage, result, value in rows]
    return f"`{figures['command']}` ({figures['provenance']}):{shared_machine_note(figures)}\n\n" + "\n".join(lines)


def finetune_block(figures: dict) -> str:
    """FINETUNE.md's demo_finetune block: the fine-tuning's figures, by epoch."""
    epochs = figures["finetune"]
    by_epoch = ", ".join(f"{a:.2f}" for a in epochs[:-1]) + f" and {epochs[-1]:.2f}%"
    return (f"`{figures['command']}` ({figures['provenance']}): {figures['minutes']['finetune']:.1f} minutes, "
            f"**{epochs[-1]:.2f}%** top-1 on the 10,000 test images ({by_epoch} after epochs 1 to {len(epochs)}), "
            f"from the demo's {figures['pretrain_epochs']}-epoch checkpoint, whose linear probe gave "
            f"{figures['probe_pretrained']:.2f}% against {figures['probe_random']:.2f}% for the randomly initialised "
            f"encoder.{shared_machine_note(figures)}")


def write_docs(docs: List[str], figures: dict) -> None:
    """The demo blocks of each of `docs` that this run has figures for."""
    texts = {"demo_results": results_block(figures)}
    if "finetune" in figures:
        texts["demo_finetune"] = finetune_block(figures)
    for doc in docs:
        for name in block_names(doc):
            if name in texts:
                rewrite_block(doc, name, texts[name])


def print_summary(args, commands: dict, seconds: dict, results: dict) -> None:
    """The demo's result: each probe's top-1, their difference and the minutes (the fine-tuning's with --finetune)."""
    print("\n" + "=" * 78)
    print(f"Fashion-MNIST linear probe ({args.probe_epochs} epochs on {args.probe_train} images), top-1 on the "
          f"10,000 test images:")
    print(f"  encoder pre-trained with DMJD for {args.pretrain_epochs} epochs ({seconds['pretrain'] / 60:.1f} min): "
          f"{results['pre-trained']:.2f}%")
    print(f"  the same encoder, randomly initialised:        {results['random init']:.2f}%")
    print(f"  difference: {results['pre-trained'] - results['random init']:+.2f} points; "
          f"demo time {seconds['demo'] / 60:.1f} min")
    if args.finetune:
        print(f"  fine-tuned ({commands['finetune'][commands['finetune'].index('--epochs') + 1]} epochs, "
              f"{seconds['finetune'] / 60:.1f} min): {results['fine-tuned']:.2f}%")
    print("=" * 78)


def run_figures(args, data: str, commands: dict, seconds: dict, results: dict, demo_sh: bool) -> dict:
    """What write_docs puts in the docs' blocks from this run."""
    # the command as given, as the docs write commands: demo.sh's when it started this run, else `python demo.py`
    # (the environment's python, never this machine's path to it)
    command = ("bash demo.sh " if demo_sh else "python demo.py ") + shlex.join(sys.argv[1:])
    return {"command": command, "provenance": demo_provenance(args.device),
            "pretrain_epochs": args.pretrain_epochs, "pretrain_images": len_train(data),
            "probe_epochs": args.probe_epochs,
            "probe_train": args.probe_train, "probe_pretrained": results["pre-trained"],
            "probe_random": results["random init"], "finetune": accuracies(commands["finetune"]),
            "minutes": {k: v / 60 for k, v in seconds.items()},
            "load": max(LOAD, default=None), "cores": os.cpu_count()}


def main(args):
    start = time.time()
    args.output_dir = os.path.abspath(args.output_dir)
    stages = ["pretrain", "probe_pretrained", "probe_random"] + (["finetune"] if args.finetune else [])
    clear_runs(args.output_dir, [RUN_STAGES[stage] for stage in stages])
    data = prepare_fashion_mnist(args.data, max_train=args.max_train, verbose=True)
    # The probe trains on a per-class subsample (a second ImageFolder tree) and is tested on all 10,000 images.
    probe = DemoProbe(train_images=args.probe_train)
    probe_data = probe.prepare(probe.data(args.data))
    commands = stage_commands(args, data, probe_data)

    seconds = {"pretrain": run(commands["pretrain"])}
    run(curves_command(args))
    results = {}
    for name, stage in (("pre-trained", "probe_pretrained"), ("random init", "probe_random")):
        seconds[stage] = run(commands[stage])
        results[name] = final_accuracy(commands[stage])
    run(commands["picture"])
    setup = os.environ.get("DEMO_SETUP_SECONDS")  # demo.sh's part
    seconds["demo"] = time.time() - start + (float(setup) if setup else 0.0)
    if setup:
        seconds["environment"] = float(setup)
    if args.finetune:
        seconds["finetune"] = run(commands["finetune"])
        results["fine-tuned"] = final_accuracy(commands["finetune"])

    out = shown(args.output_dir)
    print_summary(args, commands, seconds, results)
    if args.doc:
        write_docs(args.doc, run_figures(args, data, commands, seconds, results, demo_sh=bool(setup)))
    print(f"\nFiles (in {out}/):")
    print("  pretrain/checkpoint-last.pth   the pre-trained DMJD model (encoder, decoder, visible branch)")
    print("  pretrain/log.txt, probe_*/log.txt   one JSON line per epoch")
    print("  pretrain_curves.png            the pre-training curves (plot_logs.py draws any runs' log.txt)")
    print("  predictions.png                masks, the tokens each view predicts, HOG target and predictions")
    print(f"  data: {shown(data)} (ImageFolder train/ and val/), {shown(probe_data)} (the probe's subsample)")
    kept = [name for name in sorted(os.listdir(args.output_dir))
            if os.path.isdir(os.path.join(args.output_dir, name)) and name not in [RUN_STAGES[s] for s in stages]]
    if kept:
        print(f"  kept from before (not made by this run): {', '.join(kept)}")
    print("\nNext steps:")
    for name in ("picture_3_views", "tensorboard", "finetune"):
        problem = start_problem(commands[name])
        if problem:  # say so rather than print a command that fails
            print(f"  (warning: {problem}; install requirements.txt to run the next step below)")
    print(f"  1. Look at {out}/predictions.png, or draw other images or more views:")
    print("       " + command_line(commands["picture_3_views"]))
    print("  2. Watch the losses and the pictures in TensorBoard:  " + command_line(commands["tensorboard"]))
    if args.finetune:
        print(f"  3. The fine-tuned encoder is in {out}/finetune (FINETUNE.md says what else to try)")
    else:
        print("  3. Fine-tune the pre-trained encoder (a few minutes on the CPU; see FINETUNE.md):")
        print("       " + command_line(commands["finetune"]))
        if "finetune" in kept:  # run as printed, the command would resume that run
            print(f"     ({out}/finetune holds an earlier fine-tuning, which the command resumes: give another "
                  f"--output_dir for a new one)")
    return results


def len_train(data: str) -> int:
    """The images of an ImageFolder's train/ split."""
    return sum(len(files) for _, _, files in os.walk(os.path.join(data, "train")))


def demo_provenance(device: str) -> str:
    """When, on what and with which torch the stages ran (they run with this interpreter and --device)."""
    from util.misc import resolve_device
    return provenance(resolve_device(device))


if __name__ == "__main__":
    main(parse_args())
