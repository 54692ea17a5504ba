"""Helpers of the training scripts: small, mostly pure functions (data, transforms, HOG, masking, metrics, schedules,
pictures) that import nothing from training/ (a checkout's layer; `pip install` installs only the package
dmjd_encoders, where the checkpoint files and the encoders' position embeddings live)."""
