"""Confusion matrix and mmseg's segmentation scores (aAcc, IoU, mIoU, mAcc), checked by hand and across 2 processes."""
import json
import math

import pytest
import torch

from helpers import run_two_processes
from util.seg_metrics import ConfusionMatrix, per_class_table, scores_for_log, segmentation_scores


# 5 classes. Two pixels are ignored (255) and one has a label outside the classes (9): all three are left out,
# whatever is predicted there. Class 3 is predicted once but never in the ground truth (IoU 0, counted in mIoU,
# not in mAcc); class 4 appears nowhere (left out of both means).
LABEL = torch.tensor([[0, 0, 1, 255],
                      [0, 2, 1, 255],
                      [2, 2, 9, 1]])
PRED = torch.tensor([[0, 1, 1, 3],
                     [0, 2, 2, 0],
                     [2, 3, 3, 1]])
HAND_MATRIX = [[2, 1, 0, 0, 0],  # rows: ground truth 0..4, columns: prediction 0..4
               [0, 2, 1, 0, 0],
               [0, 0, 2, 1, 0],
               [0, 0, 0, 0, 0],
               [0, 0, 0, 0, 0]]


def test_confusion_matrix_leaves_out_ignored_and_out_of_range_labels():
    cm = ConfusionMatrix(5)
    cm.update(PRED, LABEL)
    assert cm.matrix.tolist() == HAND_MATRIX
    cm.update(PRED[None], LABEL[None])  # any shape, accumulated
    assert cm.matrix.tolist() == [[2 * v for v in row] for row in HAND_MATRIX]


def test_miou_matches_the_hand_computed_confusion_matrix():
    scores = segmentation_scores(torch.tensor(HAND_MATRIX))
    # intersections 2, 2, 2, 0, 0; unions 3, 4, 4, 1, 0; ground truth 3, 3, 3, 0, 0
    assert scores["IoU"][:4] == pytest.approx([200 / 3, 50.0, 50.0, 0.0]) and math.isnan(scores["IoU"][4])
    assert scores["Acc"][:3] == pytest.approx([200 / 3] * 3) and all(math.isnan(v) for v in scores["Acc"][3:])
    assert scores["mIoU"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2 + 0) / 4 * 100)
    assert scores["mAcc"] == pytest.approx(200 / 3)
    assert scores["aAcc"] == pytest.approx(6 / 9 * 100)
    assert scores["pixels"] == [3, 3, 3, 0, 0]


def test_an_empty_confusion_matrix_is_an_error():
    with pytest.raises(ValueError, match="no labelled pixel"):
        segmentation_scores(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 2), torch.zeros(2, 3))


def test_per_class_table_and_log_record():
    scores = segmentation_scores(torch.tensor(HAND_MATRIX))
    names = ["wall", "sky", "floor", "tree", "door"]
    table = per_class_table(scores, names)
    assert "| sky | 50.00 | 66.67 | 3 |" in table
    assert "| door | - | - | 0 |" in table  # left out of both means
    assert "| 66.67 | 41.67 | 66.67 |" in table  # aAcc, mIoU, mAcc
    record = json.loads(json.dumps(scores_for_log(scores, names)))  # plain JSON: no NaN
    assert record["IoU"]["door"] is None and record["IoU"]["tree"] == 0.0
    assert record["mIoU"] == pytest.approx(41.6666, abs=1e-3)
    assert "| class 4 |" in per_class_table(scores)
    with pytest.raises(ValueError, match="3 class names for 5 classes"):
        per_class_table(scores, names[:3])


DDP_SCRIPT = """
import json, os, datetime
import torch, torch.distributed as dist
from training.distributed import all_reduce_sum, cleanup_distributed
from util.seg_metrics import ConfusionMatrix

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
g = torch.Generator().manual_seed(0)
samples = [(torch.randint(0, 4, (5, 7), generator=g), torch.randint(0, 5, (5, 7), generator=g)) for _ in range(7)]
cm = ConfusionMatrix(4)
for index in range(rank, len(samples), world):  # each sample on one process, no padding (as ShardSampler)
    pred, label = samples[index]
    cm.update(pred, torch.where(label == 4, 255, label))
print(json.dumps(all_reduce_sum(cm.matrix).tolist()), flush=True)  # as the segmentation task sums it
dist.barrier()  # both processes are done with the group before either ends it (gloo at torch 2.6 hung once here)
cleanup_distributed()
"""


def test_the_matrix_is_summed_exactly_over_processes():
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(0, 4, (5, 7), generator=g), torch.randint(0, 5, (5, 7), generator=g)) for _ in range(7)]
    single = ConfusionMatrix(4)
    for pred, label in samples:
        single.update(pred, torch.where(label == 4, 255, label))
    lines = run_two_processes(DDP_SCRIPT)
    for line in lines:
        assert json.loads(line) == single.matrix.tolist()
