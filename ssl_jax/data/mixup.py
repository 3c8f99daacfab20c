"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) over a batch on the device, with label smoothing:
the batch augmentations of MAE's fine-tuning recipe (main_finetune.py: timm's Mixup with mixup_alpha 0.8,
cutmix_alpha 1.0, prob 1.0, switch_prob 0.5, mode "batch", label_smoothing 0.1).

Semantics of timm's Mixup in "batch" mode (timm/data/mixup.py, Mixup._params_per_batch, _mix_batch,
rand_bbox, mixup_target), which this follows:
* one mixing weight lam per step: lam ~ Beta(cutmix_alpha, cutmix_alpha) for CutMix (chosen with
  probability switch_prob when both alphas are set), else lam ~ Beta(mixup_alpha, mixup_alpha);
* each example is mixed with the example at the mirrored position of the batch (x.flip(0));
* CutMix pastes one box of side sqrt(1 - lam) x the image's, centred uniformly at random and clipped to
  the image, and lam becomes the uncovered fraction of the image;
* targets: smoothed one-hot vectors (1 - s + s/C on the label, s/C elsewhere), mixed with the same lam.
The batch here is the global batch (one jit over the mesh), so the partner of an example is the same on 1
device or 8 and a sharded step equals the single-device step; timm mixes within each GPU's batch.
Everything is drawn from `key`, so a step's mixing is a function of the seed and the step: resume is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_targets(labels, num_classes: int, smoothing: float):
  """[n] int -> [n, C] float32: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(key, height: int, width: int, lam):
  """(top, bottom, left, right) of the pasted box: sides int(side x sqrt(1 - lam)), a centre uniform over
  the pixels, each edge clipped to the image (timm rand_bbox with no margin)."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (jnp.floor(height * cut).astype(jnp.int32), jnp.floor(width * cut).astype(jnp.int32))
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def mix_batch(key, images, labels, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float = 0.5, smoothing: float = 0.0):
  """(mixed images [n, h, w, c], soft targets [n, C] float32, lam) of one batch. With both alphas 0 the
  images are returned unchanged and the targets are the smoothed labels (lam 1)."""
  targets = smoothed_targets(labels, num_classes, smoothing)
  if not mixup_alpha and not cutmix_alpha:
    return images, targets, jnp.float32(1.0)
  k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
  if mixup_alpha and cutmix_alpha:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(bool(cutmix_alpha))
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha else jnp.float32(1.0)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha else jnp.float32(1.0)
  flipped = images[::-1]

  n, h, w = images.shape[:3]
  top, bottom, left, right = cutmix_box(k_box, h, w, lam_cut)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)     # [h, w]
  cut_images = jnp.where(inside[None, :, :, None], flipped, images)
  lam_cut = 1.0 - (bottom - top) * (right - left) / (h * w)                       # timm's correct_lam
  mixed_images = (images * lam_mix + flipped * (1.0 - lam_mix)).astype(images.dtype)

  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  images = jnp.where(use_cutmix, cut_images, mixed_images)
  targets = targets * lam + targets[::-1] * (1.0 - lam)
  return images, targets, lam
