"""`util.checkpoint`, the name MAE's layout and this project's earlier versions gave the checkpoint helpers: they live in
dmjd_encoders.checkpoint (files, checksums, strict loading) and dmjd_encoders.pretrained (pre-trained encoders); this
module only re-exports them for code written against the old name."""
from dmjd_encoders.checkpoint import *  # noqa: F401,F403
from dmjd_encoders.checkpoint import (CheckpointError, load_checkpoint, load_state_dict_strict,  # noqa: F401
                                      save_checkpoint, write_file_atomically)
from dmjd_encoders.pretrained import (PRETRAIN_ONLY_PREFIXES, ArchitectureMismatch, architecture_kwargs,  # noqa: F401
                                      check_encoder_loaded, encoder_state_dict, fit_encoder_state, load_pretrained,
                                      resample_pos_embed, saved_model)
