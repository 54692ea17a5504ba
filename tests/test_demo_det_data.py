"""The Fashion-MNIST detection set: COCO 2017's layout read by util.coco, masks equal to the visible items (the
segmentation set's canvases), tight boxes, determinism, reuse, CLI (synthetic idx files)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import folder_digest, write_fashion_idx
from util.coco import annotation_mask, coco_split, detection_collate
from training.distributed import gather_shards
from util.det_metrics import coco_evaluate, coco_records
from util.det_transforms import DetEvalTransform, DetTrainTransform
from util.demo_data import CLASS_NAMES
from util.demo_det_data import instance_masks, main, prepare_fashion_mnist_det
from util.demo_seg_data import BACKGROUND_LABEL, Placement, prepare_fashion_mnist_seg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(write_fashion_idx(tmp_path_factory.mktemp("idx") / "src"))


def prepare(root, source, **kwargs):
    return prepare_fashion_mnist_det(str(root), [source], num_train=kwargs.pop("num_train", 8),
                                     num_val=kwargs.pop("num_val", 4), download_dir=None, **kwargs)


def test_the_set_is_in_coco_layout_and_the_dataset_class_reads_it(tmp_path, source):
    root = prepare(tmp_path / "det", source)
    assert sorted(os.listdir(os.path.join(root, "train2017")))[:2] == ["0.jpg", "1.jpg"]
    assert len(os.listdir(os.path.join(root, "val2017"))) == 4
    train = coco_split(root, "train")
    assert train.class_names == list(CLASS_NAMES) and train.category_ids == list(range(1, 11))
    assert not train.invalid_annotations
    image, target = train[0]
    assert image.size == (64, 64) and target["masks"].shape[1:] == (64, 64)
    assert 1 <= target["labels"].min() and target["labels"].max() <= 10
    assert len(coco_split(root, "val")) == 4


def test_masks_are_the_visible_items_of_the_segmentation_sets_canvases_and_boxes_are_tight(tmp_path, source):
    det = prepare(tmp_path / "det", source, seed=5)
    seg = prepare_fashion_mnist_seg(str(tmp_path / "seg"), [source], num_train=8, num_val=4, seed=5,
                                    download_dir=None)
    with open(os.path.join(det, "annotations", "instances_train2017.json")) as f:
        data = json.load(f)
    dataset = coco_split(det, "train", train=False)
    for index, info in enumerate(data["images"]):
        with open(os.path.join(det, "train2017", info["file_name"]), "rb") as f:
            with open(os.path.join(seg, "images", "training", info["file_name"]), "rb") as g:
                assert f.read() == g.read()  # the same canvas
        label = np.asarray(Image.open(os.path.join(seg, "annotations", "training", f"{index}.png")))
        target = dataset.target(info["id"])
        masks = target["masks"].numpy().astype(bool)
        painted = np.full(label.shape, BACKGROUND_LABEL)
        for mask, category in zip(masks, target["labels"].tolist()):
            assert (painted[mask] == BACKGROUND_LABEL).all()  # instances do not overlap
            painted[mask] = 1 + category  # the segmentation set's label of the class
        visible = label >= 2  # items above the threshold; 0 (the faint rims) and 1 (background) are no instance
        np.testing.assert_array_equal(painted[visible], label[visible])
        np.testing.assert_array_equal(painted >= 2, visible)
    for annotation in data["annotations"]:
        mask = annotation_mask(annotation["segmentation"], 64, 64)
        ys, xs = np.nonzero(mask)
        x, y, w, h = annotation["bbox"]
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert annotation["area"] == mask.sum() and annotation["iscrowd"] == 0


def masks_in_boxes(masks, boxes, cells=512):
    """Mask R-CNN's mask output that pastes back into `masks` [N, H, W]: each mask sampled (nearest) at the centres of
    `cells` x `cells` cells spanning its box, fine enough (a cell under an eighth of a pixel) that the paste's
    bilinear sampling at pixel centres only meets cells of the pixel's own value."""
    out = []
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):
        centres = (torch.arange(cells) + 0.5) / cells
        xs = (x0 + centres * (x1 - x0)).floor().long().clamp(0, mask.shape[1] - 1)
        ys = (y0 + centres * (y1 - y0)).floor().long().clamp(0, mask.shape[0] - 1)
        out.append(mask[ys][:, xs].float())
    return torch.stack(out)[:, None] if out else torch.zeros(0, 1, cells, cells)


def test_the_set_trains_and_evaluates_through_the_detection_data_layer(tmp_path, source):
    root = prepare(tmp_path / "det", source)
    train = coco_split(root, "train", transform=DetTrainTransform(48))
    torch.manual_seed(0)
    images, targets, num_bad = detection_collate([train[i] for i in range(3)])
    assert num_bad == 0 and [tuple(image.shape) for image in images] == [(3, 48, 48)] * 3
    assert all(t["boxes"].shape == (len(t["labels"]), 4) for t in targets)
    # Perfect outputs at the evaluation size, the ground truth itself, score 100 through records and COCOeval.
    val = coco_split(root, "val", transform=DetEvalTransform(64))
    records, image_ids = [], []
    for index in range(len(val)):
        _, target = val[index]
        output = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"])),
                  "masks": masks_in_boxes(target["masks"], target["boxes"])}
        records += coco_records([output], [target], val.category_ids)
        image_ids.append(target["image_id"])
    records, image_ids = gather_shards(records, image_ids)
    scores = coco_evaluate(val.ground_truth_data(), records, image_ids=image_ids)
    assert scores["bbox"]["AP"] == pytest.approx(100) and scores["segm"]["AP"] == pytest.approx(100)


def test_an_item_hidden_by_later_ones_is_no_instance():
    ink = np.full((10, 10), 200, np.uint8)
    placements = [Placement(3, 0, 0, ink), Placement(4, 0, 0, ink), Placement(5, 5, 5, ink[:4, :4])]
    instances = instance_masks(placements, 12)
    assert [label for label, _ in instances] == [4, 5]
    assert instances[0][1].sum() == 100 - 16 and instances[1][1][5:9, 5:9].all()


def test_preparation_is_deterministic_reused_and_refuses_other_options(tmp_path, source):
    a = prepare(tmp_path / "a", source, seed=3)
    assert folder_digest(prepare(tmp_path / "b", source, seed=3)) == folder_digest(a)
    assert folder_digest(prepare(tmp_path / "c", source, seed=4)) != folder_digest(a)
    stamp = os.stat(os.path.join(a, "annotations", "instances_train2017.json")).st_mtime_ns
    assert prepare(tmp_path / "a", source, seed=3) == a
    assert os.stat(os.path.join(a, "annotations", "instances_train2017.json")).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="was prepared with"):
        prepare(tmp_path / "a", source, seed=3, num_train=9)
    with pytest.raises(ValueError, match="max_items"):
        prepare(tmp_path / "x", source, min_items=3, max_items=2)


def test_command_line(tmp_path, source, capsys):
    main(["--root", str(tmp_path / "cli"), "--source", source, "--no_download", "--num_train", "3", "--num_val",
          "2", "--canvas", "48"])
    assert "3 training, 2 validation images, 10 classes" in capsys.readouterr().out
    with Image.open(tmp_path / "cli" / "val2017" / "0.jpg") as image:
        assert image.size == (48, 48)
    with pytest.raises(SystemExit, match="error: .*not found"):
        main(["--root", str(tmp_path / "cli2"), "--source", str(tmp_path), "--no_download"])
