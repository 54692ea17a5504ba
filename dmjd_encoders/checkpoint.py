"""Checkpoints as plain dicts of tensors and primitives, written atomically and read with weights_only=True; encoder
weights in timm's hub layout (config.json + model.safetensors, written by export_encoder.py) read back. Putting
pre-trained weights into an encoder is dmjd_encoders.pretrained's."""
import errno
import json
import os
import re
import shutil
import zlib

import safetensors.torch
import torch

from .errors import CheckpointError


CHECKSUM_KEY = "checksum"
HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"


def content_checksum(state) -> str:
    """CRC-32 of a checkpoint's content, in key order: every tensor's name, dtype, shape and bytes, and every other
    value's repr. Stored with the checkpoint by `save_checkpoint` and verified by `load_checkpoint`, so that a
    flipped byte anywhere in the values is an error naming the file, not weights loaded in silence."""
    crc = 0

    def feed(value, where: str) -> None:
        nonlocal crc
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            crc = zlib.crc32(f"{where}:{tensor.dtype}:{tuple(tensor.shape)}".encode(), crc)
            crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy(), crc)
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                feed(value[key], f"{where}/{key!r}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                feed(item, f"{where}/{i}")
        else:
            crc = zlib.crc32(f"{where}={value!r}".encode(), crc)

    feed(state, "")
    return f"crc32:{crc:08x}"


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: str, write) -> None:
    """Calls `write(file)` on a temporary file in the same folder, flushes it to disk, renames it to `path` and flushes
    the folder: a crash leaves the old file or the new one, each whole. A full disk is an error naming the folder
    and the space left."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            recording = _RecordingFile(f)
            try:
                write(recording)
            except Exception as err:  # torch.save reports a failed write as "enforce fail ... unexpected pos"
                if recording.error is not None and recording.error is not err:
                    raise recording.error from err
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise no_space_error(path, "the previous file is kept") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _temp_path(path: str) -> str:
    """Where a write of `path` goes before it is renamed over it (TEMP_FILE_PATTERN; remove_temp_files clears them)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")


def link_checkpoint(source: str, path: str) -> None:
    """Makes `path` the same file as the checkpoint `source`, atomically (the old `path` or the new one, never part):
    a hard link, so that an epoch's periodic or best checkpoint takes no second copy of checkpoint-last.pth's space;
    a copy where the file system has no hard links. Checkpoints are only ever replaced (`write_file_atomically`
    renames a new file over the name), never rewritten in place, so a later save of either name gives that name a
    new file and leaves the other's as it was; deleting one name leaves the other whole."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temp_path(path)
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links on this file system (FAT, some network mounts), or none across devices
        with open(source, "rb") as f:
            write_file_atomically(path, lambda out: shutil.copyfileobj(f, out))
        return
    try:
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


class _RecordingFile:
    """A file for a writer that may hide the file's own error behind another one (torch.save's zip writer turns a
    failed write into a RuntimeError): the file's OSError is kept in `error`."""

    def __init__(self, file):
        self._file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


