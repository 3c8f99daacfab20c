"""Colour jitter, grayscale, Gaussian blur and solarize of the pre-training views on the accelerator, inside
the jitted train step (`augment_on_device=True`), so that the host only decodes, crops, resizes and flips.

Why: at 224 pixels these per-pixel ops, the 23-tap blur above all, cost the host about two thirds of a
SimCLR view (docs/input_pipeline.md), while on a TPU they are a rounding error next to a ResNet-50 step.
The official SimCLR code blurs on the TPU for the same reason (`batch_random_blur` in its model function).

Same ops as augment.py (same order: jitter in a random order of its four changes, each clipped to [0, 1]
-> grayscale -> blur -> solarize; same ranges and probabilities, read from the same view settings), drawn
per example from jax.random instead of tf.random: the distribution of the views is the recipe's, the
draws are not those of the host path. The key is a function of the run's seed, the step and the view, so
a resumed run draws exactly what the uninterrupted one drew, and with threefry's partitionable mode (JAX's
default) the draws of the global batch are the same on any mesh: 8 devices compute what 1 computes.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp

from ssl_jax.data import views as views_lib
from ssl_jax.errors import ConfigError

# The host's share of a view when the device does the rest: crop, resize and flip only.
HOST_OFF = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
# ITU-R 601 luma, as tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.5870, 0.1140)
# Key folds: one per random decision of a view (the view's index is folded in first).
_JITTER_APPLY, _JITTER_FACTORS, _JITTER_ORDER, _GRAY, _BLUR_APPLY, _BLUR_SIGMA, _SOLARIZE = range(7)
# Folded into the step's key so that these draws stay apart from the method's own (dropout, masks).
_STEP_FOLD = 0x5EED


def host_views(views: Sequence[Mapping[str, Any]]):
  """The views the host computes when the device does the per-pixel ops: the same crops and flips (the
  host's draws use fixed sub-seeds, so switching the other ops off changes no crop)."""
  return [dict(v, **HOST_OFF) for v in views]


def check(views: Sequence[Mapping[str, Any]]) -> None:
  """One-line ConfigError for views the device path cannot serve: RandAugment and random erasing are
  host-only (supervised fine-tuning's views, not pre-training's)."""
  for i, view in enumerate(views):
    v = views_lib.resolve_view(view)
    if v["randaugment_layers"] or v["erase_prob"]:
      raise ConfigError(f"augment_on_device=True: view {i} uses RandAugment or random erasing, which only the "
                        "host pipeline has; set augment_on_device=False")


def grayscale(x: jax.Array) -> jax.Array:
  """[..., 3] -> its luma repeated on the 3 channels."""
  luma = jnp.tensordot(x, jnp.asarray(_LUMA, x.dtype), axes=[[-1], [0]])[..., None]
  return jnp.broadcast_to(luma, x.shape)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
  """[..., 3] RGB in [0, 1] -> HSV with hue in [0, 1) (tf.image.rgb_to_hsv's convention)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  value = jnp.max(x, axis=-1)
  span = value - jnp.min(x, axis=-1)
  saturation = jnp.where(value > 0, span / jnp.where(value > 0, value, 1.0), 0.0)
  safe = jnp.where(span > 0, span, 1.0)
  hue = jnp.where(value == r, (g - b) / safe, jnp.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  hue = jnp.where(span > 0, hue / 6.0, 0.0)
  hue = jnp.where(hue < 0, hue + 1.0, hue)
  return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
  """The inverse of rgb_to_hsv."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  dh = h * 6.0
  weights = [jnp.clip(jnp.abs(dh - 3.0) - 1.0, 0.0, 1.0), jnp.clip(2.0 - jnp.abs(dh - 2.0), 0.0, 1.0),
             jnp.clip(2.0 - jnp.abs(dh - 4.0), 0.0, 1.0)]
  return jnp.stack([((1.0 - s) + s * w) * v for w in weights], axis=-1)


def _per_example(values: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, 1, 1], to scale or select the images of x [B, H, W, C] one by one."""
  return values.reshape((-1,) + (1,) * (x.ndim - 1))


def adjust_brightness(x, amount, impl: str = "simclrv2"):
  """Per example: x * amount (simclrv2, torchvision's) or x + amount (simclrv1), clipped to [0, 1]."""
  amount = _per_example(amount, x)
  return jnp.clip(x * amount if impl == "simclrv2" else x + amount, 0.0, 1.0)


def adjust_contrast(x, factor):
  """Per example: (x - m) * factor + m with m the mean of the image's luma, clipped to [0, 1]."""
  mean = jnp.mean(grayscale(x)[..., :1], axis=tuple(range(1, x.ndim)), keepdims=True)
  return jnp.clip((x - mean) * _per_example(factor, x) + mean, 0.0, 1.0)


def adjust_saturation(x, factor):
  """Per example: the HSV saturation times `factor`, clipped to [0, 1] (tf.image.adjust_saturation)."""
  hsv = rgb_to_hsv(x)
  s = jnp.clip(hsv[..., 1] * _per_example(factor, x)[..., 0], 0.0, 1.0)
  return jnp.clip(hsv_to_rgb(hsv.at[..., 1].set(s)), 0.0, 1.0)


def adjust_hue(x, delta):
  """Per example: the hue turned by `delta` of a full turn (tf.image.adjust_hue), clipped to [0, 1]."""
  hsv = rgb_to_hsv(x)
  h = jnp.mod(hsv[..., 0] + _per_example(delta, x)[..., 0], 1.0)
  return jnp.clip(hsv_to_rgb(hsv.at[..., 0].set(h)), 0.0, 1.0)


def gaussian_blur(x, sigma, radius: int):
  """Per example: separable Gaussian blur of std sigma[b] pixels with 2 * radius + 1 taps, reflect-padded
  (augment.gaussian_blur's)."""
  taps = jnp.arange(-radius, radius + 1, dtype=x.dtype)
  kernel = jnp.exp(-0.5 * jnp.square(taps[None, :] / sigma[:, None]))
  kernel = kernel / jnp.sum(kernel, axis=1, keepdims=True)                      # [B, 2r + 1]
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
  rows = sum(_per_example(kernel[:, t], x) * padded[:, t:t + height] for t in range(2 * radius + 1))
  return sum(_per_example(kernel[:, t], x) * rows[:, :, t:t + width] for t in range(2 * radius + 1))


def solarize(x, threshold: float = 0.5):
  return jnp.where(x >= threshold, 1.0 - x, x)


def _select(mask, new, old):
  return jnp.where(_per_example(mask, old), new, old)


def color_jitter(x, key, view: Dict[str, Any]):
  """The four changes of every example in its own random order; magnitudes of 0 leave a change out."""
  batch = x.shape[0]
  b_key, c_key, s_key, h_key = jax.random.split(jax.random.fold_in(key, _JITTER_FACTORS), 4)
  uniform = lambda k, lo, hi: jax.random.uniform(k, (batch,), x.dtype, lo, hi)
  brightness, contrast, saturation, hue = (view[k] for k in ("brightness", "contrast", "saturation", "hue"))
  ops = []
  if brightness > 0:
    amount = (uniform(b_key, max(0.0, 1.0 - brightness), 1.0 + brightness) if view["color_jitter_impl"] == "simclrv2"
              else uniform(b_key, -brightness, brightness))
    ops.append(lambda y: adjust_brightness(y, amount, view["color_jitter_impl"]))
  if contrast > 0:
    factor_c = uniform(c_key, max(0.0, 1.0 - contrast), 1.0 + contrast)
    ops.append(lambda y: adjust_contrast(y, factor_c))
  if saturation > 0:
    factor_s = uniform(s_key, max(0.0, 1.0 - saturation), 1.0 + saturation)
    ops.append(lambda y: adjust_saturation(y, factor_s))
  if hue > 0:
    delta = uniform(h_key, -hue, hue)
    ops.append(lambda y: adjust_hue(y, delta))
  if len(ops) <= 1:
    return ops[0](x) if ops else x
  # Each example's order: the argsort of i.i.d. uniforms (a uniformly random permutation). At position i
  # every example takes the change its order puts there: all changes are computed, one is kept.
  order = jnp.argsort(jax.random.uniform(jax.random.fold_in(key, _JITTER_ORDER), (batch, len(ops))), axis=1)
  for i in range(len(ops)):
    outs = jnp.stack([op(x) for op in ops])                                    # [ops, B, H, W, C]
    x = jnp.take_along_axis(outs, order[None, :, i].reshape((1, batch) + (1,) * (x.ndim - 1)), axis=0)[0]
  return x


def augment_view(view: Mapping[str, Any], x: jax.Array, key: jax.Array) -> jax.Array:
  """The per-pixel ops of one view on a batch x [B, H, W, 3] in [0, 1] (crops already made)."""
  v = views_lib.resolve_view(view)
  batch = x.shape[0]
  coin = lambda fold, p: jax.random.uniform(jax.random.fold_in(key, fold), (batch,)) < p
  if v["color_jitter_prob"] > 0:
    x = _select(coin(_JITTER_APPLY, v["color_jitter_prob"]), color_jitter(x, key, v), x)
  if v["grayscale_prob"] > 0:
    x = _select(coin(_GRAY, v["grayscale_prob"]), grayscale(x), x)
  if v["blur_prob"] > 0:
    # Kernel side 10% of the crop side, made odd, as on the host (SimCLR App. A).
    sigma = jax.random.uniform(jax.random.fold_in(key, _BLUR_SIGMA), (batch,), x.dtype, *v["blur_sigma"])
    x = _select(coin(_BLUR_APPLY, v["blur_prob"]), gaussian_blur(x, sigma, x.shape[1] // 20), x)
  if v["solarize_prob"] > 0:
    x = _select(coin(_SOLARIZE, v["solarize_prob"]), solarize(x, v["solarize_threshold"]), x)
  return x


def step_key(rng: jax.Array) -> jax.Array:
  """The augmentation key of a step from the step's key (train.py: the state's key folded with the step)."""
  return jax.random.fold_in(rng, _STEP_FOLD)


def apply(views: Sequence[Mapping[str, Any]], images: Sequence[jax.Array], key: jax.Array,
          mean: Sequence[float], std: Sequence[float], normalize: bool) -> Tuple[jax.Array, ...]:
  """Every view's per-pixel ops (view i with key folded by i), then the mean/std normalization the host
  would have done."""
  out = []
  for i, (view, x) in enumerate(zip(views, images)):
    x = augment_view(view, x, jax.random.fold_in(key, i))
    if normalize:
      x = (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)
    out.append(x)
  return tuple(out)
