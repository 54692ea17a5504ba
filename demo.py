"""The DMJD demo on a laptop: Fashion-MNIST, a small ConViT pre-trained with DMJD on the CPU, and linear probes of
the pre-trained and of a randomly initialised encoder. Run it with `bash demo.sh` (which sets up the environment and
the data package) or directly with `python demo.py`.

Every stage runs the project's own scripts, exactly as an ImageNet run would, on the ImageFolder tree that
`util/demo_data.py` writes; the commands are printed so that they can be re-run by hand.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from util.demo_data import prepare_fashion_mnist

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser("DMJD demo")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "fashion_mnist"), help="where the ImageFolder goes")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "output_dir", "demo"))
    p.add_argument("--pretrain_epochs", default=2, type=int)
    p.add_argument("--probe_epochs", default=2, type=int)
    p.add_argument("--probe_train", default=20000, type=int, help="training images of the probe (per-class subsample)")
    p.add_argument("--probe_blr", default=10.0, type=float,
                   help="LARS base lr: far above the 90-epoch ImageNet recipe's 0.1, for a probe of 2 epochs")
    p.add_argument("--max_train", default=None, type=int, help="use a per-class subsample of the training set")
    p.add_argument("--num_workers", default=2, type=int)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def run(cmd):
    print("\n$ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def final_accuracy(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return json.loads(f.read().splitlines()[-1])["test_acc1"]


def main(args):
    start = time.time()
    if os.path.isdir(args.output_dir):  # a fresh run each time, not a resumed one
        shutil.rmtree(args.output_dir)
    data = prepare_fashion_mnist(args.data, max_train=args.max_train, verbose=True)
    common = ["--input_size", "32", "--num_workers", str(args.num_workers), "--device", args.device,
              "--data_path", data, "--print_freq", "50"]
    pre_dir = os.path.join(args.output_dir, "pretrain")
    pretrain_s = run([sys.executable, "main_pretrain.py", "--model", "dmjd_convit_mini_patch8_hog",
                      "--mask_type", "rand", "--batch_size", "128", "--epochs", str(args.pretrain_epochs),
                      "--warmup_epochs", "0.2", "--blr", "1.5e-3", "--min_crop_scale", "0.6",
                      "--output_dir", pre_dir, *common])
    checkpoint = os.path.join(pre_dir, "checkpoint-last.pth")

    # The probe trains on a per-class subsample (a second ImageFolder tree) and is tested on all 10,000 images.
    probe_data = prepare_fashion_mnist(args.data + f"_probe{args.probe_train}", max_train=args.probe_train,
                                       verbose=True)
    probe_common = [c if c != data else probe_data for c in common]
    probe = [sys.executable, "main_linprobe.py", "--model", "convvit_mini_patch8", "--nb_classes", "10",
             "--batch_size", "256", "--epochs", str(args.probe_epochs), "--warmup_epochs", "0",
             "--blr", str(args.probe_blr), "--min_crop_scale", "0.6", *probe_common]
    results = {}
    for name, extra in (("pre-trained", ["--finetune", checkpoint]), ("random init", [])):
        out = os.path.join(args.output_dir, "probe_" + name.replace(" ", "_").replace("-", "_"))
        run(probe + ["--output_dir", out, "--resume", "", *extra])
        results[name] = final_accuracy(out)

    print("\n" + "=" * 72)
    print(f"Fashion-MNIST linear probe ({args.probe_epochs} epochs on {args.probe_train} images), top-1 on the "
          f"10,000 test images:")
    print(f"  encoder pre-trained with DMJD for {args.pretrain_epochs} epochs ({pretrain_s / 60:.1f} min): "
          f"{results['pre-trained']:.2f}%")
    print(f"  the same encoder, randomly initialised:        {results['random init']:.2f}%")
    print(f"  difference: {results['pre-trained'] - results['random init']:+.2f} points; "
          f"demo time {(time.time() - start) / 60:.1f} min")
    print("=" * 72)
    return results


if __name__ == "__main__":
    main(parse_args())
