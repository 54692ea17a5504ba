"""torch.hub entry points: one per registered encoder, each returning the encoder with `weights` loaded.

    encoder = torch.hub.load("path/to/this/checkout", "convvit_base_patch16", source="local",
                             weights="exports/dmjd_convit_b")   # an export folder, a .safetensors or a checkpoint
    encoder = torch.hub.load("OWNER/REPOSITORY", "convvit_base_patch16", weights="exports/dmjd_convit_b")

Keyword arguments go to timm.create_model (num_classes, fc_norm, img_size, features_only, ...).
"""
from dmjd_encoders import ENCODER_ARCHS
from dmjd_encoders import create_encoder as _create_encoder  # private: torch.hub.list shows only the encoders

dependencies = ["torch", "timm", "safetensors"]


def _entry_point(name: str):
    def load(weights=None, **kwargs):
        return _create_encoder(name, weights=weights, **kwargs)
    load.__name__ = load.__qualname__ = name
    load.__doc__ = (f"The {name} encoder (timm.create_model's keyword arguments). weights: an export folder of "
                    "export_encoder.py, its model.safetensors, or a checkpoint of pre-training, fine-tuning or "
                    "probing; None: randomly initialised.")
    return load


globals().update({name: _entry_point(name) for name in ENCODER_ARCHS})
