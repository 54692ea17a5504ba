"""The package's exceptions, in a module that imports nothing (no torch): a caller can name them, and the training
scripts can tell the package's errors from a bug, without loading the models. Every one of them says in its message
what is wrong and what to do; the scripts print it as their `error:` line.

Each keeps the built-in base it had before this module existed (ValueError, RuntimeError), so that an `except` written
against those still catches it.
"""

__all__ = ["EncoderError", "CheckpointError", "ArchitectureMismatch", "PretrainedWeightsError", "UnknownModelError"]


class EncoderError(Exception):
    """Any error the package raises on purpose: a checkpoint, weights or a model name it cannot use."""


class CheckpointError(EncoderError, RuntimeError):
    """A checkpoint file that cannot be used: unreadable, truncated, not a checkpoint, or damaged (its content does not
    match its checksum)."""


class ArchitectureMismatch(EncoderError, RuntimeError):
    """Weights of another architecture than the model's."""


class PretrainedWeightsError(EncoderError, ValueError):
    """--finetune names nothing to load, or weights that cannot be read or do not fit; the message starts with the
    flag (`--finetune ...`), and a script prints it as `error: <message>`."""


class UnknownModelError(EncoderError, ValueError):
    """--model names no model of the kind a script needs; the message names the closest registered ones."""