def no_space_error(path: str, consequence: str) -> OSError:
    """The error of a write to `path` (a file or a folder) that found its device full: the folder, the space left."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    return OSError(errno.ENOSPC, f"no space left on the device of {folder} ({free / 2 ** 20:.0f} MiB free) while "
                                 f"writing {path}; {consequence}")


def save_checkpoint(state: dict, path: str) -> None:
    """Writes `state` with its content checksum (see `write_file_atomically`): a crash never leaves a half-written
    file, and a later bit flip is found when it is loaded."""
    content = {k: v for k, v in state.items() if k != CHECKSUM_KEY}  # a re-saved checkpoint gets a new checksum
    checksum = content_checksum(content)
    write_file_atomically(path, lambda f: torch.save({**content, CHECKSUM_KEY: checksum}, f))


TEMP_FILE_PATTERN = re.compile(r"\..+\.tmp\d+")


def load_checkpoint(path: str, mmap: bool = False, verify: bool = True) -> dict:
    """A .pth checkpoint as saved; a .safetensors file as {"model": tensors}; a folder in timm's hub layout (an
    export_encoder.py export) as {"model": tensors, "config": its config.json}. `mmap` reads a .pth lazily (for a look
    at its keys and values without reading the tensors; nothing is verified then). A checkpoint saved with a checksum
    is verified (`verify`); one that cannot be read or does not match raises CheckpointError naming the file."""
    if os.path.isdir(path):
        weights, config = os.path.join(path, HUB_WEIGHTS), os.path.join(path, HUB_CONFIG)
        if not (os.path.isfile(weights) and os.path.isfile(config)):
            raise FileNotFoundError(f"{path} is a folder but not an export in timm's hub layout: it needs "
                                    f"{HUB_WEIGHTS} and {HUB_CONFIG}")
        with open(config) as f:
            return {"model": safetensors.torch.load_file(weights), "config": json.load(f)}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return {"model": safetensors.torch.load_file(path)}
        # Only torch's zip format can be memory-mapped: a file in the legacy format (or not a checkpoint at all) is
        # read whole, so that its error says what it is, not how to re-save it for mmap.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _head(path) == ZIP_MAGIC)
    except Exception as err:  # torch and safetensors raise many types for a bad file
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {_reason(err, path)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} cannot be read as a checkpoint: it holds a {type(checkpoint).__name__}, not a "
                              f"dict of weights")
    if CHECKSUM_KEY in checkpoint:
        expected = checkpoint.pop(CHECKSUM_KEY)
        if verify and not mmap and content_checksum(checkpoint) != expected:
            raise CheckpointError(f"{path} is damaged: its content does not match the checksum saved with it "
                                  f"({expected})")
    return checkpoint


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6; before it, a pickle (its first byte 0x80)


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _reason(err: Exception, path: str) -> str:
    """The first line of a loading error, without torch's advice to load with weights_only=False (which runs any code
    that a crafted file holds) or to re-save for mmap, and with what the file is when it is no checkpoint at all."""
    head = _head(path)
    if head != ZIP_MAGIC and not head.startswith(b"\x80"):
        return ("it is not a PyTorch checkpoint: neither torch.save's zip format nor a pickle (another kind of file, "
                "or random bytes?)")
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "weights_only" in str(err):
        if "Unsupported operand" in str(err):  # the pickle itself is broken, not its content
            return "its pickled content is damaged (truncated, or not a checkpoint?)"
        return ("it holds objects other than tensors and plain values, which are not loaded (weights_only=True; "
                "a checkpoint of this project never holds them)")
    return f"{type(err).__name__}: {text} (truncated, or not a checkpoint?)"


# Checkpoints written before the ViT became timm's VisionTransformer hold its patch embedding's conv as
# `patch_embed.weight` / `.bias`; timm's is `patch_embed.proj.*`. Here, not in dmjd_encoders.pretrained: the strict
# loading of any model (a resumed run's included) renames them too.
LEGACY_KEY_RENAMES = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias"}


def rename_legacy_keys(state_dict: dict, expected_keys) -> dict:
    """Renames, in place, keys of checkpoints written before (LEGACY_KEY_RENAMES, under any module prefix) where
    `expected_keys` (those of the module that loads them) have the new name."""
    expected = set(expected_keys)
    for key in list(state_dict):
        for old, new in LEGACY_KEY_RENAMES.items():
            if key == old or key.endswith("." + old):
                renamed = key[:len(key) - len(old)] + new
                if renamed in expected and renamed not in state_dict:
                    state_dict[renamed] = state_dict.pop(key)
    return state_dict


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, what: str = "model") -> None:
    """Loads every key or fails with the list of missing, unexpected and mismatched keys."""
    own = module.state_dict()
    state_dict = rename_legacy_keys(dict(state_dict), own)
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
