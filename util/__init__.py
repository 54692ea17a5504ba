"""Helpers of the training scripts (a checkout's layer; `pip install` installs only the package dmjd_encoders).

`util.checkpoint` and `util.pos_embed` moved into dmjd_encoders, with the encoders that need them: these names stay
as aliases of the very same modules, so that every `from util.checkpoint import ...` keeps working.
"""
import sys

from dmjd_encoders import checkpoint, pos_embed

sys.modules[__name__ + ".checkpoint"] = checkpoint
sys.modules[__name__ + ".pos_embed"] = pos_embed
