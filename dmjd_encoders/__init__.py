"""DMJD's encoders, ConViT (ConvMAE's hybrid) and ViT, as timm models, with the loading and export of their weights.

    import timm
    import dmjd_encoders   # registers every encoder with timm (and so with smp's "tu-" encoder names)

    encoder = timm.create_model("local-dir:exports/dmjd_convit_b", pretrained=True)
    encoder = dmjd_encoders.create_encoder("convvit_base_patch16", weights="exports/dmjd_convit_b")

Load notes (a resampled position embedding, the weights that start fresh) go to the logger "dmjd_encoders" at INFO:
`logging.getLogger("dmjd_encoders").setLevel(logging.WARNING)` silences them.
"""
from .export import export_encoder
from .models_convvit import ENCODER_ARCHS, ENCODER_NAMES, ENCODER_OF, create_encoder
from .pretrained import load_pretrained

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads it from here (without importing torch)

__all__ = ["__version__", "ENCODER_ARCHS", "ENCODER_NAMES", "ENCODER_OF", "create_encoder", "export_encoder",
           "load_pretrained"]
