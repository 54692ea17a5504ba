"""Pre-trained weights into an encoder: which build arguments a checkpoint's encoder needs (its layout), the one test
for a class token, the weights each use lets start fresh, the encoder's keys taken out of any checkpoint we read
(ours, the authors' release, MAE's, timm's ViT, an export, a fine-tuned classifier, a UperNet), the position
embedding resampled to the model's grid, timm's pretrained filter, and the checks that the encoder loaded whole.

File I/O (formats, checksums, atomic writes) is dmjd_encoders.checkpoint's. Nothing here exits: a checkpoint that
cannot be used raises, and the scripts turn PretrainedWeightsError into their `error:` line.
"""
import contextlib
import logging
import os
from typing import NamedTuple, Optional

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from .checkpoint import HUB_CONFIG, load_checkpoint, rename_legacy_keys
from .errors import ArchitectureMismatch, CheckpointError, PretrainedWeightsError
from .names import ENCODER_OF

# The load notes keep the logger they had before this module took the loading over from dmjd_encoders.checkpoint:
# a caller's level or handler on that name still applies.
_logger = logging.getLogger(__package__ + ".checkpoint")

__all__ = ["PretrainedWeightsError", "ArchitectureMismatch", "PRETRAIN_ONLY_PREFIXES", "SEGMENTER_ENCODER_PREFIX",
           "FRESH_KEYS", "is_fresh", "has_class_token", "encoder_state_dict", "fit_encoder_state", "resample_pos_embed",
           "first_conv_key", "only_input_channels_differ", "adapt_first_conv", "saved_args", "saved_model",
           "CheckpointOrigin", "checkpoint_origin", "export_architecture",
           "load_pretrained", "architecture_kwargs", "check_encoder_loaded", "checkpoint_filter_fn",
           "check_pretrained_flag", "encoder_layout", "load_encoder", "without_class_token"]


# Keys that only the pre-training model uses: the decoder, the mask token, the visible branch (ours:
# `visible_branch`; the released code: `proj_embed`, `predictor`) and the multi-scale fusion projections.
PRETRAIN_ONLY_PREFIXES = ("decoder_", "mask_token", "visible_branch.", "proj_embed.", "predictor.",
                          "stage1_output_decode.", "stage2_output_decode.")

# Where a UperNet (models_upernet.py) holds its encoder: timm's features_only wrapper around the model.
SEGMENTER_ENCODER_PREFIX = "backbone.model."

# The encoder weights that a pre-trained checkpoint need not hold, by use: they start fresh. Each entry names a module,
# matched at any depth of a key (`is_fresh`: "ls1." matches "blocks3.0.ls1.gamma"). A classifier gets a new head and
# the norm after pooling (MAE's fine-tuning); a linear probe uses the encoder exactly as it was trained; a dense
# (segmentation, detection) backbone also gets what pre-training never had: ConViT's stride-32 level, and the build
# options of dmjd_encoders.dense (relative position tables, layer scales, a ViT's simple feature pyramid).
FRESH_KEYS = {
    "classifier": ("head.", "fc_norm."),
    "probe": (),
    "dense": ("head.", "fc_norm.", "downsample32.", "rel_pos.", "rel_pos_tables.", "ls1.", "ls2.", "pyramid."),
}


def is_fresh(key: str, fresh) -> bool:
    """Whether the weight `key` belongs to one of the modules `fresh` (one of FRESH_KEYS), at any depth."""
    return any(("." + key).find("." + name) >= 0 for name in fresh)


def has_class_token(state) -> bool:
    """Whether weights (an encoder's keys, or a UperNet's, its encoder under SEGMENTER_ENCODER_PREFIX) hold MAE's /
    timm's ViT class token: the one test of it, so that a layout, a fit and an export agree."""
    return "cls_token" in state or SEGMENTER_ENCODER_PREFIX + "cls_token" in state


