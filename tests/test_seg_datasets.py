"""Segmentation folders in ADE20K's layout (pairing, layout errors, bad pairs, labels) and the recipe's transforms."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from util.datasets import UnreadableImageWarning, skip_bad_collate
from util.seg_datasets import (ADE20K_CLASSES, PIXEL_MEAN, PIXEL_STD, AnnotationFormatError, SegEvalTransform,
                               SegmentationFolder, SegTrainTransform, _hsv_to_rgb, _resize_pair, _rgb_to_hsv,
                               check_labels, class_names, photometric_distortion, random_crop, rescale_size)


def write_pair(root, split, name, image, label, image_ext=".jpg"):
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / (name + image_ext))
    Image.fromarray(label.astype(np.uint8), "L").save(root / "annotations" / split / (name + ".png"))


def keep(image, label):
    """A transform that returns what it gets."""
    return image, label


@pytest.fixture
def seg_root(tmp_path):
    """Three 12 x 16 pairs with ADE20K-style labels 0..3 (0 = other)."""
    root = tmp_path / "seg"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        write_pair(root, "training", name, rng.integers(0, 256, (12, 16, 3), dtype=np.uint8),
                   rng.integers(0, 4, (12, 16)), ".png" if name == "c" else ".jpg")
    return root


def test_pairs_are_matched_by_name_and_labels_reduced(seg_root):
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)
    assert [(p.split("/")[-1], q.split("/")[-1]) for p, q in dataset.samples] == \
        [("a.jpg", "a.png"), ("b.jpg", "b.png"), ("c.png", "c.png")]
    raw = np.asarray(Image.open(seg_root / "annotations" / "training" / "b.png")).astype(np.int64)
    image, label = dataset[1]
    assert image.mode == "RGB" and image.size == (16, 12)
    np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw - 1))  # 0 -> ignore, k -> k - 1
    unreduced = SegmentationFolder(str(seg_root), "training", num_classes=4, transform=keep, reduce_zero_label=False)
    np.testing.assert_array_equal(unreduced[1][1], raw)


def test_reduce_zero_label_keeps_255_ignored(seg_root):
    label = np.array([[0, 1, 2], [3, 255, 1]])
    write_pair(seg_root, "training", "d", np.zeros((2, 3, 3), np.uint8), label, ".png")
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)
    assert dataset[3][1].tolist() == [[255, 0, 1], [2, 255, 0]]


def test_another_ignore_index_is_the_one_reduced_to_padded_with_and_checked(seg_root):
    label = np.array([[0, 1, 2], [3, 9, 1]])
    write_pair(seg_root, "training", "d", np.zeros((2, 3, 3), np.uint8), label, ".png")
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep, ignore_index=9)
    assert dataset[3][1].tolist() == [[9, 0, 1], [2, 9, 0]]
    _, y = SegTrainTransform((4, 5), scale=(3, 2), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False,
                             ignore_index=9)(*dataset.load_pair(3))
    assert (y[2:] == 9).all() and (y[:, 3:] == 9).all()  # padding
    with pytest.raises(ValueError, match=r"\[1, 9\] \(9 is the ignore index\)"):
        SegmentationFolder(str(seg_root), "training", num_classes=10, transform=keep, ignore_index=9)


def test_a_wrong_layout_fails_naming_the_missing_folder(seg_root):
    with pytest.raises(FileNotFoundError, match=str(seg_root / "images" / "validation")):
        SegmentationFolder(str(seg_root), "validation", num_classes=3, transform=keep)
    (seg_root / "annotations" / "training").rename(seg_root / "annotations" / "train")
    with pytest.raises(FileNotFoundError, match=str(seg_root / "annotations" / "training")):
        SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)


def test_images_and_annotations_without_a_partner_fail_naming_them(seg_root):
    (seg_root / "annotations" / "training" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images in .* no counterpart .*: b"):
        SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)
    (seg_root / "images" / "training" / "b.jpg").unlink()
    Image.new("L", (4, 4)).save(seg_root / "annotations" / "training" / "z.png")
    with pytest.raises(FileNotFoundError, match=r"1 annotations in .* no counterpart .*: z"):
        SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)


def test_unreadable_and_mismatched_pairs_are_skipped_named_and_counted(seg_root):
    write_pair(seg_root, "training", "d", np.zeros((12, 16, 3), np.uint8), np.ones((10, 16)))  # sizes differ
    (seg_root / "images" / "training" / "a.jpg").write_bytes(b"not a jpeg")
    truncated = (seg_root / "annotations" / "training" / "b.png").read_bytes()[:60]
    (seg_root / "annotations" / "training" / "b.png").write_bytes(truncated)
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=SegEvalTransform((32, 12)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=skip_bad_collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ((images, labels, num_bad),) = list(loader)
    assert num_bad == 3 and images.shape == (1, 3, 12, 16) and labels.shape == (1, 12, 16)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert any(f"unreadable image {seg_root / 'images' / 'training' / 'a.jpg'}" in m for m in messages)
    assert any(f"unreadable annotation {seg_root / 'annotations' / 'training' / 'b.png'}" in m for m in messages)
    assert any("mismatched pair" in m and "d.jpg (16 x 12)" in m and "d.png (16 x 10)" in m for m in messages)


def test_labels_beyond_the_classes_are_an_error_naming_the_file(seg_root):
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=2, transform=keep)
    with pytest.raises(ValueError, match=r"a\.png: label 2 is outside the 2 classes"):
        dataset[0]


def test_a_label_out_of_range_names_the_file_the_value_and_the_flags(seg_root):
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=2, transform=keep)
    with pytest.raises(ValueError) as reduced:
        dataset[0]
    assert str(reduced.value) == (f"{seg_root / 'annotations' / 'training' / 'a.png'}: label 2 is outside the 2 "
                                  f"classes (the file's 3, less one by --reduce_zero_label) and is not the ignore "
                                  f"index 255; check --nb_classes 2, --reduce_zero_label and --ignore_index 255")
    unreduced = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep, reduce_zero_label=False,
                                   ignore_index=9)
    with pytest.raises(ValueError, match=r"a\.png: label 3 is outside the 3 classes and is not the ignore index 9; "
                                         r"check --nb_classes 3, --no-reduce_zero_label and --ignore_index 9"):
        unreduced[0]


def test_check_labels_reads_every_annotation_of_a_small_split(seg_root):
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)
    check = check_labels(dataset, full_up_to=3, sample_size=1)
    labels = [np.asarray(Image.open(seg_root / "annotations" / "training" / f"{n}.png")) for n in "abc"]
    assert (check.checked, check.total, check.unreadable) == (3, 3, 0)
    assert check.labelled_pixels == sum(int((label != 0).sum()) for label in labels)  # 0 is ignored once reduced
    assert check.describe() == "all 3 training images"


def test_check_labels_reads_a_fixed_sample_of_a_larger_split(seg_root, monkeypatch):
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)
    read = []
    monkeypatch.setattr("util.seg_datasets.load_label", lambda path: read.append(path) or np.zeros((2, 2), np.int64))
    check = check_labels(dataset, full_up_to=2, sample_size=2)
    assert check.describe() == "a sample of 2 of 3 training images" and len(set(read)) == 2
    check_labels(dataset, full_up_to=2, sample_size=2)
    assert read[2:] == read[:2]  # the same sample at every start (and on every process)


def test_check_labels_finds_a_label_out_of_range_and_counts_unreadable_annotations(seg_root):
    (seg_root / "annotations" / "training" / "b.png").write_bytes(b"\x89PNG not really")
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)
    with pytest.warns(UnreadableImageWarning, match="b.png"):
        assert check_labels(dataset, full_up_to=3, sample_size=3).unreadable == 1
    small = SegmentationFolder(str(seg_root), "training", num_classes=2, transform=keep)
    with pytest.raises(ValueError, match=r"a\.png: label 2 is outside"):  # a.png is read first
        check_labels(small, full_up_to=3, sample_size=3)


def test_colour_annotations_are_a_format_error(seg_root):
    Image.new("RGB", (16, 12)).save(seg_root / "annotations" / "training" / "a.png")
    dataset = SegmentationFolder(str(seg_root), "training", num_classes=3, transform=keep)
    with pytest.raises(AnnotationFormatError, match="single-channel"):
        dataset[0]


def test_class_names_from_classes_txt_or_ade20k(seg_root):
    assert class_names(str(seg_root), 150) == list(ADE20K_CLASSES) and len(set(ADE20K_CLASSES)) == 150
    assert class_names(str(seg_root), 3) == ["class 0", "class 1", "class 2"]
    (seg_root / "classes.txt").write_text("sky\nroad\ncar\n")
    assert class_names(str(seg_root), 3) == ["sky", "road", "car"]
    with pytest.raises(ValueError, match="names 3 classes"):
        class_names(str(seg_root), 4)


def test_rescale_size_follows_mmcvs_keep_ratio_rule():
    assert rescale_size((512, 683), (2048, 512)) == (512, 683)
    assert rescale_size((300, 400), (2048, 512)) == (512, 683)  # short side to 512: 400 x 1.7067 = 682.67
    assert rescale_size((100, 1000), (2048, 512)) == (205, 2048)  # the long side binds
    assert rescale_size((600, 800), (1024, 256)) == (256, 341)


# -- transforms -------------------------------------------------------------------------------------------------------
def block_pattern(h, w, block, seed=0):
    """An image whose blocks have random distinct colours, and the label map of block ids: (uint8, int64)."""
    rng = np.random.default_rng(seed)
    rows, cols = -(-h // block), -(-w // block)
    ids = rng.permutation(rows * cols)
    colours = rng.choice(256 ** 3, size=rows * cols, replace=False)
    palette = np.stack([colours // 65536, colours // 256 % 256, colours % 256], axis=1).astype(np.uint8)
    block_id = ids.reshape(rows, cols).repeat(block, 0).repeat(block, 1)[:h, :w]
    return palette[block_id], block_id, palette


def decode(x, palette):
    """Normalised [3, H, W] -> the id of the nearest block colour per pixel."""
    rgb = x.permute(1, 2, 0).numpy() * np.array(PIXEL_STD) + np.array(PIXEL_MEAN)
    distance = ((rgb[:, :, None, :] - palette[None, None].astype(np.float64)) ** 2).sum(-1)
    return distance.argmin(-1)


def uniform_neighbourhood(label):
    """Pixels whose 3 x 3 neighbourhood holds one label (away from block borders and the padding)."""
    padded = np.pad(label, 1, mode="edge")
    shifts = [padded[1 + dy:1 + dy + label.shape[0], 1 + dx:1 + dx + label.shape[1]]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.all([s == label for s in shifts], axis=0) & (label != 255)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_train_transform_keeps_image_and_label_aligned(seed, flip_prob):
    image, label, palette = block_pattern(48, 72, 12, seed)
    transform = SegTrainTransform(crop_size=(40, 40), scale=(96, 48), ratio_range=(0.5, 2.0), cat_max_ratio=1.0,
                                  flip_prob=flip_prob, photometric=False)
    np.random.seed(seed)
    x, y = transform(Image.fromarray(image), label)
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and y.shape == (40, 40) and y.dtype == torch.int64
    inside = uniform_neighbourhood(y.numpy())  # block borders are blurred by the bilinear resize
    assert inside.mean() > 0.3 and (decode(x, palette)[inside] == y.numpy()[inside]).all()
    padded = y == 255  # padding: label 255 and image 0 (the mean colour after normalisation)
    assert (x[:, padded] == 0).all()


def test_labels_are_resized_by_nearest_pixel_centre():
    label = np.arange(16).reshape(4, 4)
    _, half = _resize_pair(Image.new("RGB", (4, 4)), label, (2, 2))
    assert half.tolist() == [[5, 7], [13, 15]]  # centres 0.5 + 2i map to 1 and 3 (not 0 and 2)
    _, double = _resize_pair(Image.new("RGB", (4, 4)), label, (8, 8))
    np.testing.assert_array_equal(double, label.repeat(2, 0).repeat(2, 1))


def test_train_transform_pads_small_images_with_ignore():
    np.random.seed(0)
    image, label, _ = block_pattern(20, 30, 5)
    x, y = SegTrainTransform(crop_size=(64, 64), scale=(30, 20), ratio_range=(1.0, 1.0))(Image.fromarray(image),
                                                                                        label)
    assert x.shape == (3, 64, 64) and (y[20:] == 255).all() and (y[:, 30:] == 255).all() and (y[:20, :30] != 255).all()
    assert (x[:, 20:] == 0).all()


def test_transforms_are_reproducible_from_numpys_global_seed():
    image, label, _ = block_pattern(48, 64, 8)
    transform = SegTrainTransform(crop_size=(32, 32), scale=(64, 48))
    outputs = []
    for seed in (3, 3, 4):
        np.random.seed(seed)
        outputs.append(transform(Image.fromarray(image), label))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert not torch.equal(outputs[0][0], outputs[2][0])


def test_random_crop_with_cat_max_ratio_prefers_crops_with_several_classes():
    label = np.zeros((100, 100), np.int64)
    label[:, 90:] = 1  # a thin strip of class 1
    image = np.zeros((100, 100, 3), np.uint8)

    def share_of_good_crops(ratio):
        good = 0
        for seed in range(200):
            np.random.seed(seed)
            _, crop = random_crop(image, label, (20, 20), cat_max_ratio=ratio)
            counts = np.bincount(crop.ravel(), minlength=2)
            good += counts.max() / counts.sum() < 0.75
        return good / 200

    assert share_of_good_crops(1.0) < 0.15 < 0.3 < share_of_good_crops(0.75)
    np.random.seed(0)  # one class only: no crop can pass, the draw after the last try is kept
    crop_image, crop = random_crop(image, np.zeros((100, 100), np.int64), (20, 30), cat_max_ratio=0.75)
    assert crop_image.shape == (20, 30, 3) and crop.shape == (20, 30)


def test_hsv_round_trip_and_hue_rotation():
    rgb = np.random.default_rng(0).integers(0, 256, (50, 3)).astype(np.float64)
    np.testing.assert_allclose(_hsv_to_rgb(_rgb_to_hsv(rgb)), rgb, atol=1e-9)
    red = _rgb_to_hsv(np.array([255.0, 0, 0]))
    np.testing.assert_allclose(_hsv_to_rgb(red + [120, 0, 0]), [0, 255, 0], atol=1e-9)


def test_photometric_distortion_stays_in_mmsegs_ranges():
    grey = np.full((8, 8, 3), 100, np.uint8)
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    changed = 0
    for seed in range(30):
        np.random.seed(seed)
        out = photometric_distortion(grey)
        # saturation and hue leave grey grey; brightness +-32 then contrast x [0.5, 1.5] (either order)
        assert out.dtype == np.uint8 and (out == out[0, 0, 0]).all() and 34 <= out[0, 0, 0] <= 198
        np.random.seed(seed)
        changed += not np.array_equal(photometric_distortion(image), image)
    assert changed > 20  # each of four steps runs with probability 1/2


def test_eval_transform_resizes_the_image_and_keeps_the_original_label():
    image, label, _ = block_pattern(30, 40, 10)
    x, y = SegEvalTransform(scale=(200, 60))(Image.fromarray(image), label)
    assert x.shape == (3, 60, 80) and torch.equal(y, torch.from_numpy(label))
