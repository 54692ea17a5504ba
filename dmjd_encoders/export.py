"""Exports the encoder of a checkpoint so that others can use it: a folder in timm's hub layout
(config.json + model.safetensors + a model card, README.md), which `timm.create_model("local-dir:FOLDER",
pretrained=True)` loads once dmjd_encoders is imported, or an encoder-only .pth. See docs/MODELS.md for publishing
it on the Hugging Face hub.

    python export_encoder.py out/dmjd_convit_b/checkpoint-399.pth exports/dmjd_convit_b --result "ImageNet top-1=85.2"
    python export_encoder.py out/dmjd_convit_b/checkpoint-399.pth encoder.pth --key teacher
    dmjd-export-encoder ...   (the same command, where the package is installed)
"""
import argparse
import logging
import math
import os
import re
import sys
from typing import Optional, Sequence, Tuple

import timm

from . import models_convvit
from .checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from .model_card import model_card, parse_result, pretrained_with_dmjd
from .pretrained import encoder_state_dict, export_architecture, has_class_token


def export_encoder(path: str, out_path: str, key: str = "model", model_name: Optional[str] = None,
                   results: Sequence[str] = (), datasets: Sequence[str] = (), license: str = "mit",
                   code_repo: Optional[str] = None) -> None:
    """Exports the encoder of a checkpoint (pre-training, fine-tuning or probing; ours, the release's or MAE's).

    `out_path` ending in .pth: an encoder-only checkpoint {"model": state dict, "args": ...}. Otherwise a folder in
    timm's hub layout: config.json (the registered encoder's name, pretrained_cfg, the build arguments its weights
    need) and model.safetensors (contiguous tensors; no pre-training-only keys), which
    `timm.create_model("local-dir:FOLDER", pretrained=True)` loads once models_convvit is imported.
    `model_name`: the registered encoder (default: from the checkpoint's args; a pre-training model's name gives
    its encoder's). The folder's model card (README.md) states the recipe from the checkpoint's args, `results`
    ("NAME=VALUE" each, "[TASK, DATASET, METRIC] NAME=VALUE" for the model-index), `datasets` (the hub's names;
    default none), `license`, and loading code
    (`code_repo`: the GitHub owner/name of this code, for its pip and torch.hub lines)."""
    parsed = [parse_result(r) for r in results]  # a malformed result fails before anything is written
    checkpoint = load_checkpoint(path)
    state = encoder_state_dict(checkpoint, key)
    if out_path.endswith(".pth"):
        out = {"model": state}
        if isinstance(checkpoint.get("args"), dict):
            out["args"] = checkpoint["args"]
        save_checkpoint(out, out_path)
        return
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    name, size = _export_hub_layout(checkpoint, state, out_path, model_name, license, pretrained_with_dmjd(args))
    card = model_card(name, out_path, size, args, parsed, datasets, license, source=os.path.basename(path),
                      code_repo=code_repo, key=key)
    with open(os.path.join(out_path, "README.md"), "w") as f:
        f.write(card)


def _export_hub_layout(checkpoint: dict, state: dict, folder: str, model_name: Optional[str], license: str,
                       dmjd: bool) -> Tuple[str, int]:
    """Writes config.json and model.safetensors; returns the registered encoder's name and the input size. The
    config's pretrained_cfg states the weights' `license` (as the card does) and names DMJD's paper only for weights
    of a DMJD pre-training (`dmjd`)."""
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    name = model_name or args.get("model") or export_architecture(checkpoint)
    if not name:
        raise ValueError("the checkpoint does not name its model (no args): pass --model, the registered encoder")
    name = models_convvit.ENCODER_OF.get(name, name)
    name = timm.models.get_deprecated_models(models_convvit.TIMM_MODULE).get(name, name)
    if name not in models_convvit.ENCODER_ARCHS:
        raise ValueError(f"{name!r} is not an encoder of this project; choose from "
                         f"{', '.join(models_convvit.ENCODER_ARCHS)} or a dmjd_* pre-training model")
    class_token = has_class_token(state)
    size = args.get("input_size")
    if not size and "pos_embed" in state:  # the square grid of the position embedding times the total stride
        side = int(round((state["pos_embed"].shape[1] - class_token) ** 0.5))
        kernels = [v.shape[-1] for k, v in state.items() if re.fullmatch(r"patch_embed\d?\.proj\.weight", k)]
        size = side * math.prod(kernels)
    if not size:
        raise ValueError("cannot tell the input size the weights were trained at: the checkpoint has no args")
    size = int(size)
    layout = dict(img_size=[size, size], fc_norm="fc_norm.weight" in state)
    if class_token:
        layout["class_token"] = True
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    # A fresh model holds contiguous tensors, whatever memory format the weights were trained in (channels-last
    # conv weights would stop safetensors), and loading strictly proves the folder rebuilds the same network.
    model = timm.create_model(name, num_classes=num_classes, pretrained_cfg_overlay=dict(input_size=(3, size, size)),
                              **layout)
    load_state_dict_strict(model, state, "encoder")
    model.pretrained_cfg["license"] = license
    if not dmjd:
        model.pretrained_cfg.update(paper_ids=None, paper_name=None)  # no record of what trained them
    timm.models.save_for_hf(model, folder, model_args=layout, safe_serialization=True)
    return name, size


def main(argv=None):
    # prog: argparse's default, the name the program was started by (dmjd-export-encoder, export_encoder.py)
    parser = argparse.ArgumentParser(description="export the encoder of a checkpoint: a folder in timm's hub layout "
                                                 "(config.json + model.safetensors), or an encoder-only .pth",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a pre-training, fine-tuning or probing checkpoint (or an export)")
    parser.add_argument("output", help="a folder (timm's hub layout) or a file ending in .pth (encoder-only)")
    parser.add_argument("--key", default="model", choices=["model", "teacher"],
                        help="the student encoder, or the EMA teacher's")
    parser.add_argument("--model", default=None,
                        help="the registered encoder (none: from the checkpoint's args)")
    card = parser.add_argument_group("the model card (README.md of a folder export)")
    card.add_argument("--result", action="append", default=[], metavar="NAME=VALUE",
                      help='a result of these weights, e.g. "ImageNet top-1=85.2" (repeat the flag for more); with '
                           'the hub\'s ids of its task, dataset and metric in brackets it also enters the card\'s '
                           'model-index, e.g. "[image-classification, imagenet-1k, accuracy] ImageNet top-1=85.2"')
    card.add_argument("--dataset", action="append", default=[],
                      help="a dataset the weights were trained on, as the hub names it, e.g. imagenet-1k (repeat "
                           "the flag for more; none: the card's metadata names none)")
    card.add_argument("--license", default="mit", help="the weights' license, as the hub names it")
    card.add_argument("--code_repo", default=None, metavar="OWNER/NAME",
                      help="the GitHub repository of this code, for the card's pip and torch.hub lines (none: a "
                           "local checkout)")
    cli = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        export_encoder(cli.checkpoint, cli.output, cli.key, cli.model, cli.result, cli.dataset, cli.license,
                       cli.code_repo)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) quotes it
        raise SystemExit(f"error: {message}") from None
    print(f"wrote {cli.output}")


if __name__ == "__main__":
    main()