def encoder_state_dict(checkpoint: dict, key: str = "model") -> dict:
    """The encoder's weights from any of: our pre-training checkpoint (`model` holds `encoder.*` and the heads;
    `key="teacher"` takes the EMA teacher), the authors' released DMJD checkpoints (`model` holds the encoder at the
    top level, with `patch_embed1..4`, `blocks1..3`, `norm`, beside the decoder and projector), an encoder-only
    export, or a bare state dict. Pre-training-only keys are dropped."""
    if isinstance(checkpoint.get(key), dict):
        state = checkpoint[key]
    elif key in checkpoint:  # saved, but empty: a pre-training run without an EMA teacher saves teacher=None
        raise KeyError(f"the checkpoint's {key!r} entry is empty" +
                       (": the run trained no EMA teacher (pre-training trains one with --vis_target ema); its "
                        "encoder is the student's, key 'model'" if key == "teacher" else ""))
    elif key != "model":
        raise KeyError(f"the checkpoint has no {key!r} entry (it has {sorted(checkpoint)})")
    else:
        state = checkpoint
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}


def fit_encoder_state(state: dict, model: torch.nn.Module, old_grid=None) -> dict:
    """An encoder state dict adapted to `model`: the position embedding resampled (bicubic) to the model's token grid
    (from `old_grid`, default the square grid that holds its patch tokens; a class token's row is kept as it is), a
    classifier head of another shape, or one the model lacks, dropped. A class token in only one of the two fails,
    naming the fix."""
    own = model.state_dict()
    state = rename_legacy_keys(dict(state), own)
    theirs = has_class_token(state)
    if theirs != has_class_token(own):
        has = "has" if theirs else "has no"
        raise ValueError(f"the checkpoint {has} class token (`cls_token`) but the model "
                         f"{'has none' if theirs else 'has one'}: build the model with "
                         f"class_token={theirs} (util.checkpoint.architecture_kwargs reads it from the "
                         "checkpoint)")
    for name in [k for k in state if k.startswith("head.")]:
        if name not in own or own[name].shape != state[name].shape:
            del state[name]  # a classifier for other classes (or none): the new head starts fresh
    # A position embedding of another length is resampled below; RGB weights of the first conv are adapted to the
    # model's input channels where they load (timm's pretrained path, or the model's load_state_dict: see
    # adapt_first_conv). Another width, or any other weight of another shape, means another architecture: that fails
    # first, before anything is said about resampling.
    first_conv = first_conv_key(model)
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape
                  and not (k == "pos_embed" and own[k].shape[-1] == state[k].shape[-1])
                  and not (k == first_conv and only_input_channels_differ(state[k], own[k]))]
    if mismatched:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:4])
        raise ArchitectureMismatch(f"shapes differ for {len(mismatched)} weights (checkpoint vs model: {shown})")
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model, old_grid)
    return state


def first_conv_key(model: torch.nn.Module) -> Optional[str]:
    """The state-dict key of the weight of `model`'s first conv (its class's FIRST_CONV, the pretrained_cfg's
    `first_conv`), the one weight whose shape follows `in_chans`; None for a model without one."""
    name = getattr(model, "FIRST_CONV", None)
    return name + ".weight" if name else None


def only_input_channels_differ(theirs, own: torch.Tensor) -> bool:
    """Whether a checkpoint's conv weight and the model's, [O, I, kh, kw], differ in their input channels I alone."""
    return (isinstance(theirs, torch.Tensor) and theirs.dim() == own.dim() == 4 and theirs.shape[1] != own.shape[1]
            and theirs.shape[:1] + theirs.shape[2:] == own.shape[:1] + own.shape[2:])


def adapt_first_conv(weight: torch.Tensor, in_chans: int, name: str = "the first conv") -> torch.Tensor:
    """RGB weights of a first conv [O, 3, kh, kw] for a model of `in_chans` input channels, as timm adapts them
    (`adapt_input_conv`: for one channel the sum over RGB; for more, RGB repeated and scaled by 3 / in_chans), so
    that a grayscale, multispectral or medical input starts from the pre-trained weights. Only RGB weights adapt
    (what timm's adaptation takes, and what every pre-training here trains); others fail, naming the channels."""
    if weight.shape[1] != 3:
        raise ArchitectureMismatch(f"{name} of the weights takes {weight.shape[1]} input channels, the model's "
                                   f"{in_chans}: only RGB (3-channel) weights adapt to another in_chans; build the "
                                   f"model with in_chans={weight.shape[1]}")
    _logger.info(f"adapted {name} from the weights' 3 input channels to this model's {in_chans} (timm's "
                 "adapt_input_conv)")
    return adapt_input_conv(in_chans, weight)


