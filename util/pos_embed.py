"""`util.pos_embed`, the name MAE's layout gives the 2-D sin-cos position embedding: it lives in
dmjd_encoders.pos_embed; this module only re-exports it."""
from dmjd_encoders.pos_embed import *  # noqa: F401,F403
