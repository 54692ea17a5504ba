"""Where a dataset layout keeps its files, importable without torch: the scripts check these paths before they import
torch (so that a wrong --data_path answers at once), and the datasets read the same paths."""
import os
from typing import Tuple


def coco_split_paths(data_path: str, split: str) -> Tuple[str, str]:
    """(image folder, annotation file) of `split` ("train" or "val") in COCO 2017's layout."""
    return (os.path.join(data_path, f"{split}2017"),
            os.path.join(data_path, "annotations", f"instances_{split}2017.json"))


def detection_split_paths(flags, split: str) -> Tuple[str, str]:
    """(image folder, annotation file) of "train" or "val" for main_detect.py's flags (or its config): --{split}_images
    and --{split}_json where given, else COCO 2017's layout under --data_path."""
    images, annotations = coco_split_paths(flags.data_path, split)
    return getattr(flags, f"{split}_images") or images, getattr(flags, f"{split}_json") or annotations
