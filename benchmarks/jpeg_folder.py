"""An ImageNet-like ImageFolder of JPEG photographs, for timing the input pipeline where ImageNet is not at hand.

Decoding cost depends on the pixel count and on how much detail the JPEG codes, so random noise or flat colours
would mislead. Each image here is a random crop of one of scikit-image's bundled photographs, resized to a size
ImageNet commonly has (500 x 375, 375 x 500, 500 x 333, ...), colour-jittered, given a little sensor noise and saved at quality 95:

    python benchmarks/jpeg_folder.py /tmp/jpegs --num_images 4000 --workers 16

The script prints the mean pixel count and file size, to compare with ImageNet's train set (about 400 x 350
pixels and 110 KB on average).
"""
import argparse
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "grass", "gravel", "brick", "camera")
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (640, 480), (400, 300), (500, 500))
NUM_CLASSES = 10


def _photos():
    import skimage.data
    photos = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append(Image.fromarray(image[..., :3]))
    return photos


def _write(job):
    root, start, stop, seed = job
    photos = _photos()
    rng = np.random.default_rng(seed)
    total_bytes = total_pixels = 0
    for index in range(start, stop):
        photo = photos[rng.integers(len(photos))]
        w, h = photo.size
        scale = np.sqrt(rng.uniform(0.3, 1.0))
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        size = SIZES[rng.integers(len(SIZES))]
        image = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        gain = rng.uniform(0.7, 1.3, size=3)
        grain = rng.normal(0.0, 5.0, size=(size[1], size[0], 3))  # sensor noise: photographs are not smooth
        image = Image.fromarray(np.clip(np.asarray(image) * gain + grain, 0, 255).astype(np.uint8))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(root, "train", f"class_{index % NUM_CLASSES:02d}", f"{index:07d}.jpg")
        image.save(path, quality=95)
        total_bytes += os.path.getsize(path)
        total_pixels += size[0] * size[1]
    return total_bytes, total_pixels


def make_jpeg_folder(root: str, num_images: int, workers: int = 1, seed: int = 0):
    """Writes `<root>/train/class_XX/NNNNNNN.jpg`; returns (mean bytes per file, mean pixels per image)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    for c in range(min(NUM_CLASSES, num_images)):  # no empty class folder: ImageFolder refuses those
        os.makedirs(os.path.join(root, "train", f"class_{c:02d}"), exist_ok=True)
    workers = max(1, min(workers, num_images))
    bounds = np.linspace(0, num_images, workers + 1).astype(int)
    jobs = [(root, int(a), int(b), seed * 1000 + i) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    if workers == 1:
        parts = [_write(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_write, jobs))
    return sum(p[0] for p in parts) / num_images, sum(p[1] for p in parts) / num_images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ImageNet-like JPEG ImageFolder",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("root", help="folder to create; the images go to root/train/<class>/")
    p.add_argument("--num_images", default=4000, type=int, help="JPEGs to write")
    p.add_argument("--workers", default=os.cpu_count(), type=int, help="processes that write them")
    p.add_argument("--seed", default=0, type=int, help="seeds the pictures")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli = parse_args()
    mean_bytes, mean_pixels = make_jpeg_folder(cli.root, cli.num_images, cli.workers, cli.seed)
    print(f"{cli.num_images} JPEGs in {cli.root}/train: {mean_bytes / 1024:.0f} KB and {mean_pixels / 1e3:.0f} "
          f"kpixels per image on average")
