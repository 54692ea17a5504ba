"""The curves of one or several runs of any script (pre-training, fine-tuning, probing, segmentation, detection) from
their log.txt and TensorBoard events, drawn with matplotlib into one PNG: losses, learning rate (log axis), EMA
momentum, accuracy, mIoU or AP, and per-class IoU. Training values come every --print_freq steps where the run's
folder holds its TensorBoard events, else once a round (util/curves.py says which, and the legend too).

    python plot_logs.py out/dmjd_convit_b --out curves.png
    python plot_logs.py out/ft_a out/ft_b --names "blr 5e-4" "blr 1e-3" --out compare.png
"""
import argparse

from util.curves import plot_runs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="plot the curves of runs from their log.txt",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", help="runs' output folders (or their log.txt files), where the runs' "
                                                "TensorBoard events are too (the default --log_dir)")
    parser.add_argument("--out", default="curves.png", help="the PNG to write")
    parser.add_argument("--names", nargs="+", default=[], help="a label per run (none: the paths as given)")
    parser.add_argument("--columns", default=2, type=int, help="panels per row")
    return parser.parse_args(argv)


def main(args) -> None:
    try:
        titles = plot_runs(args.runs, args.out, args.names, args.columns)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.out}: {', '.join(titles)}")


if __name__ == "__main__":
    main(parse_args())
