"""util.coco: COCO-format datasets as Mask R-CNN reads them; crowd regions, bad layouts, bad entries, bad
annotations, the ground truth evaluation reads, bad images (tiny hand-made files)."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
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


MISSING = object()  # `a_cat`'s value for a field left out


def a_cat(id, **fields):
    """Annotation `id`: a cat in image 1 (the polygon SQUARE in the box [2, 2, 8, 8]), with `fields` set, or left out
    where MISSING."""
    entry = annotation(id, 1, 3, [2, 2, 8, 8])
    for field, value in fields.items():
        if value is MISSING:
            del entry[field]
        else:
            entry[field] = value
    return entry


def write_coco(root, split="val", annotations=None, sizes=((16, 20), (16, 20), (16, 20)), edit=None):
    """COCO 2017's layout under `root` with images 1.. of `sizes` (height, width) and categories 3 ("cat") and 7
    ("dog"); by default image 1 holds a polygon cat and an RLE dog, image 2 only a crowd, image 3 nothing. `edit`
    changes the parsed file before it is written (json.dump writes NaN and Infinity as Python does)."""
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
    if edit is not None:
        edit(data)
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


def set_entry(key, index, field, value):
    """An `edit` for write_coco: entry `index` of `key` gets `field` = `value`."""
    def edit(data):
        data[key][index][field] = value
    return edit


def fails_with(annotation_file, message):
    """pytest.raises of a ValueError whose message is `annotation_file: message` and the fix."""
    return pytest.raises(ValueError, match=f"^{re.escape(f'{annotation_file}: {message}; ')}")


@pytest.mark.parametrize("key, index, field, value, message", [
    ("images", 0, "id", "1", "image id '1' (a str), entry 0 of 'images', is not an integer"),
    ("images", 1, "id", 2.0, "image id 2.0 (a float), entry 1 of 'images', is not an integer"),
    ("categories", 0, "id", True, "category id True (a bool), entry 0 of 'categories', is not an integer"),
    ("annotations", 2, "id", None, "annotation id null, entry 2 of 'annotations', is not an integer"),
    ("annotations", 0, "image_id", "1", "annotation 11 has image_id '1' (a str), not an integer"),
    ("annotations", 1, "category_id", 7.0, "annotation 12 has category_id 7.0 (a float), not an integer")])
def test_ids_that_are_not_integers_fail_naming_the_file_and_the_entry(tmp_path, key, index, field, value, message):
    _, annotation_file = write_coco(tmp_path, edit=set_entry(key, index, field, value))
    with fails_with(annotation_file, message):
        coco_split(str(tmp_path), "val")


def test_an_annotation_without_an_image_id_fails_naming_the_file_and_the_annotation(tmp_path):
    def drop_image_id(data):
        del data["annotations"][1]["image_id"]
    _, annotation_file = write_coco(tmp_path, edit=drop_image_id)
    with pytest.raises(ValueError, match=re.escape(f"{annotation_file}: annotation 12 has no image_id; give each "
                                                   f"annotation the integer image_id of an entry of 'images'")):
        coco_split(str(tmp_path), "val")


@pytest.mark.parametrize("key, name", [("images", "image"), ("annotations", "annotation"), ("categories", "category")])
def test_a_repeated_id_fails_naming_the_file_and_the_id(tmp_path, key, name):
    def repeat(data):
        data[key][1]["id"] = data[key][0]["id"]
    _, annotation_file = write_coco(tmp_path, edit=repeat)
    first_id = {"images": 1, "annotations": 11, "categories": 7}[key]
    with fails_with(annotation_file, f"{name} id {first_id} appears twice"):
        coco_split(str(tmp_path), "val")


@pytest.mark.parametrize("field, value, shown", [
    ("height", "480", "'480' (a str)"), ("width", 0, "0 (an int)"), ("height", -3, "-3 (an int)"),
    ("width", math.nan, "nan (a float)"), ("height", 16.0, "16.0 (a float)"), ("width", None, "null")])
def test_an_image_size_that_is_not_a_positive_integer_fails_naming_the_file_and_the_image(tmp_path, field, value,
                                                                                            shown):
    _, annotation_file = write_coco(tmp_path, edit=set_entry("images", 1, field, value))
    with fails_with(annotation_file, f"image 2 has {field} {shown}, not a positive integer"):
        coco_split(str(tmp_path), "val")


@pytest.mark.parametrize("value, shown", [("", "'' (a str)"), (None, "null"), (3, "3 (an int)")])
def test_an_image_without_a_file_name_string_fails_naming_the_file_and_the_image(tmp_path, value, shown):
    _, annotation_file = write_coco(tmp_path, edit=set_entry("images", 2, "file_name", value))
    with fails_with(annotation_file, f"image 3 has file_name {shown}, not a non-empty string"):
        coco_split(str(tmp_path), "val")


def assert_skipped(tmp_path, bad, reasons):
    """The annotations `bad` (ids 21..) next to a good cat (id 20) are skipped, each warned about with its reason,
    counted, and the dataset still reads the good one."""
    good = annotation(20, 1, 3, [2, 2, 8, 8])
    _, annotation_file = write_coco(tmp_path, annotations=[good] + bad)
    with pytest.warns(InvalidAnnotationWarning) as caught:
        dataset = coco_split(str(tmp_path), "val")
    messages = [str(w.message) for w in caught]
    for entry, reason in zip(bad, reasons):
        assert f"{annotation_file}: skipping annotation {entry['id']}: {reason}" in messages, messages
    assert dataset.invalid_annotations == [(entry["id"], reason) for entry, reason in zip(bad, reasons)]
    target = dataset[0][1]
    assert target["labels"].tolist() == [1] and target["masks"][0].sum() == 64


def test_annotations_with_a_missing_or_non_numeric_box_are_skipped_named_and_counted(tmp_path):
    boxes = [MISSING, None, [2, 2, 8], {"x": 2}, [2, "2", 8, 8], [2, 2, None, 8], [2, 2, True, 8], [2, 2, math.nan, 8],
             [2, 2, 8, math.inf]]
    bad = [a_cat(21 + i, bbox=box) for i, box in enumerate(boxes)]
    reasons = ["no bbox", "no bbox", "a bbox that is not a list of 4 numbers: [2, 2, 8]",
               "a bbox that is not a list of 4 numbers: {'x': 2}",
               "a bbox with a value that is not a finite number: [2, '2', 8, 8]",
               "a bbox with a value that is not a finite number: [2, 2, None, 8]",
               "a bbox with a value that is not a finite number: [2, 2, True, 8]",
               "a bbox with a value that is not a finite number: [2, 2, nan, 8]",
               "a bbox with a value that is not a finite number: [2, 2, 8, inf]"]
    assert_skipped(tmp_path, bad, reasons)


def test_annotations_with_a_missing_or_malformed_segmentation_are_skipped_named_and_counted(tmp_path):
    rle = rle_of(blob())
    segmentations = [MISSING, None, [SQUARE[:7] + ["10"]], [SQUARE, SQUARE[:3] + [math.nan]],
                     [[2, 2, 10, None, 10, 10]], {**rle, "size": "16x20"}, {**rle, "size": [16.0, 20]},
                     {**rle, "counts": 5}, {**rle, "counts": [3, "a", 4]}, {**rle, "counts": [3, -2]}]
    bad = [a_cat(21 + i, segmentation=segmentation) for i, segmentation in enumerate(segmentations)]
    reasons = ["no segmentation", "no segmentation",
               "a polygon with a coordinate that is not a finite number: '10' (a str)",
               "a polygon with a coordinate that is not a finite number: nan (a float)",
               "a polygon with a coordinate that is not a finite number: null",
               "an RLE whose size is not two integers: '16x20'", "an RLE whose size is not two integers: [16.0, 20]",
               "an RLE whose counts are neither a string nor a list of non-negative integers: 5 (an int)",
               "an RLE whose counts are neither a string nor a list of non-negative integers: [3, 'a', 4] (a list)",
               "an RLE whose counts are neither a string nor a list of non-negative integers: [3, -2] (a list)"]
    assert_skipped(tmp_path, bad, reasons)


def test_annotations_with_a_non_finite_area_or_an_iscrowd_other_than_0_or_1_are_skipped_named_and_counted(tmp_path):
    bad = [a_cat(21, area="64"), a_cat(22, area=None), a_cat(23, area=math.nan), a_cat(24, iscrowd=2),
           a_cat(25, iscrowd="1"), a_cat(26, iscrowd=1.0)]
    reasons = ["an area that is not a finite number: '64' (a str)", "an area that is not a finite number: null",
               "an area that is not a finite number: nan (a float)", "an iscrowd that is not 0 or 1: 2 (an int)",
               "an iscrowd that is not 0 or 1: '1' (a str)", "an iscrowd that is not 0 or 1: 1.0 (a float)"]
    assert_skipped(tmp_path, bad, reasons)


def test_ground_truth_data_is_the_file_with_the_annotations_the_dataset_keeps_crowds_included(tmp_path):
    null_box = a_cat(14, bbox=None)
    default = [annotation(11, 1, 3, [2, 2, 8, 8]), annotation(12, 1, 7, [12, 4, 6, 5], rle_of(blob())),
               annotation(13, 2, 7, [0, 0, 5, 5], rle_of(blob()), iscrowd=1)]
    write_coco(tmp_path, "train", annotations=default + [null_box, annotation(15, 3, 3, [2, 2, 8, 8], [[1, 1, 4, 4]])])
    with pytest.warns(InvalidAnnotationWarning):
        train = coco_split(str(tmp_path), "train")
    data = train.ground_truth_data()
    assert train.ids == [1] and [a["id"] for a in data["annotations"]] == [11, 12, 13]  # the crowd kept
    assert data["images"] == train.coco_data["images"] and data["categories"] == train.coco_data["categories"]
    assert [a["id"] for a in train.coco_data["annotations"]] == [11, 12, 13, 14, 15]  # the file as written


def test_ground_truth_data_reads_polygons_and_missing_fields_as_the_dataset_does(tmp_path):
    # pycocotools reads a polygon list whose first polygon has two points as boxes; COCOeval needs iscrowd and area
    entry = annotation(11, 1, 3, [2, 2, 8, 8], [[0, 0, 1, 1], SQUARE])
    del entry["iscrowd"], entry["area"]
    write_coco(tmp_path, annotations=[entry])
    dataset = coco_split(str(tmp_path), "val")
    kept, = dataset.ground_truth_data()["annotations"]
    assert kept["segmentation"] == [SQUARE] and kept["iscrowd"] == 0 and kept["area"] == 64.0  # the mask's pixels
    target = dataset.target(1)
    assert target["iscrowd"].tolist() == [0] and target["area"].tolist() == [64.0]
    assert "iscrowd" not in dataset.coco_data["annotations"][0]  # the parsed file is left as it was


def test_check_images_lists_missing_corrupt_and_mis_sized_images_with_the_reason_getitem_skips_them_for(tmp_path):
    image_dir, _ = write_coco(tmp_path, sizes=((16, 20),) * 4)
    (tmp_path / "val2017" / "1.png").unlink()
    (tmp_path / "val2017" / "2.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(f"{image_dir}/3.png")
    dataset = coco_split(str(tmp_path), "val")
    bad = dataset.check_images()
    assert [(path, reason.split(":")[0]) for path, reason in bad] == [
        (f"{image_dir}/1.png", "not found"), (f"{image_dir}/2.png", "unreadable"),
        (f"{image_dir}/3.png", "it is 8 x 8 but its annotation file says 20 x 16")]
    assert "UnidentifiedImageError" in bad[1][1]
    with pytest.warns(UnreadableImageWarning, match=f"3.png: {bad[2][1]}"):
        assert dataset[2] is None


def test_check_images_reads_headers_without_decoding_pixels(tmp_path, monkeypatch):
    image_dir, _ = write_coco(tmp_path)
    data = (tmp_path / "val2017" / "1.png").read_bytes()
    (tmp_path / "val2017" / "1.png").write_bytes(data[:len(data) // 2])  # truncated after its header
    def no_decoding(self):
        raise AssertionError("decoded")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert coco_split(str(tmp_path), "val").check_images() == []
