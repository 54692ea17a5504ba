"""util.coco: COCO-format datasets as Mask R-CNN reads them; crowd regions, bad layouts, bad annotations, bad
images (tiny hand-made files)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from util.coco import CocoDetection, InvalidAnnotationWarning, coco_split, coco_split_paths, detection_collate
from util.datasets import UnreadableImageWarning

SQUARE = [2, 2, 10, 2, 10, 10, 2, 10]  # a polygon: the square from (2, 2) to (10, 10)


def rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def blob(height=16, width=20):
    mask = np.zeros((height, width), np.uint8)
    mask[4:9, 12:18] = 1
    return mask


def annotation(id, image_id, category_id, bbox, segmentation=None, iscrowd=0):
    """An annotation whose segmentation is the polygon SQUARE unless given."""
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "segmentation": [SQUARE] if segmentation is None else segmentation, "iscrowd": iscrowd,
            "area": float(bbox[2] * bbox[3])}


def write_coco(root, split="val", annotations=None, sizes=((16, 20), (16, 20), (16, 20))):
    """COCO 2017's layout under `root` with images 1.. of `sizes` (height, width) and categories 3 ("cat") and 7
    ("dog"); by default image 1 holds a polygon cat and an RLE dog, image 2 only a crowd, image 3 nothing."""
    image_dir, annotation_file = coco_split_paths(str(root), split)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    images = []
    for i, (height, width) in enumerate(sizes, start=1):
        Image.fromarray(np.full((height, width, 3), 40 * i, np.uint8)).save(root / f"{split}2017" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": height, "width": width})
    if annotations is None:
        annotations = [annotation(11, 1, 3, [2, 2, 8, 8]), annotation(12, 1, 7, [12, 4, 6, 5], rle_of(blob())),
                       annotation(13, 2, 7, [0, 0, 5, 5], rle_of(blob()), iscrowd=1)]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    with open(annotation_file, "w") as f:
        json.dump(data, f)
    return image_dir, annotation_file


def test_targets_are_what_mask_rcnn_reads(tmp_path):
    write_coco(tmp_path)
    dataset = coco_split(str(tmp_path), "val")
    assert dataset.class_names == ["cat", "dog"] and dataset.category_ids == [3, 7]  # sorted by id, labels 1, 2
    image, target = dataset[0]
    assert isinstance(image, Image.Image) and image.size == (20, 16)
    assert target["image_id"] == 1 and target["orig_size"].tolist() == [16, 20]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2., 2., 10., 10.], [12., 4., 18., 9.]]))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, 16, 20)
    assert target["masks"][0, 2:10, 2:10].all() and target["masks"][0].sum() == 64  # the polygon, rasterised
    np.testing.assert_array_equal(target["masks"][1].numpy(), blob())  # the RLE, exactly
    assert target["iscrowd"].tolist() == [0, 0] and target["area"].tolist() == [64.0, 30.0]


def test_training_drops_crowd_regions_and_images_without_instances_which_evaluation_keeps(tmp_path):
    write_coco(tmp_path, "train")
    train = coco_split(str(tmp_path), "train")
    assert train.ids == [1]  # image 2 holds only a crowd, image 3 nothing
    val = CocoDetection(*coco_split_paths(str(tmp_path), "train"), train=False)
    assert val.ids == [1, 2, 3]
    _, crowd = val[1]
    assert crowd["iscrowd"].tolist() == [1] and crowd["boxes"].shape == (1, 4)
    _, empty = val[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 16, 20) and empty["labels"].shape == (0,)


def test_a_wrong_layout_fails_at_once_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*val2017 not found"):
        coco_split(str(tmp_path), "val")
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="annotation file .*instances_val2017.json not found"):
        coco_split(str(tmp_path), "val")
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text("not json")
    with pytest.raises(ValueError, match="instances_val2017.json is not a JSON file"):
        coco_split(str(tmp_path), "val")
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances_val2017.json is not a COCO annotation file"):
        coco_split(str(tmp_path), "val")


def test_invalid_annotations_are_skipped_named_and_counted(tmp_path):
    bad = [annotation(21, 1, 3, [2, 2, 0, 8]),  # zero width
           annotation(22, 1, 3, [2, 2, 8, 8], [[30, 30, 40, 30, 40, 40]]),  # a polygon outside the 20 x 16 image
           annotation(23, 1, 5, [2, 2, 8, 8]),  # category 5 is not in the file
           annotation(24, 9, 3, [2, 2, 8, 8]),  # image 9 is not in the file
           annotation(25, 1, 3, [2, 2, 8, 8], [[2, 2, 10, 10]])]  # two points only
    good = [annotation(20, 1, 3, [2, 2, 8, 8], [SQUARE, [0, 0, 1, 1]])]  # its two-point polygon is left out
    _, annotation_file = write_coco(tmp_path, annotations=good + bad)
    with pytest.warns(InvalidAnnotationWarning) as caught:
        dataset = coco_split(str(tmp_path), "val")
    messages = [str(w.message) for w in caught]
    for id, reason in ((21, "zero area"), (22, "outside its image"), (23, "category 5"), (24, "image 9"),
                       (25, "no polygon with three points")):
        assert any(annotation_file in m and f"annotation {id}:" in m and reason in m for m in messages), messages
    assert [id for id, _ in dataset.invalid_annotations] == [21, 22, 23, 24, 25]
    target = dataset[0][1]
    assert target["labels"].tolist() == [1] and target["masks"][0].sum() == 64  # the square alone


def test_unreadable_or_mis_sized_images_are_skipped_named_and_counted_by_the_collate(tmp_path):
    image_dir, _ = write_coco(tmp_path)
    with open(f"{image_dir}/2.png", "wb") as f:
        f.write(b"")
    Image.new("RGB", (8, 8)).save(f"{image_dir}/3.png")
    dataset = coco_split(str(tmp_path), "val")
    with pytest.warns(UnreadableImageWarning, match="2.png"):
        assert dataset[1] is None
    with pytest.warns(UnreadableImageWarning, match="3.png: it is 8 x 8 but its annotation file says 20 x 16"):
        assert dataset[2] is None
    with pytest.warns(UnreadableImageWarning):
        images, targets, num_bad = detection_collate([dataset[i] for i in range(3)])
    assert len(images) == len(targets) == 1 and targets[0]["image_id"] == 1 and num_bad == 2
    assert detection_collate([None, None]) == (None, None, 2)


def test_the_transform_gets_image_and_target(tmp_path):
    write_coco(tmp_path)
    dataset = coco_split(str(tmp_path), "val", transform=lambda image, target: (image.size, target["image_id"]),
                         with_masks=False)
    assert dataset[2] == ((20, 16), 3)
    assert "masks" not in dataset.target(1)
