"""What the library knows about each dataset: TFDS name, splits, classes, image size, normalization."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Tuple

# A class-balanced CIFAR-10 subset shipped with the library (4,000 train / 1,000 test images; built by
# scripts/make_cifar10_mini.py): `--config.dataset=cifar10 --config.data_dir=<this>` works offline.
EMBEDDED_DATA_DIR = str(pathlib.Path(__file__).resolve().parent / "embedded")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  tfds_name: str
  pretrain_split: str       # split read for self-supervised pre-training (labels not needed)
  train_split: str          # labelled split for probes / kNN memory
  test_split: str
  num_classes: int
  image_size: int           # natural side of the stored images (crop size of the default views)
  eval_crop_proportion: float  # evaluation centre crop (SimCLR: 0.875 on ImageNet, whole image on CIFAR)
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  prepare_hint: Optional[str] = None


DATASETS = {
    "cifar10": DatasetInfo("cifar10", "train", "train", "test", 10, 32, 1.0,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", "train", "train", "test", 100, 32, 1.0,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DatasetInfo("stl10", "train+unlabelled", "train", "test", 10, 96, 1.0,
                         (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet2012": DatasetInfo(
        "imagenet2012", "train", "train", "validation", 1000, 224, 0.875, IMAGENET_MEAN, IMAGENET_STD,
        prepare_hint="ImageNet needs the manual download: put ILSVRC2012_img_{train,val}.tar in "
                     "DATA_DIR/downloads/manual, then run tfds.builder('imagenet2012', data_dir=DATA_DIR)"
                     ".download_and_prepare()"),
}


def get(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


def of(cfg) -> DatasetInfo:
  """The DatasetInfo of cfg.dataset; for dataset=folder read off the folder (folder.py)."""
  if cfg.dataset == "folder":
    from ssl_jax.data import folder
    return folder.info(cfg)
  return get(cfg.dataset)
