"""Checkpoints as plain dicts of tensors and primitives, written atomically and read with weights_only=True."""
import glob
import os
import re
from typing import Optional

import torch

from util.pos_embed import resample_pos_embed


def save_checkpoint(state: dict, path: str) -> None:
    """Writes to a temporary file in the same folder, then renames: a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def periodic_checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{epoch}.pth")


def last_checkpoint_path(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoint-last.pth")


def prune_periodic_checkpoints(output_dir: str, keep_last: int) -> None:
    """Keeps the `keep_last` newest `checkpoint-<epoch>.pth` files (0 keeps them all)."""
    if keep_last <= 0:
        return
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    for _, path in sorted(found)[:-keep_last]:
        os.remove(path)


def find_resume(resume: str, output_dir: Optional[str]) -> Optional[str]:
    """`--resume PATH` wins; otherwise a `checkpoint-last.pth` in the output folder resumes automatically."""
    if resume:
        return resume
    if output_dir and os.path.isfile(last_checkpoint_path(output_dir)):
        return last_checkpoint_path(output_dir)
    return None


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, what: str = "model") -> None:
    """Loads every key or fails with the list of missing, unexpected and mismatched keys."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape)
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:10]) + (f" ... (+{len(keys) - 10})" if len(keys) > 10 else "") or "none"
        raise RuntimeError(f"the checkpoint's {what} does not match this architecture: missing keys: {show(missing)}; "
                           f"unexpected keys: {show(unexpected)}; shape mismatches: {show(mismatched)}")
    module.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------------------------
# Pre-trained encoders for fine-tuning and probing.

# Keys that only the pre-training model uses: the decoder, the mask token, the visible branch (ours:
# `visible_branch`; the released code: `proj_embed`, `predictor`) and the multi-scale fusion projections.
PRETRAIN_ONLY_PREFIXES = ("decoder_", "mask_token", "visible_branch.", "proj_embed.", "predictor.",
                          "stage1_output_decode.", "stage2_output_decode.")


def encoder_state_dict(checkpoint: dict, key: str = "model") -> dict:
    """The encoder's weights from any of: our pre-training checkpoint (`model` holds `encoder.*` and the heads;
    `key="teacher"` takes the EMA teacher), the authors' released DMJD checkpoints (`model` holds the encoder at the
    top level, with `patch_embed1..4`, `blocks1..3`, `norm`, beside the decoder and projector), an encoder-only
    export, or a bare state dict. Pre-training-only keys are dropped."""
    if key in checkpoint and isinstance(checkpoint[key], dict):
        state = checkpoint[key]
    elif key != "model":
        raise KeyError(f"the checkpoint has no {key!r} entry (it has {sorted(checkpoint)})")
    else:
        state = checkpoint
    if state is None:
        raise KeyError(f"the checkpoint's {key!r} entry is empty")
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}


def classifier_for(pretrain_model: str) -> str:
    """The classifier name that fine-tunes and probes the encoder of a `dmjd_*` pre-training model: the name without
    the `dmjd_` prefix and the decoder / target suffix (`dmjd_convit_base_patch16_dec8_hog` -> `convvit_base_patch16`).
    Classifier names are returned as they are."""
    name = re.sub(r"(_dec\d+)?_(hog|pixel)$", "", pretrain_model)
    name = name[len("dmjd_"):] if name.startswith("dmjd_") else name
    return name.replace("convit_", "convvit_", 1) if name.startswith("convit_") else name


def saved_model_hint(checkpoint) -> str:
    """' It holds the encoder of X; fine-tune or probe it with --model Y.' from a checkpoint's saved arguments
    (a loaded dict, or a path read lazily), or '' when it has none."""
    if isinstance(checkpoint, str):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an unreadable file has no hint to give; the caller's error says what is wrong
            return ""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    model = args.get("model") if isinstance(args, dict) else None
    if not isinstance(model, str):
        return ""
    return f" It holds the encoder of {model!r}; fine-tune or probe it with --model {classifier_for(model)}."


def load_pretrained(model: torch.nn.Module, path: str, key: str = "model"):
    """Loads pre-trained encoder weights into a classifier (ConvViT / ViT) and returns (missing, unexpected) keys.

    Loads with weights_only=True; drops pre-training-only keys and a head whose shape does not fit; resamples the
    position embedding to the model's grid. Weights of another architecture fail here, with an error that names the
    checkpoint's model and the classifier that fits it.
    """
    checkpoint = load_checkpoint(path)
    state = encoder_state_dict(checkpoint, key)
    own = model.state_dict()
    for name in [k for k in state if k.startswith("head.")]:
        if name not in own or own[name].shape != state[name].shape:
            del state[name]  # a classifier for other classes (or none): the new head starts fresh
    # Position embeddings of another length are resampled below; of another width they are another architecture.
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape
                  and not (k == "pos_embed" and own[k].shape[-1] == state[k].shape[-1])]
    if mismatched:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:4])
        raise RuntimeError(f"{path} does not fit this model: shapes differ for {len(mismatched)} weights "
                           f"(checkpoint vs model: {shown}).{saved_model_hint(checkpoint)}")
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        old_grid = None
        args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else None
        if args and args.get("input_size") and getattr(model, "patch_size", None):
            side = int(args["input_size"]) // model.patch_size
            old_grid = (side, side) if side * side == state["pos_embed"].shape[1] else None
        old_length = state["pos_embed"].shape[1]
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.grid_size, old_grid)
        old_grid = old_grid or (int(round(old_length ** 0.5)),) * 2  # resampling checked that it is square
        print(f"resampled pos_embed from the checkpoint's {old_grid[0]} x {old_grid[1]} grid to this model's "
              f"{model.grid_size[0]} x {model.grid_size[1]}")
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def check_encoder_loaded(missing, unexpected, path: str, allowed_missing=("head.", "fc_norm.")) -> None:
    """Fails, naming the keys (and the checkpoint's model, when it says), when any encoder weight was not in the
    checkpoint."""
    absent = [k for k in missing if not k.startswith(tuple(allowed_missing))]
    if absent:
        raise RuntimeError(f"{path} lacks {len(absent)} encoder weights of this model, e.g. "
                           f"{', '.join(absent[:8])}; is it a checkpoint of this architecture?{saved_model_hint(path)}")
    print(f"loaded {path}: new (not in the checkpoint): {missing or 'none'}; unused: {unexpected or 'none'}")


def export_encoder(path: str, out_path: str, key: str = "model") -> None:
    """Writes an encoder-only checkpoint {"model": encoder state dict} from a pre-training checkpoint."""
    checkpoint = load_checkpoint(path)
    state = {"model": encoder_state_dict(checkpoint, key)}
    if isinstance(checkpoint.get("args"), dict):
        state["args"] = checkpoint["args"]
    save_checkpoint(state, out_path)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser("export the encoder of a DMJD pre-training checkpoint",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a pre-training checkpoint")
    parser.add_argument("output", help="the encoder-only checkpoint to write")
    parser.add_argument("--key", default="model", choices=["model", "teacher"],
                        help="the student encoder, or the EMA teacher's")
    cli = parser.parse_args(argv)
    export_encoder(cli.checkpoint, cli.output, cli.key)
    print(f"wrote {cli.output}")


if __name__ == "__main__":
    main()
