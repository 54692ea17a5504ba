"""Fashion-MNIST as an ImageFolder tree: idx reading, preparation, idempotency, errors (synthetic idx files)."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets

from util import demo_data
from util.demo_data import CLASS_NAMES, DEBIAN_DIR, CorruptIdxFile, prepare_fashion_mnist, read_idx

ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def synthetic_split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return images, labels


@pytest.fixture
def source(tmp_path):
    """Four synthetic idx files: the train pair gzipped (as Debian ships them), the test pair plain."""
    folder = tmp_path / "src"
    folder.mkdir()
    train, val = synthetic_split(43, 0), synthetic_split(25, 1)
    write_idx(folder / "train-images-idx3-ubyte", train[0], compress=True)
    write_idx(folder / "train-labels-idx1-ubyte", train[1], compress=True)
    write_idx(folder / "t10k-images-idx3-ubyte", val[0], compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", val[1], compress=False)
    return folder, train, val


def test_read_idx_plain_gzip_and_wider_types(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", a, compress=False)
    write_idx(tmp_path / "b", a, compress=True)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a")), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "b.gz")), a)
    ints = np.array([[-3, 70000]], dtype=">i4")
    (tmp_path / "c").write_bytes(idx_bytes(ints, 0x0C))
    out = read_idx(str(tmp_path / "c"))
    assert out.tolist() == [[-3, 70000]] and out.dtype == np.int32


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"\x01\x02" + d[2:], "not an idx file"),
    (lambda d: d[:-5], "bytes, but its header"),
    (lambda d: d + b"\x00", "bytes, but its header"),
    (lambda d: gzip.compress(d)[:-12], "cannot be read"),
])
def test_corrupt_idx_files_raise_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(damage(idx_bytes(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(CorruptIdxFile, match=message) as info:
        read_idx(str(path))
    assert str(path) in str(info.value)


def test_prepare_writes_an_image_folder_with_exact_pixels(tmp_path, source):
    folder, (train_images, train_labels), (val_images, val_labels) = source
    root = prepare_fashion_mnist(str(tmp_path / "fm"), sources=[str(folder)], download_dir=None)
    for split, images, labels in (("train", train_images, train_labels), ("val", val_images, val_labels)):
        dataset = datasets.ImageFolder(os.path.join(root, split))
        assert sorted(dataset.classes) == sorted(CLASS_NAMES) and len(dataset) == len(images)
        for path, target in dataset.samples:
            index = int(Path(path).stem)
            assert dataset.classes[target] == CLASS_NAMES[labels[index]]
            with Image.open(path) as img:
                assert img.mode == "L" and img.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(img), images[index])
    assert datasets.ImageFolder(os.path.join(root, "train")).classes == \
        datasets.ImageFolder(os.path.join(root, "val")).classes
    assert not os.path.exists(str(tmp_path / "fm") + ".partial")


def test_subsample_evenly_per_class_and_resize(tmp_path, source):
    folder, _, _ = source
    root = prepare_fashion_mnist(str(tmp_path / "fm"), [str(folder)], max_train=23, max_val=10, size=32,
                                 download_dir=None)
    train = datasets.ImageFolder(os.path.join(root, "train"))
    per_class = np.bincount([t for _, t in train.samples], minlength=10)
    assert len(train) == 23 and sorted(per_class.tolist()) == [2] * 7 + [3] * 3
    assert len(datasets.ImageFolder(os.path.join(root, "val"))) == 10
    with Image.open(train.samples[0][0]) as img:
        assert img.size == (32, 32)
    with pytest.raises(ValueError, match="fewer than the 10 classes"):
        prepare_fashion_mnist(str(tmp_path / "fm2"), [str(folder)], max_train=5, download_dir=None)


def test_prepare_is_idempotent_and_refuses_other_options(tmp_path, source, monkeypatch):
    folder, _, _ = source
    root = prepare_fashion_mnist(str(tmp_path / "fm"), [str(folder)], max_train=20, download_dir=None)
    marker = json.loads((Path(root) / demo_data.MARKER).read_text())
    assert marker["counts"] == {"train": 20, "val": 25}

    def fail(*args, **kwargs):
        raise AssertionError("a finished preparation must not be redone")
    monkeypatch.setattr(demo_data, "_write_split", fail)
    assert prepare_fashion_mnist(root, [str(folder)], max_train=20, download_dir=None) == root
    with pytest.raises(ValueError, match="was prepared with"):
        prepare_fashion_mnist(root, [str(folder)], max_train=30, download_dir=None)


def test_interrupted_preparation_is_redone(tmp_path, source, monkeypatch):
    folder, _, _ = source
    root = str(tmp_path / "fm")
    real_write = demo_data._write_split

    def interrupted(split_dir, *args):
        real_write(split_dir, *args)
        if split_dir.endswith("val"):
            raise KeyboardInterrupt  # after every image, before the marker
    monkeypatch.setattr(demo_data, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_fashion_mnist(root, [str(folder)], download_dir=None)
    assert not os.path.exists(root) and os.path.isdir(root + ".partial")

    monkeypatch.setattr(demo_data, "_write_split", real_write)
    (Path(root + ".partial") / "train" / "bag" / "stale.png").write_bytes(b"")
    prepare_fashion_mnist(root, [str(folder)], download_dir=None)
    assert os.path.isfile(os.path.join(root, demo_data.MARKER)) and not os.path.exists(root + ".partial")
    assert not (Path(root) / "train" / "bag" / "stale.png").exists()
    assert len(datasets.ImageFolder(os.path.join(root, "train"))) == 43


def test_folder_without_marker_is_not_reused_or_deleted(tmp_path, source):
    folder, _, _ = source
    root = tmp_path / "fm"
    (root / "train" / "bag").mkdir(parents=True)
    (root / "train" / "bag" / "mine.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="missing"):
        prepare_fashion_mnist(str(root), [str(folder)], download_dir=None)
    assert (root / "train" / "bag" / "mine.png").exists()


def test_labels_that_break_the_class_folders_are_rejected(tmp_path, source):
    folder, (images, labels), _ = source
    write_idx(folder / "train-labels-idx1-ubyte", np.where(labels == 3, 12, labels).astype(np.uint8), True)
    with pytest.raises(CorruptIdxFile, match="label 12 outside"):
        prepare_fashion_mnist(str(tmp_path / "a"), [str(folder)], download_dir=None)
    write_idx(folder / "train-labels-idx1-ubyte", np.where(labels == 3, 4, labels).astype(np.uint8), True)
    with pytest.raises(CorruptIdxFile, match="no image of class.*dress"):
        prepare_fashion_mnist(str(tmp_path / "b"), [str(folder)], download_dir=None)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:-1], True)
    with pytest.raises(CorruptIdxFile, match="43 images but .* 42 labels"):
        prepare_fashion_mnist(str(tmp_path / "c"), [str(folder)], download_dir=None)


def test_missing_files_name_the_package_and_the_download(tmp_path, source, monkeypatch):
    folder, _, _ = source
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(str(tmp_path / "a"), [str(tmp_path / "nothing")], download_dir=None)

    def offline(download_dir):
        raise RuntimeError("Name or service not known")
    monkeypatch.setattr(demo_data, "_download", offline)
    with pytest.raises(FileNotFoundError, match="failed .*Name or service.*allow the download"):
        prepare_fashion_mnist(str(tmp_path / "b"), [str(tmp_path / "nothing")])

    def fetched(download_dir):  # what torchvision leaves: <dir>/FashionMNIST/raw/<idx files>
        raw = Path(download_dir) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in folder.iterdir():
            (raw / f.name).write_bytes(f.read_bytes())
        return str(raw)
    monkeypatch.setattr(demo_data, "_download", fetched)
    root = prepare_fashion_mnist(str(tmp_path / "c"), [str(tmp_path / "nothing")], max_val=10)
    assert os.path.isdir(str(tmp_path / "c") + "_download") and len(datasets.ImageFolder(root + "/val")) == 10


def test_cli(tmp_path, source):
    folder, _, _ = source
    cmd = [sys.executable, "-m", "util.demo_data", "--root", str(tmp_path / "fm"), "--source", str(folder),
           "--max_train", "10", "--max_val", "10", "--no_download"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "10 train, 10 val images in 10 classes" in proc.stdout
    cmd = cmd[:4] + [str(tmp_path / "fm2"), "--source", str(tmp_path), "--no_download"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "apt-get install dataset-fashion-mnist" in proc.stderr


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason=f"{DEBIAN_DIR} not installed (dataset-fashion-mnist)")
def test_real_fashion_mnist_subsample(tmp_path):
    root = prepare_fashion_mnist(str(tmp_path / "fm"), max_train=50, max_val=20, download_dir=None)
    train = datasets.ImageFolder(os.path.join(root, "train"))
    val = datasets.ImageFolder(os.path.join(root, "val"))
    assert len(train) == 50 and len(val) == 20 and train.classes == val.classes == sorted(CLASS_NAMES)
    assert np.bincount([t for _, t in train.samples]).tolist() == [5] * 10
    image, _ = train[0]
    assert image.mode == "RGB" and image.size == (28, 28)
    # the first training image of Fashion-MNIST is an ankle boot (label 9)
    assert (Path(root) / "train" / "ankle_boot" / "00000.png").is_file()
