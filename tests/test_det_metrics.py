"""util.det_metrics: COCO result records from Mask R-CNN outputs, exact gathering over processes, and AP from the
COCO API on a hand-made case whose numbers follow from COCOeval's definitions."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from util.coco import CocoDetection, InvalidAnnotationWarning
from util.det_metrics import COCO_METRICS, coco_evaluate, coco_ground_truth, coco_records, scores_for_log, write_results

CAT, DOG = 5, 9  # category ids; labels 1 and 2
CATEGORY_IDS = [CAT, DOG]
# xywh boxes on 64 x 64 images: cats A and B (400 pixels: small) in image 1, dog C (1600 pixels: medium) in image 2
A, B, C = [4, 4, 20, 20], [36, 36, 20, 20], [10, 10, 40, 40]
MISSED_ONE_OF_TWO = 100 * 51 / 101  # recall reaches 0.5 at precision 1: 51 of COCO's 101 recall points


def rectangle(box, size=64):
    mask = np.zeros((size, size), np.uint8)
    x, y, w, h = box
    mask[y:y + h, x:x + w] = 1
    return mask


def rle(box, size=64):
    encoded = mask_utils.encode(np.asfortranarray(rectangle(box, size)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def ground_truth():
    annotations = [{"id": i, "image_id": image_id, "category_id": category, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0, "segmentation": rle(box)}
                   for i, (image_id, category, box) in enumerate([(1, CAT, A), (1, CAT, B), (2, DOG, C)], start=1)]
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in (1, 2)],
            "annotations": annotations, "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}]}


def output(detections):
    """A Mask R-CNN output at half the original size (32 x 32) for (box xywh at 64, label, score) detections, each
    mask filling its box (probability 0.9 in every cell)."""
    boxes = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _, _ in detections], dtype=torch.float32) / 2
    return {"boxes": boxes.reshape(-1, 4), "labels": torch.tensor([label for _, label, _ in detections]),
            "scores": torch.tensor([score for _, _, score in detections]),
            "masks": torch.full((len(detections), 1, 28, 28), 0.9)}


def target(image_id):
    return {"image_id": image_id, "orig_size": torch.tensor([64, 64]), "size": torch.tensor([32, 32])}


def records_of(per_image):
    return coco_records([output(d) for d in per_image.values()], [target(i) for i in per_image], CATEGORY_IDS)


def test_records_are_in_the_original_image_with_the_files_category_ids():
    records = records_of({1: [(A, 1, 0.9)], 2: [(C, 2, 0.8)]})
    assert [(r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in records] == [
        (1, CAT, [4.0, 4.0, 20.0, 20.0], pytest.approx(0.9)), (2, DOG, [10.0, 10.0, 40.0, 40.0], pytest.approx(0.8))]
    np.testing.assert_array_equal(mask_utils.decode(records[0]["segmentation"]), rectangle(A))  # 0.5 of bilinear
    assert isinstance(records[0]["segmentation"]["counts"], str)  # JSON-ready
    nothing = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
               "masks": torch.zeros(0, 1, 32, 32)}
    assert coco_records([nothing], [target(1)], CATEGORY_IDS) == []
    with pytest.raises(ValueError, match="outside 1..2"):
        coco_records([output([(A, 0, 0.9)])], [target(1)], CATEGORY_IDS)


def test_perfect_detections_score_100_and_absent_sizes_nan():
    scores = coco_evaluate(ground_truth(), records_of({1: [(A, 1, 0.9), (B, 1, 0.8)], 2: [(C, 2, 0.7)]}))
    for iou_type in ("bbox", "segm"):
        # precision is tp / (tp + fp + machine epsilon) in COCOeval: 100 up to rounding
        assert [scores[iou_type][k] for k in COCO_METRICS[:5]] == pytest.approx([100.0] * 5, abs=1e-9)
        assert np.isnan(scores[iou_type]["APl"])  # no large object
    assert scores_for_log(scores)["segm_APl"] is None and scores_for_log(scores)["bbox_AP50"] == pytest.approx(100)


def test_a_missed_object_and_a_false_positive_give_cocoevals_numbers():
    # Cats: A found, B missed -> 51/101. Dog: a false positive (small, elsewhere) ranked above C -> precision 1/2 at
    # every recall point -> 50. APs has only the cats; in APm the small false positive is ignored -> 100.
    records = records_of({1: [(A, 1, 0.9)], 2: [([40, 40, 8, 8], 2, 0.95), (C, 2, 0.8)]})
    scores = coco_evaluate(ground_truth(), records)
    for iou_type in ("bbox", "segm"):
        metrics = scores[iou_type]
        for name in ("AP", "AP50", "AP75"):
            assert metrics[name] == pytest.approx((MISSED_ONE_OF_TWO + 50) / 2, abs=1e-9)
        assert metrics["APs"] == pytest.approx(MISSED_ONE_OF_TWO, abs=1e-9) and metrics["APm"] == pytest.approx(100)


def test_evaluation_leaves_the_annotation_file_as_it_was():
    data = ground_truth()
    before = json.dumps(data)
    coco_evaluate(data, records_of({1: [(A, 1, 0.9)]}))
    assert json.dumps(data) == before


def test_scores_equal_calling_cocoeval_directly(capsys):
    records = records_of({1: [(A, 1, 0.9), ([30, 30, 20, 24], 1, 0.6)], 2: [([12, 8, 40, 40], 2, 0.8)]})
    scores = coco_evaluate(ground_truth(), json.loads(json.dumps(records)))
    for iou_type in ("bbox", "segm"):
        gt = coco_ground_truth(ground_truth())
        results = [{k: v for k, v in r.items() if iou_type == "bbox" or k != "bbox"} for r in records]
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        expected = [100 * s if s >= 0 else float("nan") for s in evaluator.stats[:6]]
        np.testing.assert_allclose([scores[iou_type][k] for k in COCO_METRICS], expected, rtol=0, atol=1e-12)
    assert 0 < scores["bbox"]["AP"] < 100


def test_an_evaluated_image_without_detections_counts_its_misses():
    records = records_of({1: [(A, 1, 0.9), (B, 1, 0.8)]})
    assert coco_evaluate(ground_truth(), records, ["bbox"], image_ids=[1])["bbox"]["AP"] == pytest.approx(100)
    with_dog = coco_evaluate(ground_truth(), records, ["bbox"], image_ids=[1, 2])
    assert with_dog["bbox"]["AP"] == pytest.approx(50)  # the dog's AP is 0
    assert coco_evaluate(ground_truth(), [], ["segm"]) == {"segm": dict.fromkeys(COCO_METRICS, 0.0)}


def test_a_datasets_ground_truth_leaves_out_the_annotations_it_skips(tmp_path):
    # A null box, a polygon of two points (pycocotools would read it as a box) and no segmentation at all: in the file
    # as parsed, COCOeval fails on each (bbox or segm) or counts it as a miss; against the dataset's ground truth,
    # perfect records score 100.
    data = ground_truth()
    unusable = [{"id": 4, "image_id": 1, "category_id": CAT, "bbox": None, "area": 400, "iscrowd": 0,
                 "segmentation": rle(A)},
                {"id": 5, "image_id": 2, "category_id": DOG, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0,
                 "segmentation": [[4, 4, 24, 24]]},
                {"id": 6, "image_id": 2, "category_id": CAT, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}]
    data["annotations"] += unusable
    (tmp_path / "images").mkdir()
    (tmp_path / "val.json").write_text(json.dumps(data))
    with pytest.warns(InvalidAnnotationWarning):
        dataset = CocoDetection(str(tmp_path / "images"), str(tmp_path / "val.json"), with_masks=False)
    assert [id for id, _ in dataset.invalid_annotations] == [4, 5, 6]
    gt = coco_ground_truth(dataset)
    assert sorted(gt.getAnnIds()) == [1, 2, 3] and sorted(gt.getImgIds()) == [1, 2]
    scores = coco_evaluate(gt, records_of({1: [(A, 1, 0.9), (B, 1, 0.8)], 2: [(C, 2, 0.7)]}))
    for iou_type in ("bbox", "segm"):
        assert [scores[iou_type][k] for k in COCO_METRICS[:5]] == pytest.approx([100.0] * 5, abs=1e-9)
    assert coco_ground_truth(dataset.ground_truth_data()).getAnnIds() == gt.getAnnIds()  # the plain dict as well


def test_results_file_is_coco_results_json(tmp_path):
    records = records_of({1: [(A, 1, 0.9)]})
    path = tmp_path / "out" / "results.json"
    write_results(records, str(path))
    assert json.loads(path.read_text()) == records and not (tmp_path / "out" / "results.json.partial").exists()
    assert len(coco_ground_truth(ground_truth()).loadRes(str(path)).getAnnIds()) == 1