def resample_pos_embed(pos_embed: torch.Tensor, model: torch.nn.Module, old_grid=None) -> torch.Tensor:
    """A checkpoint's position embedding resampled (bicubic) to `model`'s token grid, from `old_grid` (default the
    square grid that holds its patch tokens; a class token's row is kept as it is)."""
    prefix = model.num_prefix_tokens
    length = pos_embed.shape[1] - prefix
    if old_grid is None:
        side = int(round(length ** 0.5))
        if side * side != length:
            raise ValueError(f"cannot infer the grid of a position embedding with {length} patch tokens; pass "
                             "old_grid")
        old_grid = (side, side)
    resampled = resample_abs_pos_embed(pos_embed, new_size=list(model.grid_size), old_size=list(old_grid),
                                       num_prefix_tokens=prefix)
    _logger.info(f"resampled pos_embed from the checkpoint's {old_grid[0]} x {old_grid[1]} grid to this model's "
                 f"{model.grid_size[0]} x {model.grid_size[1]}")
    return resampled


def saved_args(checkpoint) -> Optional[dict]:
    """The flags a checkpoint was trained with (its saved `args`), from a loaded dict or a path (read lazily); None
    when it has none or cannot be read."""
    if isinstance(checkpoint, str):
        try:
            checkpoint = load_checkpoint(checkpoint, mmap=True)
        except Exception:  # an unreadable file has nothing to say; the caller's error says what is wrong
            return None
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return args if isinstance(args, dict) else None


def saved_model(checkpoint) -> Optional[str]:
    """The model a checkpoint was trained as (its saved `args["model"]`), from a loaded dict or a path (read lazily);
    None when it does not say or cannot be read."""
    model = (saved_args(checkpoint) or {}).get("model")
    return model if isinstance(model, str) else None


class CheckpointOrigin(NamedTuple):
    """The training script that wrote a checkpoint, what its runs are called, and whether its weights hold an encoder
    that --finetune takes (pre-training, fine-tuning, probing: `encoder.*` or the classifier's own keys) or one built
    into a dense model with its own options (segmentation's UperNet, detection's Mask R-CNN)."""
    script: str
    task: str
    holds_encoder: bool

    def __str__(self) -> str:
        return f"a {self.task} checkpoint, from {self.script}"


# Every training script saves its resolved flags in its checkpoints (`args`); a flag that only one script has tells
# which wrote them. In this order: pre-training's --min_crop_scale is also the probe's (probes saved before
# --probe_features have only that), so pre-training is told apart first.
CHECKPOINT_ORIGINS = (
    (("rois_per_image", "recipe"), CheckpointOrigin("main_detect.py", "detection", False)),
    (("decoder_channels",), CheckpointOrigin("main_segment.py", "segmentation", False)),
    (("mask_ratio", "num_views"), CheckpointOrigin("main_pretrain.py", "pre-training", True)),
    (("smoothing", "mixup"), CheckpointOrigin("main_finetune.py", "fine-tuning", True)),
    (("probe_features", "min_crop_scale"), CheckpointOrigin("main_linprobe.py", "linear-probing", True)),
)


def checkpoint_origin(args) -> Optional[CheckpointOrigin]:
    """Which training script wrote a checkpoint whose saved flags are `args` (a dict, or None); None for flags of no
    script (a checkpoint without them: the authors' release, MAE's, an export)."""
    if not isinstance(args, dict):
        return None
    return next((origin for flags, origin in CHECKPOINT_ORIGINS if any(name in args for name in flags)), None)


def export_architecture(checkpoint: dict) -> Optional[str]:
    """The registered encoder an export holds, as its config.json names it (load_checkpoint's "config"); None for
    any other checkpoint."""
    config = checkpoint.get("config")
    return config.get("architecture") if isinstance(config, dict) else None


def without_class_token(state: dict) -> dict:
    """MAE's / timm's ViT weights without the class token and its row of the position embedding, for a model of the
    patch tokens alone (ViTDet's backbone drops them from MAE's weights: `pretrain_use_cls_token`)."""
    state = {k: v for k, v in state.items() if k != "cls_token"}
    if "pos_embed" in state:
        state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


