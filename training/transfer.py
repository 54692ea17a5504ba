"""What the transfer scripts share: the model built for the run from the checkpoint it resumes or from --finetune's
pre-trained encoder (every transfer script); and for the dense ones (main_segment.py, main_detect.py) the checks of
their common flags, the lr from --blr, the encoder's dense options, and the model placed on the run's device."""
from typing import Callable, Optional

import torch

from dmjd_encoders.pretrained import (FRESH_KEYS, architecture_kwargs, check_pretrained_flag, encoder_layout,
                                      load_encoder)
from dmjd_encoders.models_convvit import (check_classifier_name, conv_weights_channels_last, encoder_stride,
                                          is_plain_vit)
from training.distributed import launch_world_size
from training.errors import RunError, flag_error
from training.flags import check_input_size
from training.run import Run
from training.sync_batchnorm import convert_sync_batchnorm


def check_transfer_flags(args, task: str, few_images: str = "", batchnorm: bool = True) -> None:
    """--finetune, --eval, --batch_size, --model and --input_size of a dense-transfer script (`task`: what a run of it
    is called in messages; `few_images`: what else a step of one image breaks; `batchnorm`: the model has BatchNorm,
    which a step of one image breaks)."""
    check_pretrained_flag(args.finetune)
    if args.eval and not args.resume:
        raise flag_error("--eval", f"needs --resume: the checkpoint of a {task} run to evaluate")
    world_size = launch_world_size()
    if batchnorm and args.batch_size * world_size < 2:
        raise flag_error("--batch_size", f"{args.batch_size} x {world_size} processes gives BatchNorm one image per "
                                         f"step{few_images}: use 2 or more images per step (over all processes)")
    check_classifier_name(args.model)
    check_input_size(args.input_size, args.model, encoder_stride(args.model))


def check_simple_pyramid(args) -> None:
    """--simple_pyramid (segmentation) is for a plain ViT."""
    if args.simple_pyramid and not is_plain_vit(args.model):
        raise flag_error("--simple_pyramid", f"is for a plain ViT; --model {args.model} has its own multi-scale "
                                             f"stages")


def simple_pyramid(args) -> bool:
    """--simple_pyramid resolved: on for a plain ViT unless given."""
    return is_plain_vit(args.model) if args.simple_pyramid is None else args.simple_pyramid


def dense_options(cfg) -> dict:
    """The encoder's build options for dense transfer (dmjd_encoders.dense) that both scripts have."""
    options = dict(rel_pos_bias=cfg.rel_pos_bias, layer_scale=cfg.layer_scale)
    if is_plain_vit(cfg.model):  # said either way: a ViT's features_only build takes the pyramid by default
        options["simple_pyramid"] = cfg.simple_pyramid
    return options


def count_parameters(module: torch.nn.Module) -> float:
    """Millions of parameters, as the scripts print them."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def model_from_checkpoints(run: Run, cfg, build: Callable[..., torch.nn.Module],
                           encoder_of: Callable[[torch.nn.Module], torch.nn.Module], flags: str,
                           fresh=FRESH_KEYS["dense"], patch_tokens_only: bool = False,
                           check_resumed: Optional[Callable[[str], None]] = None) -> torch.nn.Module:
    """The model of every transfer script (fine-tuning, probing, segmentation, detection): `build(**layout)` with the
    encoder layout of the checkpoint the run resumes (or evaluates), else of --finetune's (a checkpoint in MAE's /
    timm's ViT layout keeps its class token, as fine-tuning does, unless `patch_tokens_only`: the class token and its
    position are then dropped, as ViTDet drops MAE's); a fresh run loads --finetune's encoder into `encoder_of(model)`,
    the weights `fresh` names (one of FRESH_KEYS: a classifier's head, dense transfer's new parameters) new.
    `check_resumed(path)` may refuse the checkpoint resumed before anything is built. A size or level the encoder
    cannot give stops the run naming `flags`, the flags to check."""
    resume = run.resume_path(auto=not cfg.eval)
    if resume and check_resumed is not None:
        check_resumed(resume)
    layout = architecture_kwargs(resume) if resume else encoder_layout(cfg.finetune, cfg.checkpoint_key)
    if patch_tokens_only:
        layout.pop("class_token", None)
    try:
        model = build(**layout)
    except ValueError as err:
        raise RunError(f"{err} (check {flags})") from None
    if cfg.finetune and not resume:
        load_encoder(encoder_of(model), cfg.finetune, cfg.checkpoint_key, allowed_missing=fresh,
                     drop_class_token=patch_tokens_only)
    return model


def on_run_device(model: torch.nn.Module, run: Run, cfg) -> torch.nn.Module:
    """The model on the run's device, its BatchNorm statistics over the whole batch when training on several
    processes (the recipes' SyncBN), its convolutions channels-last."""
    model = model.to(run.device)
    if run.dist.distributed and not cfg.eval:
        model = convert_sync_batchnorm(model, run.device)
    return conv_weights_channels_last(model)
