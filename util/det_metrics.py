"""COCO evaluation of boxes and instance masks with the COCO API (pycocotools' COCOeval), as detectron2's
COCOEvaluator does it.

The path of a result: `coco_records` turns Mask R-CNN's outputs for a batch into COCO result records (boxes in the
original image's pixels as x, y, width, height, mapped in fp32; masks pasted into their boxes at the original image's
resolution, thresholded at 0.5 and RLE-encoded, as detectron2's detector_postprocess; labels mapped back to the
file's category ids). Each process evaluates a disjoint part of the set without padding (training.data.ShardSampler),
and the task gathers the records and evaluated image ids of all processes (training.distributed.gather_shards), so
every image counts exactly once. `write_results` saves the records as COCO's results JSON, and
`coco_evaluate` scores them against the annotation file: AP (IoU 0.50:0.95), AP50, AP75, APs, APm, APl for `bbox`
and `segm`, in percent; a score COCOeval leaves undefined (no ground truth of that size) is NaN.
"""
import contextlib
import io
import json
import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dmjd_encoders.checkpoint import write_file_atomically
from util.coco import CocoDetection
from util.det_transforms import MASK_THRESHOLD, detections_in

__all__ = ["COCO_METRICS", "IOU_TYPES", "coco_records", "write_results", "coco_ground_truth",
           "coco_evaluate", "scores_for_log"]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats
IOU_TYPES = ("bbox", "segm")


def _encode_masks(masks: torch.Tensor) -> List[dict]:
    """RLEs (counts as str, for JSON) of bool masks [N, H, W]."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.to("cpu", torch.uint8).numpy().transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_records(outputs: Sequence[Dict[str, torch.Tensor]], targets: Sequence[dict], category_ids: Sequence[int],
                 mask_threshold: float = MASK_THRESHOLD) -> List[dict]:
    """COCO result records of one batch: Mask R-CNN outputs (models_maskrcnn: `boxes` x1, y1, x2, y2 in the
    transformed image, `labels` 1..C, `scores`, optionally `masks` [N, 1, M, M] probabilities within the boxes) with
    their targets (`image_id`, `orig_size` and `size`: the image's height, width before and after the transform).
    Boxes are mapped to the original image in fp32 and masks pasted there (util.det_transforms.detections_in);
    `category_ids[label - 1]` is the file's category id (util.coco.CocoDetection.category_ids)."""
    records = []
    for output, target in zip(outputs, targets):
        orig_size = tuple(int(v) for v in target["orig_size"])
        detections = detections_in(output, tuple(int(v) for v in target["size"]), orig_size, mask_threshold)
        boxes = detections["boxes"].detach().cpu().to(torch.float64)
        boxes[:, 2:] -= boxes[:, :2]
        rles = _encode_masks(detections["masks"]) if "masks" in detections else [None] * len(boxes)
        image_id = int(target["image_id"])
        labels = detections["labels"].tolist()
        if labels and not 1 <= min(labels) <= max(labels) <= len(category_ids):
            raise ValueError(f"labels of image {image_id} outside 1..{len(category_ids)} (0 is the background): "
                             f"{sorted(set(labels))}")
        for box, label, score, rle in zip(boxes.tolist(), labels, detections["scores"].tolist(), rles):
            record = {"image_id": image_id, "category_id": category_ids[int(label) - 1], "bbox": box,
                      "score": float(score)}
            if rle is not None:
                record["segmentation"] = rle
            records.append(record)
    return records


def write_results(records: List[dict], path: str) -> None:
    """Writes the records as COCO's results JSON; the file appears whole or not at all (util.checkpoint
    .write_file_atomically)."""
    write_file_atomically(path, lambda f: f.write(json.dumps(records).encode()))


def coco_ground_truth(coco_data: Union[dict, CocoDetection]) -> COCO:
    """A pycocotools COCO, built quietly, of a dataset's ground truth (its `ground_truth_data()`: the file with the
    annotations the dataset keeps) or of a parsed annotation file, taken as it is. Evaluation of a dataset should
    pass the dataset (or its ground_truth_data()), not its `coco_data`: that still holds the annotations the dataset
    skipped, which COCOeval would count as objects to find, or fail on (a null box, a polygon of two points). Its
    annotations are copies: COCOeval writes into them (masks as RLE, `ignore`), and the dataset reads the originals."""
    if isinstance(coco_data, CocoDetection):
        coco_data = coco_data.ground_truth_data()
    coco = COCO()
    coco.dataset = {**coco_data, "annotations": [dict(annotation) for annotation in coco_data["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _evaluate_one(ground_truth: COCO, records: List[dict], iou_type: str,
                  image_ids: Optional[Sequence[int]]) -> Dict[str, float]:
    # Copies: loadRes writes into the records. Without their box, segm's APs/APm/APl size detections by their masks
    # (loadRes takes the box's area when there is one, as detectron2 notes).
    records = [{k: v for k, v in record.items() if iou_type == "bbox" or k != "bbox"} for record in records]
    with contextlib.redirect_stdout(io.StringIO()):  # the API prints its progress and table
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(records), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) * 100 if value >= 0 else math.nan
            for name, value in zip(COCO_METRICS, evaluator.stats)}


def coco_evaluate(ground_truth, records: List[dict], iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, float]]:
    """{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}} in percent, of result records against
    `ground_truth` (a pycocotools COCO, or a parsed annotation file). `image_ids`: the images evaluated (default:
    all of the file); an evaluated image without a record counts with its misses. No record at all scores 0."""
    if isinstance(ground_truth, dict):
        ground_truth = coco_ground_truth(ground_truth)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        if iou_type == "segm" and records and "segmentation" not in records[0]:
            raise ValueError("segm evaluation needs records with a 'segmentation' (outputs with masks)")
    if not records:  # loadRes cannot read an empty list; a model that finds nothing scores 0
        return {iou_type: dict.fromkeys(COCO_METRICS, 0.0) for iou_type in iou_types}
    return {iou_type: _evaluate_one(ground_truth, records, iou_type, image_ids) for iou_type in iou_types}


def scores_for_log(scores: Dict[str, Dict[str, float]]) -> Dict[str, Optional[float]]:
    """Flat {"bbox_AP": ..., "segm_APl": ...} for log.txt, NaN as None (JSON has no NaN)."""
    return {f"{iou_type}_{name}": None if math.isnan(value) else value
            for iou_type, metrics in scores.items() for name, value in metrics.items()}