def load_pretrained(model: torch.nn.Module, path: str, key: str = "model", drop_class_token: bool = False):
    """Loads pre-trained encoder weights into a classifier (ConvViT / ViT) and returns (missing, unexpected) keys.

    Takes a checkpoint of ours, the authors' release, MAE's or timm's ViT layout, or an export (.pth,
    .safetensors or a hub-layout folder); loads with weights_only=True; drops pre-training-only keys and a head whose
    shape does not fit; resamples the position embedding from the grid it was trained at (its saved --input_size)
    to the model's. `drop_class_token`: a class token the model has no place for is dropped with its position
    (`without_class_token`) rather than refused. Weights of another architecture raise ArchitectureMismatch (see
    `saved_model` for what the checkpoint was trained as).
    """
    checkpoint = load_checkpoint(path)
    _check_export_architecture(checkpoint, model, path)
    state = encoder_state_dict(checkpoint, key)
    if drop_class_token and has_class_token(state) and not has_class_token(model.state_dict()):
        state = without_class_token(state)
    old_grid = None
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    if args.get("input_size") and "pos_embed" in state:
        side = int(args["input_size"]) // model.patch_size
        if side * side == state["pos_embed"].shape[1] - model.num_prefix_tokens:
            old_grid = (side, side)  # else the grid is inferred from the embedding's length
    try:
        state = fit_encoder_state(state, model, old_grid)
    except ArchitectureMismatch as err:
        raise ArchitectureMismatch(f"{path} does not fit this model: {err}") from None
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def _check_export_architecture(checkpoint: dict, model: torch.nn.Module, path: str) -> None:
    """An export's config.json names the encoder it holds: another one than the model's is an error, even where the
    weights' shapes happen to fit."""
    saved = export_architecture(checkpoint)
    own = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not (saved and own):
        return
    current = timm.models.get_deprecated_models()
    if current.get(saved, saved) != current.get(own, own):
        raise ArchitectureMismatch(f"{path} is an export of {saved} (its {HUB_CONFIG}), not of this model's {own}: "
                                   f"build {saved}, or export the checkpoint of {own}")


def architecture_kwargs(path: Optional[str], key: str = "model") -> dict:
    """The build arguments a checkpoint's encoder layout needs beyond the architecture's name: `class_token=True`
    for MAE's and timm's ViT layout. Any checkpoint: pre-training, an export, a classifier or a UperNet (a resumed
    segmentation run). Reads only the keys (memory-mapped); no path, no arguments."""
    if not path:
        return {}
    state = encoder_state_dict(load_checkpoint(path, mmap=True), key)
    return {"class_token": True} if has_class_token(state) else {}


def check_encoder_loaded(missing, unexpected, path: str, allowed_missing=FRESH_KEYS["classifier"]) -> None:
    """Fails, naming the keys, when any encoder weight was not in the checkpoint (`allowed_missing`: the prefixes
    of the weights that start fresh, one of FRESH_KEYS)."""
    absent = [k for k in missing if not is_fresh(k, allowed_missing)]
    if absent:
        raise ArchitectureMismatch(f"{path} lacks {len(absent)} encoder weights of this model, e.g. "
                                   f"{', '.join(absent[:8])}; is it a checkpoint of this architecture?")
    _logger.info(f"loaded {path}: new (not in the checkpoint): {missing or 'none'}; unused: {unexpected or 'none'}")


# ---------------------------------------------------------------------------------------------------------------------
# Loading weights through timm (pretrained_cfg_overlay=dict(file=...), local-dir: and hf-hub: exports).

