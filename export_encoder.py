"""Exports the encoder of a checkpoint (the command of dmjd_encoders.export, run from a checkout):

    python export_encoder.py out/dmjd_convit_b/checkpoint-399.pth exports/dmjd_convit_b --result "ImageNet top-1=85.2"
    python export_encoder.py out/dmjd_convit_b/checkpoint-399.pth encoder.pth --key teacher
"""
from dmjd_encoders.export import export_encoder, main  # noqa: F401  (export_encoder: for `from export_encoder import`)

if __name__ == "__main__":
    main()
