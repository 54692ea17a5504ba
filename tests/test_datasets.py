"""Bad and unusual image files: converted to RGB, or skipped with a warning naming them and counted; the class
mapping that labels a classification val/ as its train/ is labelled."""
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from helpers import run_script, write_image_folder
from util.datasets import (RobustImageFolder, UnreadableImageWarning, build_pretrain_dataset, classes_without_images,
                           classification_folders, image_folder, load_rgb, skip_bad_collate, to_rgb)

ROOT = Path(__file__).resolve().parents[1]
BAD_FILES = ("empty.jpg", "truncated.png", "truncated.jpg", "notes.JPEG")


def _shape(rng, channels=3):
    img = np.full((72, 80, channels), 30, np.uint8)
    y, x = rng.integers(0, 50, 2)
    img[y:y + 20, x:x + 25] = rng.integers(60, 256, channels)
    return img


def _save_truncated(image, path, fmt):
    full = path.with_suffix(".full")
    image.save(full, fmt)
    data = full.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    full.unlink()


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """16 files: 12 readable in 7 modes, 4 unreadable (zero bytes, truncated PNG and JPEG, text named .JPEG)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    good, odd = root / "train" / "good", root / "train" / "odd"
    good.mkdir(parents=True)
    odd.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(_shape(rng)).save(good / f"{i}.png")
    Image.fromarray(_shape(rng, 1)[..., 0], "L").save(odd / "gray.jpg")
    Image.fromarray(_shape(rng, 2), "LA").save(odd / "gray_alpha.png")
    Image.fromarray(_shape(rng, 4), "RGBA").save(odd / "rgba.png")
    Image.fromarray(_shape(rng)).convert("P").save(odd / "palette.png")
    Image.fromarray(_shape(rng)).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(_shape(rng, 1)[..., 0].astype(np.uint16) * 257).save(odd / "sixteen_bit.png")
    (odd / "empty.jpg").write_bytes(b"")
    _save_truncated(Image.fromarray(_shape(rng)), odd / "truncated.png", "PNG")
    _save_truncated(Image.fromarray(_shape(rng)), odd / "truncated.jpg", "JPEG")
    (odd / "notes.JPEG").write_text("not an image\n")
    return root


def test_modes_convert_to_rgb():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(gray, "L"))), np.stack([gray] * 3, -1))

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0] = (200, 10, 20, 255)  # opaque row keeps its colour
    rgba[1] = (200, 10, 20, 0)  # transparent row shows the white background
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0].tolist() == [[200, 10, 20]] * 2 and out[1].tolist() == [[255, 255, 255]] * 2

    la = Image.fromarray(np.dstack([np.full((2, 2), 90, np.uint8), np.full((2, 2), 255, np.uint8)]), "LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[90, 90, 90]] * 2] * 2

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(palette)).tolist() == [[[0, 0, 0], [10, 200, 30]]]
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 255, 255], [10, 200, 30]]]

    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_is_scaled_not_clipped(mode, tmp_path):
    values = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    image = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32), "I")
    assert image.mode == mode
    out = np.asarray(to_rgb(image))
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert out.min() == 0 and out.max() == 255 and abs(out.mean() - 127.5) < 1  # Pillow's convert would give ~255
    assert np.abs(out[..., 0].astype(int) - values / 257).max() <= 0.5
    # The same through a 16-bit PNG on disk.
    Image.fromarray(values).save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "a.png"))), out)


def test_unreadable_files_give_none_and_a_warning_naming_them(mixed_root):
    dataset = build_pretrain_dataset(str(mixed_root), 64)
    assert isinstance(dataset, datasets.ImageFolder) and dataset.classes == ["good", "odd"]
    assert len(dataset.samples) == len(dataset.targets) == 16 and dataset.class_to_idx == {"good": 0, "odd": 1}
    for index, (path, _) in enumerate(dataset.samples):
        if os.path.basename(path) in BAD_FILES:
            with pytest.warns(UnreadableImageWarning, match=os.path.basename(path)):
                assert dataset[index] is None
        else:
            image, label = dataset[index]
            assert image.dtype == torch.uint8 and image.shape == (3, 64, 64) and label == dataset.targets[index]


def test_skip_bad_collate_drops_and_counts():
    sample = (torch.zeros(3, 4, 4, dtype=torch.uint8), 1)
    images, labels, num_bad = skip_bad_collate([sample, None, sample, None])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [1, 1] and num_bad == 2
    assert skip_bad_collate([None, None]) == (None, None, 2)


def test_empty_folders_fail_clearly(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        image_folder(str(tmp_path), "train", None)
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        image_folder(str(tmp_path), "train", None)
    assert RobustImageFolder.__mro__[1] is datasets.ImageFolder


@pytest.mark.parametrize("workers", [0, 2])
def test_pretraining_skips_and_counts_bad_files(mixed_root, tmp_path, workers):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "main_pretrain.py"), "--model", "dmjd_convit_tiny_patch16_dec1_hog",
           "--input_size", "64", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
           "--num_workers", str(workers), "--device", "cpu", "--print_freq", "1",
           "--data_path", str(mixed_root), "--output_dir", str(out)]
    proc = run_script(cmd)
    for name in BAD_FILES:  # 16 files in batches of 4: every file is drawn once
        assert f"skipping unreadable image {mixed_root / 'train' / 'odd' / name}" in proc.stderr, name
    assert "4 unreadable images skipped" in proc.stdout
    (record,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert record["train_bad_images"] == 4 and record["train_images"] == 12
    assert record["train_steps"] == 4 and np.isfinite(record["train_loss"])


# -- classification: val/ labelled by train/'s classes ----------------------------------------------------------------
def classification_root(root, train_classes, val_classes):
    """train/ with one image of each of `train_classes`, val/ with one of each of `val_classes`."""
    write_image_folder(root, {"train": 1}, classes=train_classes)
    return write_image_folder(root, {"val": 1}, classes=val_classes, seed=1)


def test_a_val_folder_with_fewer_classes_is_labelled_by_the_training_classes(tmp_path):
    root = classification_root(tmp_path, ("bbb", "cat", "coffee"), ("cat", "coffee"))
    train_set, val_set = classification_folders(str(root), None, None, nb_classes=3)
    assert train_set.class_to_idx == {"bbb": 0, "cat": 1, "coffee": 2}
    assert val_set.classes == train_set.classes and val_set.class_to_idx == train_set.class_to_idx
    # val/'s own sorted folders would make cat 0 and coffee 1: scored against bbb's and cat's labels
    assert [(Path(path).parent.name, target) for path, target in val_set.samples] == [("cat", 1), ("coffee", 2)]
    assert val_set[0][1] == 1 and val_set.targets == [1, 2]
    assert classes_without_images(val_set) == ["bbb"] and classes_without_images(train_set) == []


def test_a_val_class_that_training_lacks_fails_naming_both_folders_and_the_class(tmp_path):
    root = classification_root(tmp_path, ("cat", "coffee"), ("cat", "dog"))
    with pytest.raises(ValueError) as failure:
        classification_folders(str(root), None, None, nb_classes=3)
    assert str(failure.value) == (f"{root / 'val'} has a class 'dog' that {root / 'train'} has not: its images would "
                                  f"be scored against another class's label")


def test_val_labelled_by_given_classes_without_training_folder_refuses_an_unknown_one(tmp_path):
    root = write_image_folder(tmp_path, {"val": 1}, classes=("cat", "dog", "emu"))
    with pytest.raises(ValueError, match=r"has classes 'dog', 'emu' that the checkpoint c\.pth has not: their images"):
        classification_folders(str(root), None, None, 3, with_train=False, classes=["bbb", "cat"],
                               classes_of="the checkpoint c.pth")
    _, val_set = classification_folders(str(root), None, None, 4, with_train=False,
                                        classes=["cat", "dog", "emu", "fox"])
    assert val_set.targets == [0, 1, 2] and classes_without_images(val_set) == ["fox"]


def test_a_val_folder_without_images_fails_naming_it(tmp_path):
    root = write_image_folder(tmp_path, {"train": 1}, classes=("cat", "coffee"))
    (root / "val" / "cat").mkdir(parents=True)  # a class folder, but no image in it
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / 'val'} holds no image of any of the 2 classes of "
                                                          f"{root / 'train'}")):
        classification_folders(str(root), None, None, nb_classes=2)
    (root / "val" / "cat").rmdir()  # no class folder at all
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / 'val'} holds no image")):
        classification_folders(str(root), None, None, nb_classes=2)