def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm's pretrained filter: any checkpoint load_pretrained takes (ours, the authors' release, MAE's or timm's
    ViT, an export), adapted to `model`: the encoder's keys only, position embedding resampled, a head of another
    size dropped, the pre-trained final norm dropped when the model pools before its norm (fc_norm), as MAE
    fine-tunes. The first conv's RGB weights stay as they are for a model of other input channels: timm adapts them
    to its `in_chans` after this filter (adapt_input_conv on the pretrained_cfg's `first_conv`), as for its own
    models. Fails with the keys when an encoder weight is missing or left over; prints what starts fresh.
    """
    state = fit_encoder_state(encoder_state_dict(state_dict), model)
    dropped = sorted(k for k in state if k.startswith("norm.")) if isinstance(model.norm, nn.Identity) else []
    if dropped:
        _logger.info(f"unused: the pre-trained final norm {dropped}: the model pools, then applies its own fc_norm")
        state = {k: v for k, v in state.items() if k not in dropped}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    # timm builds any use (a classifier, or a features_only backbone): the widest list of fresh weights applies
    absent = [k for k in missing if not is_fresh(k, FRESH_KEYS["dense"])]
    unexpected = sorted(k for k in state if k not in own)
    if absent or unexpected:
        hint = (" (a fine-tuned checkpoint: build the model with fc_norm=True)"
                if "norm.weight" in absent and "fc_norm.weight" in unexpected else "")
        raise RuntimeError(f"the weights do not fit {type(model).__name__}{hint}: missing {absent[:8] or 'none'}, "
                           f"unexpected {unexpected[:8] or 'none'}")
    if missing:
        _logger.info(f"new (not in the weights): {missing}")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The scripts' --finetune: the same loading, its failures as PretrainedWeightsError naming the flag.

def check_pretrained_flag(path: str) -> None:
    """--finetune, when given, must name something to load (a checkpoint file or an export folder), and not a
    segmentation or detection checkpoint: their encoders were trained inside the dense model with its options
    (relative positions, layer scales, windows), which a classifier or a fresh dense model would leave out; such a
    run is continued with its own script's --resume."""
    if path and not os.path.exists(path):
        raise PretrainedWeightsError(f"--finetune {path!r} is neither a checkpoint file nor an export folder")
    args = saved_args(path) if path and os.path.isfile(path) else None
    origin = checkpoint_origin(args)
    if origin is not None and not origin.holds_encoder:
        started_from = args.get("finetune")
        raise PretrainedWeightsError(
            f"--finetune {path} is {origin}: its encoder was trained inside the {origin.task} model, and --finetune "
            f"takes a pre-trained encoder (a pre-training, fine-tuning or linear-probing checkpoint, or an export). "
            f"Continue that run with {origin.script} --resume {path}" +
            (f", or start from the checkpoint it started from, --finetune {started_from}" if started_from else ""))


def _origin_hint(path: str, model: Optional[torch.nn.Module]) -> str:
    """What a --finetune checkpoint that does not fit says about itself: the script that wrote it, and which --model
    takes its encoder when that is not `model`'s (or, for a classifier fine-tuned with --global_pool, that its final
    norm is gone)."""
    args = saved_args(path) or {}
    origin, trained_as = checkpoint_origin(args), args.get("model")
    trained_as = trained_as if isinstance(trained_as, str) else None
    encoder = ENCODER_OF.get(trained_as, trained_as)
    said = [f"it is {origin}"] if origin else []
    if trained_as and encoder != (getattr(model, "pretrained_cfg", None) or {}).get("architecture"):
        said.append(f"it holds the encoder of {trained_as!r}: fine-tune or probe it with --model {encoder}")
    elif origin is not None and origin.task == "fine-tuning" and args.get("global_pool"):
        # such a classifier pools its tokens, then applies fc_norm: the pre-trained final norm is not in it
        said.append("fine-tuned with --global_pool, its final norm gave way to fc_norm" +
                    (f": start from the checkpoint it was fine-tuned from, --finetune {args['finetune']}"
                     if args.get("finetune") else ""))
    text = "; ".join(said)
    return f" {text[:1].upper()}{text[1:]}." if text else ""


@contextlib.contextmanager
def _pretrained_errors(path: str, model: Optional[torch.nn.Module] = None):
    """A --finetune checkpoint that cannot be read, or does not fit `model`, raises PretrainedWeightsError saying why,
    which script wrote it, and which --model fits it when the checkpoint says what it was trained as."""
    try:
        yield
    except (ArchitectureMismatch, CheckpointError, ValueError, KeyError, FileNotFoundError) as err:
        raise PretrainedWeightsError(f"--finetune {err}{_origin_hint(path, model)}") from None


def encoder_layout(path: str, key: str = "model") -> dict:
    """`architecture_kwargs` of --finetune's checkpoint (the build arguments its encoder layout needs), read before
    the model is built; a file that cannot be read raises PretrainedWeightsError naming the flag."""
    with _pretrained_errors(path):
        return architecture_kwargs(path, key)


def load_encoder(model: torch.nn.Module, path: str, key: str = "model",
                 allowed_missing=FRESH_KEYS["classifier"], drop_class_token: bool = False) -> None:
    """--finetune's encoder weights into `model`, every one but the `allowed_missing` (one of FRESH_KEYS) that start
    fresh (`drop_class_token`: see load_pretrained); see `_pretrained_errors` for a checkpoint that does not fit."""
    with _pretrained_errors(path, model):
        missing, unexpected = load_pretrained(model, path, key, drop_class_token)
        check_encoder_loaded(missing, unexpected, path, allowed_missing)
