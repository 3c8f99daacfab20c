"""Representations of a whole split, each example exactly once on any number of devices and processes."""

from __future__ import annotations

import time
from typing import Callable, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from ssl_jax import parallel
from ssl_jax.data import datasets, pipeline


PROGRESS_EVERY_SECONDS = 30


def extract(cfg, represent: Callable, split: str, mesh, batch_size: int = 256,
            in_order: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """(features [n, d] float32, labels [n] int32) for every example of `split`, in split order (in_order:
  row i is the example training calls index i; pipeline.eval_batches).

  represent: x [b, h, w, 3] -> [b, d] (jitted by the caller, so repeated calls do not recompile), applied
  to global batches sharded over the mesh. Batches are padded (pipeline.eval_batches) and padding is
  dropped with the mask after the gather, so the result does not depend on the number of devices or
  processes.
  """
  info = datasets.of(cfg)
  num_devices = mesh.size
  batch_size = max(num_devices, batch_size // num_devices * num_devices)
  local = batch_size // jax.process_count()
  feats, labels, index, mask = [], [], [], []
  total = pipeline.num_examples(pipeline.builder_of(cfg), split)
  start = last_report = time.time()
  for batch in pipeline.eval_batches(cfg, split, local, info.image_size, info.eval_crop_proportion,
                                     jax.process_index(), jax.process_count(), in_order=in_order):
    out = represent(parallel.to_global(mesh, batch["image"]))
    rest = parallel.to_global(mesh, {k: batch[k] for k in ("label", "index", "mask")})
    out, rest = multihost_utils.process_allgather((out, rest), tiled=True)
    feats.append(np.asarray(out, np.float32))
    labels.append(rest["label"])
    index.append(rest["index"])
    mask.append(rest["mask"])
    if time.time() - last_report > PROGRESS_EVERY_SECONDS and jax.process_index() == 0:
      done = int(sum(m.sum() for m in mask))
      print(f"  features of {split}: {done:,}/{total:,} images, {done / (time.time() - start):.0f} images/s",
            flush=True)
      last_report = time.time()
  mask = np.concatenate(mask)
  order = np.argsort(np.concatenate(index)[mask], kind="stable")
  return np.concatenate(feats)[mask][order], np.concatenate(labels)[mask][order].astype(np.int32)


RAW_PIXELS_MAX_SIDE = 32


@jax.jit
def raw_pixels(x):
  """The raw-pixel baseline's "representation": the flattened (normalized) image, resized first (bilinear,
  antialiased) so that its longer side is at most 32. At 32x32 (CIFAR) that is the image itself; at 224x224 the full image would be
  150,528 features per example (770 GB of train features for ImageNet), so larger images are compared as
  32x32 thumbnails, the "tiny images" baseline of Torralba et al. 2008."""
  n, h, w, c = x.shape
  if max(h, w) > RAW_PIXELS_MAX_SIDE:
    scale = RAW_PIXELS_MAX_SIDE / max(h, w)
    x = jax.image.resize(x, (n, max(1, round(h * scale)), max(1, round(w * scale)), c), "linear",
                         antialias=True)
  return x.reshape(n, -1)
