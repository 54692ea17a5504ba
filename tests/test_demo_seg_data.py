"""The Fashion-MNIST segmentation dataset: ADE20K layout and labels, determinism, reuse, CLI (synthetic idx files)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import folder_digest
from util.demo_seg_data import (FOREGROUND_THRESHOLD, SEG_CLASS_NAMES, main, make_canvas,
                                prepare_fashion_mnist_seg)
from util.seg_datasets import SegEvalTransform, SegmentationFolder, class_names


def write_idx(path, array):
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes())


def items(n):
    """Items with ink inside a square: 200 in the middle, a faint rim of 10 (below the threshold), 0 around."""
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, 6:22, 6:22] = 10
    x[:, 8:20, 8:20] = 200
    return x


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for stem, n in (("train", 30), ("t10k", 20)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", items(n))
        write_idx(folder / f"{stem}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return str(folder)


def prepare(root, source, **kwargs):
    return prepare_fashion_mnist_seg(str(root), [source], num_train=kwargs.pop("num_train", 12),
                                     num_val=kwargs.pop("num_val", 6), download_dir=None, **kwargs)


def test_dataset_is_written_in_ade20k_layout_and_loads_with_reduce_zero_label(tmp_path, source):
    root = prepare(tmp_path / "seg", source)
    assert sorted(os.listdir(os.path.join(root, "images", "training")))[:2] == ["00.jpg", "01.jpg"]
    assert len(os.listdir(os.path.join(root, "annotations", "validation"))) == 6
    assert class_names(root, 11) == list(SEG_CLASS_NAMES) and SEG_CLASS_NAMES[0] == "background"
    dataset = SegmentationFolder(root, "training", num_classes=11, transform=SegEvalTransform((256, 64)))
    values = set()
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 64, 64)
        values |= set(label.unique().tolist())
    assert values <= set(range(11)) | {255} and {0, 255} < values  # background, ignore and some items


def test_labels_follow_the_visible_item_and_its_threshold():
    pool = items(2)
    rng = np.random.default_rng(0)
    image, annotation = make_canvas(pool, np.array([3, 7]), rng, canvas=40, min_items=3, max_items=3,
                                    scale_range=(1.0, 1.0))
    assert set(np.unique(annotation)) <= {0, 1, 5, 9}
    np.testing.assert_array_equal(annotation == 1, image == 0)  # background exactly where no item has ink
    np.testing.assert_array_equal(annotation >= 2, image >= FOREGROUND_THRESHOLD)  # the rim (10) is ignored (0)
    np.testing.assert_array_equal(annotation == 0, (image > 0) & (image < FOREGROUND_THRESHOLD))


def test_a_later_item_hides_an_earlier_one():
    pool = np.zeros((2, 28, 28), np.uint8)
    pool[0] = 200  # ink everywhere
    pool[1, 10:18, 10:18] = 120  # ink in the middle only
    # Generator stubs with fixed draws: two items, item 0 then item 1, both at (0, 0), scale 1.
    draws = iter([2, 0, 1.0, [0, 0], 1, 1.0, [0, 0]])

    class Fixed:
        def integers(self, *args, **kwargs):
            return np.array(next(draws))

        def uniform(self, *args):
            return next(draws)

    image, annotation = make_canvas(pool, np.array([4, 6]), Fixed(), canvas=28, min_items=2, max_items=2)
    assert (image[10:18, 10:18] == 120).all() and (annotation[10:18, 10:18] == 8).all()  # item 1 on top
    assert image[0, 0] == 200 and annotation[0, 0] == 6  # its black surround is transparent


def test_preparation_is_deterministic_reused_and_refuses_other_options(tmp_path, source):
    a = prepare(tmp_path / "a", source, seed=3)
    b = prepare(tmp_path / "b", source, seed=3)
    assert folder_digest(a) == folder_digest(b)
    assert folder_digest(prepare(tmp_path / "c", source, seed=4)) != folder_digest(a)
    stamp = os.stat(os.path.join(a, "images", "training", "00.jpg")).st_mtime_ns
    assert prepare(tmp_path / "a", source, seed=3) == a  # reused as it is
    assert os.stat(os.path.join(a, "images", "training", "00.jpg")).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="was prepared with"):
        prepare(tmp_path / "a", source, seed=3, num_train=13)
    # The validation images do not depend on the number of training images.
    d = prepare(tmp_path / "d", source, seed=3, num_train=5)
    assert folder_digest(os.path.join(d, "images", "validation")) == folder_digest(os.path.join(a, "images", "validation"))


def test_an_interrupted_preparation_is_redone_and_a_foreign_folder_refused(tmp_path, source):
    partial = tmp_path / "seg.partial"
    partial.mkdir()
    (partial / "junk").write_text("left over")
    root = prepare(tmp_path / "seg", source)
    assert not partial.exists() and json.load(open(os.path.join(root, ".prepared.json")))["num_train"] == 12
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="no finished preparation"):
        prepare(tmp_path / "other", source)


def test_bad_options_are_named(tmp_path, source):
    with pytest.raises(ValueError, match="max_items"):
        prepare(tmp_path / "x", source, min_items=3, max_items=2)
    with pytest.raises(ValueError, match="num_val"):
        prepare(tmp_path / "x", source, num_val=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_fashion_mnist_seg(str(tmp_path / "x"), [str(tmp_path)], download_dir=None)


def test_command_line(tmp_path, source, capsys):
    main(["--root", str(tmp_path / "cli"), "--source", source, "--no_download", "--num_train", "4", "--num_val",
          "3", "--canvas", "48"])
    assert "4 training, 3 validation images, 11 classes" in capsys.readouterr().out
    with Image.open(tmp_path / "cli" / "annotations" / "training" / "0.png") as annotation:
        assert annotation.mode == "L" and annotation.size == (48, 48)
    with pytest.raises(SystemExit, match="error: .*not found"):
        main(["--root", str(tmp_path / "cli2"), "--source", str(tmp_path), "--no_download"])
