"""Labelled subsets for the semi-supervised protocol (a fraction of the train split's labels).

* imagenet2012: the 1% and 10% lists published with SimCLR (Chen et al. 2020, google-research/simclr
  `imagenet_subsets/`; 12,811 and 128,116 train file names), shipped gzipped in
  ssl_jax/data/imagenet_subsets/. Every semi-supervised ImageNet table since (SimCLR, BYOL, SwAV, Barlow
  Twins) uses them; a subset is a filter on TFDS's `file_name` feature.
* every other dataset: a class-balanced subset drawn from the seed: round(fraction x n_c) examples of each
  class c (at least one), chosen by a seeded permutation of that class's examples, so the subset depends on
  (dataset, split, fraction, seed) only and is the same on any number of devices or processes.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGENET_SUBSETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "imagenet_subsets"
IMAGENET_FRACTIONS = {0.01: "1percent.txt.gz", 0.1: "10percent.txt.gz"}


class SubsetError(ValueError):
  """A label fraction that cannot be drawn; the message is one line."""


def imagenet_file_names(fraction: float) -> list:
  """The SimCLR list of ImageNet train file names for `fraction` (0.01 or 0.1)."""
  if fraction not in IMAGENET_FRACTIONS:
    raise SubsetError(f"ImageNet label fractions are those published with SimCLR "
                      f"({', '.join(str(f) for f in IMAGENET_FRACTIONS)}), got {fraction}")
  with gzip.open(IMAGENET_SUBSETS_DIR / IMAGENET_FRACTIONS[fraction], "rt") as f:
    return [line.strip() for line in f if line.strip()]


def train_labels(builder, split: str) -> np.ndarray:
  """The labels of `split` in split order, read without decoding the images."""
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  return np.fromiter((int(ex["label"]) for ex in tfds.as_numpy(ds.map(lambda ex: {"label": ex["label"]}))),
                     np.int64)


def balanced_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a class-balanced `fraction` of the examples (at least one per class)."""
  if not 0 < fraction <= 1:
    raise SubsetError(f"label fractions must be in (0, 1], got {fraction}")
  rng = np.random.default_rng([seed, 20200213])  # fixed second word: subset draws never reuse model seeds
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    chosen.append(rng.permutation(members)[:count])
  return np.sort(np.concatenate(chosen))


def subset_filter(dataset: str, builder, split: str, fraction: float,
                  seed: int) -> tuple[Optional[Callable[[Dict[str, tf.Tensor]], tf.Tensor]], int, str]:
  """(keep predicate for pipeline.pretrain_batches or None for all, number of examples kept, description)."""
  from ssl_jax.data import pipeline
  if fraction == 1.0:
    return None, pipeline.num_examples(builder, split), "all labels"
  if dataset == "imagenet2012":
    names = imagenet_file_names(fraction)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(names), tf.ones(len(names), tf.int32)), default_value=0)
    return (lambda ex: table.lookup(ex["file_name"]) > 0), len(names), \
        f"SimCLR's ImageNet {IMAGENET_FRACTIONS[fraction].split('.')[0]} list"
  keep_mask = np.zeros(pipeline.num_examples(builder, split), bool)
  indices = balanced_indices(train_labels(builder, split), fraction, seed)
  keep_mask[indices] = True
  keep = tf.constant(keep_mask)
  return (lambda ex: tf.gather(keep, ex["index"])), len(indices), \
      f"class-balanced {fraction:g} of {split} (seed {seed})"
