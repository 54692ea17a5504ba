"""Which registered encoder each pre-training model (models_dmjd.py) trains: a plain table, here so that the models
(dmjd_encoders.models_convvit) and the loading of weights (dmjd_encoders.pretrained), which the models use, both read
it without importing each other."""

__all__ = ["ENCODER_OF", "ENCODER_NAMES"]

# The encoder of each pre-training model, by the registered name of the encoder alone: what `python export_encoder.py`
# exports a pre-training checkpoint as, and which --model fine-tunes its encoder.
ENCODER_OF = {
    "dmjd_convit_mini_patch8_hog": "convvit_mini_patch8",
    "dmjd_convit_tiny_patch16_dec1_hog": "convvit_tiny_patch16",
    "dmjd_convit_small_patch16_dec2_hog": "convvit_small_patch16",
    "dmjd_convit_base_patch16_dec8_hog": "convvit_base_patch16",
    "dmjd_convit_base_patch16_dec2_hog": "convvit_base_patch16",
    "dmjd_convit_large_patch16_dec8_hog": "convvit_large_patch16",
    "dmjd_vit_tiny_patch16_dec1_hog": "vit_test_patch16_gap_sincos",
    "dmjd_vit_base_patch16_dec8_hog": "vit_base_patch16_gap_sincos",
}
ENCODER_NAMES = ENCODER_OF  # its name before 2026-12: the package's users may import it
