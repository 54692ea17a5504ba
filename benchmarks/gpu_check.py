"""The speed check of one GPU machine, in one command of under 5 minutes:

    python benchmarks/gpu_check.py --out perf_report

1. The machine: card, memory, CPU cores, torch / CUDA / cuDNN / timm versions.
2. The dense bf16 peak, measured with a large matmul (the reference for "% of peak").
3. The input pipeline: an ImageNet-like JPEG folder is written (benchmarks/jpeg_folder.py), then decoded, cropped,
   flipped, collated and copied to the GPU by as many workers as there are cores, in images/s.
4. The pre-training step of ConViT-B DMJD (224 px, 2 views, decoder 8) for each fast path but compile against the
   plain fp32 path at the same batch: images/s, ratio, TFLOP/s and % of peak.
5. Activation memory per image (fp32, bf16) and the largest batch that fits.
6. All fast paths together at the largest batch that fits (--target_batch), eager and then compiled, with their
   ratios to the plain path.
7. Where the eager step's time goes (--profile_path): the operators with the most device time, the share of the
   matmul-like ones, and how busy the GPU is (well under 100% means it waits for the host).
8. torch.compile alone at the comparison batch (compiling takes a minute or two, so last).
A path that fails (a compiler error, say) is reported with its traceback and the check goes on.
9. The verdict: images/s of the best step times the dense model's FLOPs per image (the plain path's count, the
   work the authors' release does per image), as a fraction of the measured peak, against --target_fraction; the
   executed fraction too (the sparse conv stages execute fewer FLOPs); and whether the input pipeline keeps up.

Everything printed also goes to <out>/gpu_check.md, and the figures to <out>/gpu_check.json, as they are measured:
a run stopped early keeps what it has. Stages not started by --budget_s are skipped (and say so).
It runs on the CPU too (--device cpu with a tiny model), which is how the test suite keeps it working.
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import throughput  # noqa: E402
from benchmarks.jpeg_folder import make_jpeg_folder  # noqa: E402
from util.misc import resolve_device  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DMJD GPU speed check",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--model", default="dmjd_convit_base_patch16_dec8_hog", help="the DMJD model timed")
    p.add_argument("--input_size", default=224, type=int, help="crop size in pixels")
    p.add_argument("--batch_size", default=64, type=int, help="batch of the per-path comparison (fits fp32)")
    p.add_argument("--target_batch", default=None, type=int,
                   help="batch of the all-fast-paths run (none: the largest that fits in bf16, a multiple of 32, "
                        "at most 256)")
    p.add_argument("--paths", default="plain,sparse_stages,fused_attn,fused_adamw,channels_last,bf16,hog_once,"
                                      "device_masks,no_sync",
                   help="compared at --batch_size, the first being the baseline")
    p.add_argument("--target_paths", default="all_eager,all", help="run at --target_batch")
    p.add_argument("--profile_path", default="all_eager",
                   help="profiled at --target_batch after the target paths: time per operator ('' to skip)")
    p.add_argument("--last_paths", default="compile", help="run last, at --batch_size")
    p.add_argument("--warmup", default=3, type=int, help="untimed steps per path")
    p.add_argument("--steps", default=8, type=int, help="timed steps per path")
    p.add_argument("--num_images", default=8192, type=int, help="JPEGs written for the input pipeline")
    p.add_argument("--data_batch", default=64, type=int, help="batch of the input-pipeline timing")
    p.add_argument("--num_workers", default=None, type=int, help="loader workers (none: the CPU count)")
    p.add_argument("--target_fraction", default=0.40, type=float, help="of the measured dense bf16 peak")
    p.add_argument("--budget_s", default=180, type=float,
                   help="seconds after which no stage (path) starts; a compile takes a minute or two, so one "
                        "started just before ends the check within 5 minutes")
    return p.parse_args(argv)


class Report:
    def __init__(self, out):
        os.makedirs(out, exist_ok=True)
        self.md_path, self.json_path = os.path.join(out, "gpu_check.md"), os.path.join(out, "gpu_check.json")
        self.figures = {}
        open(self.md_path, "w").close()

    def line(self, text=""):
        print(text, flush=True)
        with open(self.md_path, "a") as f:
            f.write(text + "\n")

    @contextlib.contextmanager
    def verbatim(self):
        """What is printed inside goes to the terminal and, as a code block, to the report."""
        self.line("```")
        with open(self.md_path, "a") as f, contextlib.redirect_stdout(_Tee(sys.stdout, f)):
            yield
        self.line("```")

    def save(self, key, value):
        self.figures[key] = value
        with open(self.json_path, "w") as f:
            json.dump(self.figures, f, indent=1, default=str)


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def step_args(cli, device, batch, paths):
    return throughput.parse_args([
        "--model", cli.model, "--input_size", str(cli.input_size), "--batch_size", str(batch), "--paths", paths,
        "--warmup", str(cli.warmup), "--steps", str(cli.steps), "--device", str(device)])


def main(cli):
    start = time.perf_counter()
    deadline = start + cli.budget_s
    device = resolve_device(cli.device)
    report = Report(cli.out)
    workers = cli.num_workers if cli.num_workers is not None else os.cpu_count()

    report.line("## Machine")
    machine = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            machine["nvidia_smi"] = smi.stdout.strip()
    for key, value in machine.items():
        report.line(f"- {key}: {value}")
    report.save("machine", machine)

    report.line("\n## Dense peak")
    peak, dtype = throughput.measure_matmul_tflops(device)
    report.line(f"{peak:.1f} TFLOP/s ({str(dtype).replace('torch.', '')} matmul)")
    report.save("peak_tflops", peak)

    report.line(f"\n## Input pipeline ({workers} workers)")
    with tempfile.TemporaryDirectory() as tmp:
        mean_bytes, mean_pixels = make_jpeg_folder(tmp, cli.num_images, workers=os.cpu_count())
        report.line(f"{cli.num_images} JPEGs, {mean_bytes / 1024:.0f} KB and {mean_pixels / 1e3:.0f} kpixels on average")
        data_args = throughput.parse_args(["--data", tmp, "--num_workers", str(workers), "--batch_size",
                                           str(cli.data_batch), "--input_size", str(cli.input_size), "--device",
                                           str(device)])
        with report.verbatim():
            data_ips = throughput.run_data(data_args)
    report.save("data_images_per_s", data_ips)

    report.line(f"\n## Pre-training step, each fast path (batch {cli.batch_size})")
    with report.verbatim():
        results = throughput.run_steps(step_args(cli, device, cli.batch_size, cli.paths), deadline=deadline,
                                       keep_going=True)
    _table(report, results, peak)
    report.save("paths", results["paths"])
    measured = [r for r in results["paths"].values() if "images_per_s" in r]
    base_ips = measured[0]["images_per_s"] if measured else None

    report.line("\n## Memory")
    memory = {}
    if time.perf_counter() < deadline:
        for amp in ("none", "bf16"):
            per_image, fixed, largest, capacity = throughput.memory_estimate(
                step_args(cli, device, cli.batch_size, "plain"), device, amp)
            memory[amp] = {"activation_mib_per_image": per_image / 2 ** 20, "fixed_gib": fixed / 2 ** 30,
                           "largest_batch": largest}
            report.line(f"- {'fp32' if amp == 'none' else amp}: "
                        f"{throughput.memory_line(per_image, fixed, largest, capacity)}")
        report.save("memory", memory)
    else:
        report.line("skipped: out of time")

    target_batch = cli.target_batch
    if target_batch is None:
        largest = memory.get("bf16", {}).get("largest_batch") or 2 * cli.batch_size
        target_batch = max(cli.batch_size, min(256, largest // 32 * 32))
    report.line(f"\n## {cli.target_paths} at batch {target_batch} (ratios to {cli.paths.split(',')[0]} at batch "
                f"{cli.batch_size})")
    target = {"paths": {}}
    profile_batch = target_batch
    with report.verbatim():
        at_target = throughput.run_steps(step_args(cli, device, target_batch, cli.target_paths), deadline, base_ips,
                                         keep_going=True)
        target["paths"].update({f"{name} (batch {target_batch})": r for name, r in at_target["paths"].items()})
        too_big = [name for name, r in at_target["paths"].items() if r.get("out_of_memory")]
        if too_big and target_batch > cli.batch_size:  # only these again, at the comparison batch
            retry = throughput.run_steps(step_args(cli, device, cli.batch_size, ",".join(too_big)), deadline,
                                         base_ips, keep_going=True)
            target["paths"].update({f"{name} (batch {cli.batch_size})": r for name, r in retry["paths"].items()})
            if cli.profile_path in too_big:
                profile_batch = cli.batch_size
    _table(report, target, peak)
    report.save("target", target["paths"])

    if cli.profile_path:  # a few seconds, so not held to the budget: the compile before it may have used it up
        _profile(report, cli, device, profile_batch)

    last = {"paths": {}}
    if cli.last_paths:
        report.line(f"\n## {cli.last_paths} at batch {cli.batch_size}")
        with report.verbatim():
            last = throughput.run_steps(step_args(cli, device, cli.batch_size, cli.last_paths), deadline, base_ips,
                                        keep_going=True)
        _table(report, last, peak)
        report.save("last", last["paths"])

    report.line("\n## Verdict")
    best = max((r for part in (results, target, last) for r in part["paths"].values() if "tflops" in r),
               key=lambda r: r["images_per_s"], default=None)  # not TFLOP/s: the sparse stages execute fewer
    if best is None:
        report.line("no step was measured")
    else:
        # The target is stated in the dense model's work per image (what the authors' release computes); the
        # sparse conv stages do less for the same result, so both figures are given.
        baseline = next(iter(results["paths"].values()), {})
        dense_gflops = baseline.get("gflops_fwd_bwd", best["gflops_fwd_bwd"])
        executed = best["tflops"] / peak
        equivalent = best["images_per_s"] * dense_gflops / 1e3 / peak
        needed = cli.target_fraction * peak * 1e3 / dense_gflops
        report.line(f"- best step: {best['images_per_s']:.0f} images/s; executed {best['tflops']:.3g} TFLOP/s = "
                    f"{100 * executed:.1f}% of the measured peak ({best['gflops_fwd_bwd']:.4g} GFLOPs per image)")
        report.line(f"- in the dense model's {dense_gflops:.4g} GFLOPs per image: {100 * equivalent:.1f}% of the "
                    f"measured peak; the target, {100 * cli.target_fraction:.0f}%, is {needed:.0f} images/s: "
                    f"{'met' if equivalent >= cli.target_fraction else 'NOT met'}")
        report.line(f"- input pipeline: {data_ips:.0f} images/s against the step's {best['images_per_s']:.0f}: "
                    f"{'keeps up' if data_ips >= best['images_per_s'] else 'does NOT keep up'}")
        report.save("verdict", {"images_per_s": best["images_per_s"], "executed_fraction_of_peak": executed,
                                "dense_equivalent_fraction_of_peak": equivalent, "target_images_per_s": needed,
                                "data_images_per_s": data_ips})
    report.line(f"\n{time.perf_counter() - start:.0f} s in all")


def _profile(report, cli, device, batch):
    report.line(f"\n## Where the time goes ({cli.profile_path}, batch {batch})")
    try:
        prof = throughput.profile_path(step_args(cli, device, batch, cli.profile_path), device,
                                       throughput.path_config(cli.profile_path, device))
    except Exception as err:  # a profiler that fails here must not cost the verdict
        report.line(f"failed: {type(err).__name__}: {err}")
        return
    busy = f"device busy {100 * prof['busy_fraction']:.0f}% of the wall time; " if prof["busy_fraction"] else ""
    report.line(f"{prof['wall_ms_per_step']:.1f} ms per step; {busy}matmul, attention and convolution operators "
                f"{100 * prof['matmul_fraction']:.0f}% of the operators' self time")
    report.line("\n| operator | ms per step | share |")
    report.line("|---|---|---|")
    for row in prof["top"]:
        report.line(f"| {row['op'].replace('|', '/')} | {row['ms_per_step']:.2f} | {100 * row['fraction']:.1f}% |")
    report.save("profile", prof)


def _table(report, results, peak):
    report.line("\n| path | images/s | ratio | TFLOP/s | % of measured peak | peak GiB |")
    report.line("|---|---|---|---|---|---|")
    for name, r in results["paths"].items():
        if "images_per_s" not in r:
            if r.get("out_of_memory"):
                status = "out of memory"
            elif "error" in r:
                status = f"failed: {r['error']}".replace("|", "/")
            else:
                status = "skipped"
            report.line(f"| {name} | {status} | | | | |")
            continue
        mem = f"{r['peak_bytes'] / 2 ** 30:.1f}" if r["peak_bytes"] is not None else "-"
        report.line(f"| {name} | {r['images_per_s']:.1f} | {r['ratio']:.2f} | {r['tflops']:.3g} | "
                    f"{100 * r['tflops'] / peak:.1f} | {mem} |")


if __name__ == "__main__":
    main(parse_args())
