"""The demo's models and commands, and the recipes of the small transfer checks on a CPU: each recipe is defined here
once and read by every command that runs it (demo.py's probe and fine-tuning, benchmarks/segmentation_check.py and
benchmarks/detection_check.py, and main_transfer.py's `check` suite), so that they all run the same flags on the same
data. Commands run from the repository's root."""
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from util.demo_seg_data import SEG_CLASS_NAMES

__all__ = ["ROOT", "DATA_DIR", "PRETRAIN_MODEL", "CLASSIFIER", "PRETRAIN_EPOCHS", "DEMO_CHECKPOINT", "shown",
           "common_flags", "pretrain_command", "DemoProbe", "DemoFinetune", "SegmentationCheck", "DetectionCheck"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "data", "fashion_mnist")  # where the demo's ImageFolder goes
PRETRAIN_MODEL = "dmjd_convit_mini_patch8_hog"
CLASSIFIER = "convvit_mini_patch8"  # the classifier built on PRETRAIN_MODEL's encoder
PRETRAIN_EPOCHS = 2
DEMO_CHECKPOINT = os.path.join("output_dir", "demo", "pretrain", "checkpoint-last.pth")  # what `python demo.py` makes


def shown(path: str) -> str:
    """A path relative to the repository when it lies inside it: the printed commands run from there."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def common_flags(num_workers: int, device: str) -> List[str]:
    """The flags of every stage of the demo: 32 px inputs, its workers and device, a line every 50 steps."""
    return ["--input_size", "32", "--num_workers", str(num_workers), "--device", device, "--print_freq", "50"]


def pretrain_command(data: str, output_dir: str, epochs: int, num_workers: int, device: str) -> List[str]:
    """The demo's DMJD pre-training of PRETRAIN_MODEL on the ImageFolder `data`, into `output_dir`."""
    return [shown(sys.executable), "main_pretrain.py", "--model", PRETRAIN_MODEL, "--mask_type", "rand",
            "--batch_size", "128", "--epochs", str(epochs), "--warmup_epochs", "0.2", "--blr", "1.5e-3",
            "--min_crop_scale", "0.6", *common_flags(num_workers, device), "--data_path", shown(data),
            "--output_dir", shown(output_dir)]


def _initialised(finetune: Optional[str]) -> List[str]:
    return ["--finetune", shown(finetune)] if finetune else []


@dataclass(frozen=True)
class DemoProbe:
    """The demo's linear probe: LARS at a base lr far above the 90-epoch ImageNet recipe's 0.1, for 2 epochs, on a
    per-class subsample of Fashion-MNIST's training images (`train_images`), tested on all 10,000 test images."""
    epochs: int = 2
    blr: float = 10.0
    train_images: int = 20000
    num_workers: int = 2
    device: str = "auto"

    def data(self, data_dir: str = DATA_DIR) -> str:
        """The subsample's ImageFolder, beside the demo's full one."""
        return data_dir + f"_probe{self.train_images}"

    def prepare(self, root: str, sources: Optional[Sequence[str]] = None) -> str:
        from util.demo_data import prepare_fashion_mnist
        return prepare_fashion_mnist(root, sources, max_train=self.train_images, verbose=True)

    def command(self, data: str, output_dir: str, finetune: Optional[str] = None) -> List[str]:
        """main_linprobe.py of the encoder of `finetune` (None: a randomly initialised one)."""
        return [shown(sys.executable), "main_linprobe.py", "--model", CLASSIFIER, "--nb_classes", "10",
                "--batch_size", "256", "--epochs", str(self.epochs), "--warmup_epochs", "0", "--blr", str(self.blr),
                "--min_crop_scale", "0.6", *common_flags(self.num_workers, self.device), "--data_path", shown(data),
                *_initialised(finetune), "--output_dir", shown(output_dir)]


@dataclass(frozen=True)
class DemoFinetune:
    """The fine-tuning that the demo suggests as its third next step (FINETUNE.md's first run): 3 epochs on the
    probe's subsample, the released RandAugment without mixup, cutmix or random erasing, a base lr for so short a
    run."""
    num_workers: int = 2
    device: str = "auto"

    def command(self, data: str, output_dir: str, finetune: str) -> List[str]:
        return [shown(sys.executable), "main_finetune.py", "--model", CLASSIFIER, "--finetune", shown(finetune),
                "--nb_classes", "10", "--batch_size", "128", "--epochs", "3", "--warmup_epochs", "0.2",
                "--blr", "5e-3", "--layer_decay", "0.75", "--drop_path", "0.0", "--aa", "rand-m9-mstd0.5-inc1",
                "--mixup", "0", "--cutmix", "0", "--reprob", "0", *common_flags(self.num_workers, self.device),
                "--data_path", shown(data), "--output_dir", shown(output_dir)]


