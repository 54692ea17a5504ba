"""Pictures of what a pre-trained DMJD model predicts: masks, the tokens each view predicts, HOG targets and
predictions (or pixel reconstructions), one row per image. See util/visualization.py for the panels.

    python visualize.py --checkpoint out/tiny/checkpoint-last.pth --data_path data/fashion_mnist --output vis.png

The model is rebuilt from the checkpoint's `args`; masking flags given here override them (e.g. --num_views 3).
Without --checkpoint a randomly initialised model is drawn from --model and friends, for comparison.
"""
import argparse
import os

import timm
import torch
from PIL import Image

from dmjd_encoders.models_convvit import check_model_name
from models_dmjd import DEFAULT_MODEL, MODEL_FLAGS, create_from_flags
from training.errors import exits_like_a_script
from dmjd_encoders.checkpoint import load_checkpoint, load_state_dict_strict
from util.datasets import sample_images
from util.misc import resolve_device
from util.visualization import make_figure


def get_args_parser():
    p = argparse.ArgumentParser(description="DMJD pictures", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="", help="a main_pretrain.py checkpoint (none: random init)")
    p.add_argument("--data_path", required=True, help="ImageFolder root")
    p.add_argument("--split", default="train", help="sub-folder of --data_path to read")
    p.add_argument("--num_images", default=4, type=int, help="images (rows), spread evenly over the folder")
    p.add_argument("--output", default="vis.png", help="PNG to write")
    p.add_argument("--seed", default=0, type=int, help="seeds the masks")
    p.add_argument("--min_panel", default=160, type=int, help="smallest panel side in pixels (nearest upscaling)")
    p.add_argument("--min_glyph", default=12, type=int, help="smallest HOG cell in pixels (0: no extra upscaling)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    g = p.add_argument_group("model (default: the checkpoint's, else main_pretrain.py's defaults)")
    g.add_argument("--model", default=None, help="a registered dmjd_* model")
    g.add_argument("--input_size", default=None, type=int, help="crop size in pixels")
    g.add_argument("--num_views", default=None, type=int, help="views per image")
    g.add_argument("--mask_ratio", default=None, type=float, help="corruption rate of one view")
    g.add_argument("--pred_ratio", default=None, type=float,
                   help="prediction rate (recomputed when --num_views or --mask_ratio change)")
    g.add_argument("--mask_type", default=None, choices=["block", "rand"], help="block or random masking")
    g.add_argument("--block_size", default=None, type=int, help="block masking unit, in patches")
    g.add_argument("--pred_type", default=None, choices=["hog", "pixel"], help="masked-token target")
    return p


def model_flags(args, saved: dict) -> dict:
    """The checkpoint's model flags, then the flags given here; the prediction rate is recomputed when the views
    or the corruption rate change and it is not given."""
    names = ("model", "input_size", *MODEL_FLAGS)
    flags = {k: saved[k] for k in names if saved.get(k) is not None}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}  # the flags this script has
    if {"num_views", "mask_ratio"} & given.keys() and "pred_ratio" not in given:
        flags.pop("pred_ratio", None)
    return {**flags, **given}


@exits_like_a_script
def main(args):
    if args.num_images < 1:
        raise SystemExit(f"error: --num_images must be >= 1, got {args.num_images}")
    saved = {}
    if args.checkpoint:
        try:
            ckpt = load_checkpoint(args.checkpoint)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("args"), dict):
            raise SystemExit(f"error: {args.checkpoint} is not a main_pretrain.py checkpoint (a dict with 'model' and "
                             f"an 'args' dict)")
        saved = ckpt["args"]
    flags = model_flags(args, saved)
    name = flags.setdefault("model", DEFAULT_MODEL)
    check_model_name(name, timm.list_models("dmjd_*"), "a DMJD model")
    torch.manual_seed(args.seed)  # the weights of a random model
    try:
        model = create_from_flags(flags)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.checkpoint:
        try:
            load_state_dict_strict(model, ckpt["model"])
        except RuntimeError as err:
            raise SystemExit(f"error: {args.checkpoint}: {err}") from None
        print(f"loaded {args.checkpoint} (epoch {ckpt.get('epoch', '?')})")
    else:
        print(f"no --checkpoint: a randomly initialised {name}")
    device = resolve_device(args.device)
    model.to(device)

    input_size = model.encoder.img_size[0]
    images = sample_images(args.data_path, args.split, input_size, args.num_images)
    figure = make_figure(model, images, seed=args.seed, min_panel=args.min_panel, min_glyph=args.min_glyph)
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(figure).save(args.output)
    print(f"{name} at {input_size} px, {model.num_views} view(s), mask_ratio {model.mask_ratio}, "
          f"pred_ratio {model.pred_ratio:.3g}, {model.pred_type} target: {len(images)} images")
    print(os.path.abspath(args.output))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
