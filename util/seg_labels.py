"""Label conventions of semantic segmentation shared by the data, the losses and the scores (no torch, no I/O)."""

__all__ = ["IGNORE_INDEX"]

# A label pixel with this value is left out of the loss and of the scores (MMSegmentation's ignore_index): the
# "other" class 0 of ADE20K after reduce_zero_label, and the label padding of a crop smaller than the crop size.
IGNORE_INDEX = 255
