"""Semantic segmentation scores from a confusion matrix, with MMSegmentation's definitions (IoUMetric).

The matrix is accumulated on the device (rows: ground truth, columns: prediction); the segmentation task sums it
over DDP processes with one all-reduce (engine_segment). Evaluated with a sampler that gives each process a disjoint
part of the set without padding (training.data.ShardSampler), every image is counted exactly once.

From the matrix M, per class k: intersection M[k, k], ground-truth area (row sum), predicted area (column sum),
union = ground truth + predicted - intersection.
- aAcc: correctly labelled pixels / labelled pixels.
- IoU_k = intersection / union; Acc_k = intersection / ground truth.
- mIoU: mean IoU over the classes with a non-empty union, i.e. present in the ground truth or predicted (a class
  predicted but absent counts with IoU 0); mAcc: mean Acc over the classes present in the ground truth. Classes
  left out have IoU / Acc NaN (None in the log), exactly as mmseg's nanmean.
Percentages (x 100), as mmseg reports them.
"""
import math
from typing import Dict, Optional, Sequence

import torch

from util.seg_labels import IGNORE_INDEX

__all__ = ["ConfusionMatrix", "segmentation_scores", "per_class_table", "scores_for_log"]


class ConfusionMatrix:
    """Counts (ground truth, prediction) pixel pairs; labels equal to `ignore_index` or outside [0, num_classes)
    are left out. int64 counts on `device`."""

    def __init__(self, num_classes: int, device="cpu", ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred: class indices in [0, num_classes) (e.g. probabilities.argmax(1)); label: the same shape."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        c = self.num_classes
        label = label.to(self.matrix.device, torch.int64).flatten()
        pred = pred.to(self.matrix.device, torch.int64).flatten()
        valid = (label >= 0) & (label < c) & (label != self.ignore_index)
        # Left-out pixels go to an extra bin that is dropped: no boolean indexing, so no wait for the device.
        index = torch.where(valid, label * c + pred, torch.full_like(label, c * c))
        self.matrix += torch.bincount(index, minlength=c * c + 1)[:c * c].view(c, c)


def segmentation_scores(matrix: torch.Tensor) -> Dict[str, object]:
    """{"aAcc", "mIoU", "mAcc": float (%), "IoU", "Acc": per-class lists (%, NaN where undefined), "pixels":
    per-class ground-truth pixel counts} from a [C, C] confusion matrix (rows: ground truth)."""
    m = matrix.detach().to("cpu", torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square [C, C], got {tuple(m.shape)}")
    intersection = m.diagonal()
    gt, predicted = m.sum(dim=1), m.sum(dim=0)
    union = gt + predicted - intersection
    iou = torch.where(union > 0, intersection / union, torch.full_like(union, math.nan)) * 100
    acc = torch.where(gt > 0, intersection / gt, torch.full_like(gt, math.nan)) * 100
    total = gt.sum()
    if total == 0:
        raise ValueError("the confusion matrix is empty: no labelled pixel was evaluated")
    return {"aAcc": float(intersection.sum() / total * 100), "mIoU": float(iou.nanmean()),
            "mAcc": float(acc.nanmean()), "IoU": iou.tolist(), "Acc": acc.tolist(),
            "pixels": [int(v) for v in gt.tolist()]}


def _class_names(names: Optional[Sequence[str]], num_classes: int):
    if names is None:
        return [f"class {k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return list(names)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def per_class_table(scores: Dict[str, object], class_names: Optional[Sequence[str]] = None) -> str:
    """The per-class results as a markdown table (class, IoU, Acc, ground-truth pixels; "-" where a class was
    left out of the means), followed by a row with aAcc, mIoU and mAcc."""
    names = _class_names(class_names, len(scores["IoU"]))
    lines = ["| class | IoU | Acc | pixels |", "|---|---:|---:|---:|"]
    for name, iou, acc, pixels in zip(names, scores["IoU"], scores["Acc"], scores["pixels"]):
        lines.append(f"| {name} | {_percent(iou)} | {_percent(acc)} | {pixels} |")
    lines += ["", "| aAcc | mIoU | mAcc |", "|---:|---:|---:|",
              f"| {scores['aAcc']:.2f} | {scores['mIoU']:.2f} | {scores['mAcc']:.2f} |"]
    return "\n".join(lines)


def scores_for_log(scores: Dict[str, object], class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """A JSON-ready dict for log.txt: aAcc, mIoU, mAcc and {"IoU": {class name: IoU or None}}."""
    names = _class_names(class_names, len(scores["IoU"]))
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct to key the per-class IoU")
    return {"aAcc": scores["aAcc"], "mIoU": scores["mIoU"], "mAcc": scores["mAcc"],
            "IoU": {name: None if math.isnan(v) else v for name, v in zip(names, scores["IoU"])}}
