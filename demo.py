"""The DMJD demo on a laptop: Fashion-MNIST, a small ConViT pre-trained with DMJD on the CPU (and a picture of its
curves), linear probes of the pre-trained and of a randomly initialised encoder, and a picture of what the model
predicts. Run it with `bash demo.sh` (which sets up the environment and the data package) or directly with
`python demo.py`.

Every stage runs the project's own scripts, exactly as an ImageNet run would, on the ImageFolder tree that
`util/demo_data.py` writes. The commands are printed as they run, ready to paste into a shell in this folder.
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

from util.demo_commands import CLASSIFIER, DATA_DIR, PRETRAIN_EPOCHS, ROOT, common_flags, pretrain_command, shown
from util.demo_data import prepare_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DMJD demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DATA_DIR, help="where the ImageFolder goes")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "output_dir", "demo"),
                   help="pre-training, probes and the picture (emptied at start)")
    p.add_argument("--pretrain_epochs", default=PRETRAIN_EPOCHS, type=int, help="DMJD pre-training epochs")
    p.add_argument("--probe_epochs", default=2, type=int, help="linear-probe epochs")
    p.add_argument("--probe_train", default=20000, type=int, help="training images of the probe (per-class subsample)")
    p.add_argument("--probe_blr", default=10.0, type=float,
                   help="LARS base lr: far above the 90-epoch ImageNet recipe's 0.1, for a probe of 2 epochs")
    p.add_argument("--max_train", default=None, type=int, help="use a per-class subsample of the training set")
    p.add_argument("--num_workers", default=2, type=int, help="data-loading workers of every stage")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def command_line(cmd: List[str]) -> str:
    """The command as a shell line that runs it unchanged (every argument quoted as the shell needs)."""
    return shlex.join(cmd)


def stage_commands(args, data: str, probe_data: str) -> Dict[str, List[str]]:
    """The argument lists of the demo's stages, and of the next steps it suggests; none holds an empty value, so
    each runs as printed."""
    python = shown(sys.executable)
    out = args.output_dir
    common = common_flags(args.num_workers, args.device)
    checkpoint = shown(os.path.join(out, "pretrain", "checkpoint-last.pth"))
    probe = [python, "main_linprobe.py", "--model", CLASSIFIER, "--nb_classes", "10", "--batch_size", "256",
             "--epochs", str(args.probe_epochs), "--warmup_epochs", "0", "--blr", str(args.probe_blr),
             "--min_crop_scale", "0.6", *common, "--data_path", shown(probe_data)]
    return {
        "pretrain": pretrain_command(data, os.path.join(out, "pretrain"), args.pretrain_epochs, args.num_workers,
                                     args.device),
        "probe_pretrained": probe + ["--finetune", checkpoint, "--output_dir", shown(os.path.join(out, "probe_pretrained"))],
        "probe_random": probe + ["--output_dir", shown(os.path.join(out, "probe_random_init"))],
        "picture": [python, "visualize.py", "--checkpoint", checkpoint, "--data_path", shown(data), "--split", "val",
                    "--num_images", "6", "--output", shown(os.path.join(out, "predictions.png"))],
        # printed as next steps, not run
        "picture_3_views": [python, "visualize.py", "--checkpoint", checkpoint, "--data_path", shown(data),
                            "--split", "val", "--num_images", "6", "--num_views", "3",
                            "--output", shown(os.path.join(out, "predictions_3_views.png"))],
        "finetune": [python, "main_finetune.py", "--model", CLASSIFIER, "--finetune", checkpoint, "--nb_classes", "10",
                     "--batch_size", "128", "--epochs", "3", "--warmup_epochs", "0.2", "--blr", "5e-3",
                     "--layer_decay", "0.75", "--drop_path", "0.0", "--aa", "rand-m9-mstd0.5-inc1",
                     "--mixup", "0", "--cutmix", "0", "--reprob", "0", *common,
                     "--data_path", shown(probe_data), "--output_dir", shown(os.path.join(out, "finetune"))],
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


def run(cmd: List[str]) -> float:
    print("\n$ " + command_line(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def final_accuracy(cmd: List[str]) -> float:
    """The last epoch's top-1 of a fine-tuning or probing command, from its --output_dir's log.txt."""
    output_dir = os.path.join(ROOT, cmd[cmd.index("--output_dir") + 1])
    with open(os.path.join(output_dir, "log.txt")) as f:
        return json.loads(f.read().splitlines()[-1])["test_acc1"]


def main(args):
    start = time.time()
    args.output_dir = os.path.abspath(args.output_dir)
    if os.path.isdir(args.output_dir):  # a fresh run each time, not a resumed one
        shutil.rmtree(args.output_dir)
    data = prepare_fashion_mnist(args.data, max_train=args.max_train, verbose=True)
    # The probe trains on a per-class subsample (a second ImageFolder tree) and is tested on all 10,000 images.
    probe_data = prepare_fashion_mnist(args.data + f"_probe{args.probe_train}", max_train=args.probe_train,
                                       verbose=True)
    commands = stage_commands(args, data, probe_data)

    pretrain_s = run(commands["pretrain"])
    run(curves_command(args))
    results = {}
    for name, stage in (("pre-trained", "probe_pretrained"), ("random init", "probe_random")):
        run(commands[stage])
        results[name] = final_accuracy(commands[stage])
    run(commands["picture"])

    out = shown(args.output_dir)
    print("\n" + "=" * 78)
    print(f"Fashion-MNIST linear probe ({args.probe_epochs} epochs on {args.probe_train} images), top-1 on the "
          f"10,000 test images:")
    print(f"  encoder pre-trained with DMJD for {args.pretrain_epochs} epochs ({pretrain_s / 60:.1f} min): "
          f"{results['pre-trained']:.2f}%")
    print(f"  the same encoder, randomly initialised:        {results['random init']:.2f}%")
    print(f"  difference: {results['pre-trained'] - results['random init']:+.2f} points; "
          f"demo time {(time.time() - start) / 60:.1f} min")
    print("=" * 78)
    print(f"\nFiles (in {out}/):")
    print("  pretrain/checkpoint-last.pth   the pre-trained DMJD model (encoder, decoder, visible branch)")
    print("  pretrain/log.txt, probe_*/log.txt   one JSON line per epoch")
    print("  pretrain_curves.png            the pre-training curves (plot_logs.py draws any runs' log.txt)")
    print("  predictions.png                masks, the tokens each view predicts, HOG target and predictions")
    print(f"  data: {shown(data)} (ImageFolder train/ and val/), {shown(probe_data)} (the probe's subsample)")
    print("\nNext steps:")
    for name in ("picture_3_views", "tensorboard", "finetune"):
        problem = start_problem(commands[name])
        if problem:  # say so rather than print a command that fails
            print(f"  (warning: {problem}; install requirements.txt to run the next step below)")
    print(f"  1. Look at {out}/predictions.png, or draw other images or more views:")
    print("       " + command_line(commands["picture_3_views"]))
    print("  2. Watch the losses and the pictures in TensorBoard:  " + command_line(commands["tensorboard"]))
    print("  3. Fine-tune the pre-trained encoder (a few minutes on the CPU; see FINETUNE.md):")
    print("       " + command_line(commands["finetune"]))
    return results


if __name__ == "__main__":
    main(parse_args())