@dataclass(frozen=True)
class SegmentationCheck:
    """benchmarks/segmentation_check.py's recipe (SEGMENT.md): UperNet on the 64 px Fashion-MNIST canvases of
    util/demo_seg_data.py, whole-image evaluation once at the end, ten times the ADE20K recipe's base lr for a short
    run, a decoder sized for 11 classes at 64 px."""
    iters: int = 400
    batch_size: int = 16
    warmup_iters: int = 40
    blr: float = 1.6e-2
    decoder_channels: int = 64
    aux_channels: int = 32
    num_workers: int = 1  # on 2 cores more than 1 slows the step down
    device: str = "auto"
    seed: int = 0
    num_train: int = 2000
    num_val: int = 500
    data: str = os.path.join("data", "fashion_mnist_seg")

    def prepare(self, root: str, sources: Optional[Sequence[str]] = None) -> str:
        """The canvases (their own fixed seed: `seed` seeds the runs, not the data)."""
        from util.demo_seg_data import prepare_fashion_mnist_seg
        return prepare_fashion_mnist_seg(root, sources, self.num_train, self.num_val, verbose=True)

    def command(self, data: str, output_dir: str, finetune: Optional[str] = None) -> List[str]:
        """main_segment.py at the canvas size (one 64 px window: whole-image evaluation), evaluated once at the
        end."""
        return [shown(sys.executable), "main_segment.py", "--model", CLASSIFIER, "--input_size", "64",
                "--nb_classes", str(len(SEG_CLASS_NAMES)), "--img_scale", "64", "64", "--eval_mode", "whole",
                "--batch_size", str(self.batch_size), "--iters", str(self.iters), "--eval_interval", str(self.iters),
                "--warmup_iters", str(self.warmup_iters), "--blr", str(self.blr),
                "--decoder_channels", str(self.decoder_channels), "--aux_channels", str(self.aux_channels),
                "--num_workers", str(self.num_workers), "--device", self.device, "--seed", str(self.seed),
                "--print_freq", "50", "--data_path", shown(data), "--output_dir", shown(output_dir),
                *_initialised(finetune)]


@dataclass(frozen=True)
class DetectionCheck:
    """benchmarks/detection_check.py's recipe (DETECT.md): Mask R-CNN on the canvases of util/demo_det_data.py,
    evaluated once at the end, ten times the COCO recipe's base lr, a jitter range that keeps 64 px canvases' items
    visible, narrow FPN and heads; the encoder's stage 3 attends globally (an 8 x 8 grid at 64 px needs no
    windows)."""
    iters: int = 200
    batch_size: int = 16
    blr: float = 6.4e-3
    scale_range: Tuple[float, float] = (0.5, 2.0)
    fpn_channels: int = 64
    rois_per_image: int = 64
    num_workers: int = 1
    device: str = "auto"
    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    data: str = os.path.join("data", "fashion_mnist_det_200")

    def prepare(self, root: str, sources: Optional[Sequence[str]] = None) -> str:
        from util.demo_det_data import prepare_fashion_mnist_det
        return prepare_fashion_mnist_det(root, sources, self.num_train, self.num_val, verbose=True)

    def command(self, data: str, output_dir: str, finetune: Optional[str] = None) -> List[str]:
        return [shown(sys.executable), "main_detect.py", "--model", CLASSIFIER, "--input_size", "64",
                "--batch_size", str(self.batch_size), "--iters", str(self.iters), "--eval_interval", str(self.iters),
                "--blr", str(self.blr), "--scale_range", *map(str, self.scale_range), "--window_size", "0",
                "--global_blocks", "--fpn_channels", str(self.fpn_channels),
                "--rois_per_image", str(self.rois_per_image), "--num_workers", str(self.num_workers),
                "--device", self.device, "--seed", str(self.seed), "--print_freq", "50", "--data_path", shown(data),
                "--output_dir", shown(output_dir), *_initialised(finetune)]
