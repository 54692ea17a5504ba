"""The encoders under the flat name of MAE's and ConvMAE's layout: `import models_convvit` registers them with timm
and gives their classes, factories and helpers. They live in dmjd_encoders.models_convvit (what an installed copy
imports); the scripts import that."""
from dmjd_encoders.models_convvit import *  # noqa: F401,F403  (its __all__)
from dmjd_encoders.models_convvit import (  # noqa: F401  (the registered factories and the scripts' helpers)
    convvit_base_patch16, convvit_large_patch16, convvit_mini_patch8, convvit_small_patch16, convvit_tiny_patch16,
    vit_base_patch16_gap_sincos, vit_large_patch16_gap_sincos, vit_test_patch16_gap_sincos, check_classifier_name,
    conv_weights_channels_last, is_plain_vit)
