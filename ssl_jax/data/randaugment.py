"""RandAugment and random erasing as stateless tf.data ops: the train-time augmentations of MAE's (and
DeiT's / BEiT's) supervised fine-tuning, timm's `rand-m9-mstd0.5-inc1` and `RandomErasing(mode="pixel")`.

RandAugment (Cubuk et al. 2020) as timm's rand_augment_transform with the "increasing" op set: `layers` ops
drawn uniformly with replacement from the 15 below, each applied with probability 0.5 at a magnitude drawn
per op from N(magnitude, magnitude_std) clipped to [0, 10]; ops that take a direction (rotate, shear,
translate, the enhancements) pick its sign with probability 0.5. Levels (timm auto_augment.py
_*_level_to_arg, m = magnitude / 10): rotate 30m degrees, shear 0.3m, translate 0.45m of the side,
posterize to 4 - int(4m) bits, solarize above 256 - int(256m), solarize-add int(110m) below 128, colour /
contrast / brightness / sharpness factor 1 +- 0.9m. Pixels uncovered by a geometric op take the dataset
mean (timm: img_mean rounded to uint8).

Deviations from timm's PIL ops, all small: images stay float in [0, 1] between ops (PIL rounds to uint8
after each; posterize, solarize and equalize quantize to uint8 levels as PIL does); geometric ops resample
bilinearly (MAE's hparams ask PIL for bicubic; TensorFlow's projective transform has nearest and bilinear).
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from ssl_jax.data.views import RANDAUGMENT_MAX_MAGNITUDE

NUM_OPS = 15
MAX_MAGNITUDE = RANDAUGMENT_MAX_MAGNITUDE
_APPLY_PROB = 0.5  # timm rand_augment_ops: prob=0.5 for every op


def _u8(image: tf.Tensor) -> tf.Tensor:
  """float [0, 1] -> the uint8 levels 0..255 as float32."""
  return tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor), clipped to [0, 1]: factor 1 is the image, 0 the
  degenerate image, > 1 extrapolates."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _gray(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert("L") (ITU-R 601 luma) as [H, W, 1]."""
  return tf.image.rgb_to_grayscale(image)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.autocontrast(cutoff=0): each channel's uint8 levels stretched so its darkest is 0 and its
  brightest 255 (PIL's lookup table: int(level * scale + offset)); a constant channel is left as it is."""
  levels = tf.cast(_u8(image), tf.float64)
  lo = tf.reduce_min(levels, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(levels, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value(tf.floor(levels * scale - lo * scale), 0.0, 255.0)
  return tf.cast(tf.where(hi > lo, stretched, levels), tf.float32) / 255.0


def equalize(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.equalize: per channel, the uint8 histogram's lookup table lut[i] = (step // 2 + number of
  pixels below level i) // step, step = (pixels - count of the highest occupied level) // 255; identity
  when step is 0."""
  levels = tf.cast(_u8(image), tf.int32)
  out = []
  for c in range(3):
    channel = levels[..., c]
    hist = tf.math.bincount(tf.reshape(channel, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
    step = (tf.reduce_sum(hist) - last) // 255
    below = tf.cumsum(hist, exclusive=True)
    lut = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
    lut = tf.where(step > 0, lut, tf.range(256))
    out.append(tf.gather(lut, channel))
  return tf.cast(tf.stack(out, axis=-1), tf.float32) / 255.0


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """ImageOps.posterize: keep the `bits` high bits of each uint8 level (bits >= 8: unchanged)."""
  shift = tf.cast(8 - tf.clip_by_value(bits, 0, 8), tf.int32)
  levels = tf.cast(_u8(image), tf.int32)
  kept = tf.bitwise.left_shift(tf.bitwise.right_shift(levels, shift), shift)
  return tf.cast(kept, tf.float32) / 255.0


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """ImageOps.solarize: uint8 levels >= threshold are inverted."""
  return tf.where(_u8(image) >= tf.cast(threshold, tf.float32), 1.0 - image, image)


def solarize_add(image: tf.Tensor, add: tf.Tensor) -> tf.Tensor:
  """timm's solarize_add: levels below 128 raised by `add` (of 255), capped at 255."""
  raised = tf.minimum(image + tf.cast(add, tf.float32) / 255.0, 1.0)
  return tf.where(_u8(image) < 128.0, raised, image)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Sharpness: blend with the image smoothed by PIL's SMOOTH kernel ([[1,1,1],[1,5,1],[1,1,1]]
  / 13), whose one-pixel border is the image's own."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.ones_like(smooth[1:-1, 1:-1, :1]), [[1, 1], [1, 1], [0, 0]]) < 0.5
  degenerate = tf.where(border, image, smooth)
  return _blend(degenerate, image, factor)


def affine(image: tf.Tensor, matrix: Sequence[tf.Tensor], fill: Sequence[float]) -> tf.Tensor:
  """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)): output point (x, y) reads input (a x + b y + c,
  d x + e y + f) in PIL's coordinates (pixel centres at + 0.5), bilinearly; pixels read from outside the image take `fill` (one value per channel)."""
  fill = tf.constant(fill, tf.float32)
  a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in matrix)
  # PIL samples at pixel centres (x + 0.5, y + 0.5) of a continuous plane; TF at integer pixel indices.
  c, f = c + 0.5 * (a + b - 1.0), f + 0.5 * (d + e - 1.0)
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  hw = tf.shape(image)[:2]
  # The op fills with one scalar: transform image - fill with fill 0, then add fill back.
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=transform, output_shape=hw, fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.clip_by_value(out + fill, 0.0, 1.0)


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill: Sequence[float]) -> tf.Tensor:
  """Image.rotate(degrees) about the centre: counter-clockwise as displayed."""
  theta = degrees * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = w / 2, h / 2  # PIL's centre, in its continuous coordinates
  cos, sin = tf.cos(theta), tf.sin(theta)
  return affine(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy], fill)


def _signed(level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """level with a random sign (timm's _randomly_negate)."""
  return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -level, level)


def _apply_op(index: tf.Tensor, image: tf.Tensor, magnitude: tf.Tensor, sign_seed: tf.Tensor,
              fill: Sequence[float]) -> tf.Tensor:
  """Op `index` of timm's _RAND_INCREASING_TRANSFORMS at `magnitude` in [0, 10]."""
  m = magnitude / MAX_MAGNITUDE
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  enhance = 1.0 + _signed(0.9 * m, sign_seed)
  shear = _signed(0.3 * m, sign_seed)
  shift = _signed(0.45 * m, sign_seed)
  zero = tf.constant(0.0)
  one = tf.constant(1.0)
  branches = [
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: 1.0 - image,                                                        # Invert
      lambda: rotate(image, _signed(30.0 * m, sign_seed), fill),
      lambda: posterize(image, 4 - tf.cast(tf.floor(4.0 * m), tf.int32)),         # PosterizeIncreasing
      lambda: solarize(image, 256 - tf.floor(256.0 * m)),                         # SolarizeIncreasing
      lambda: solarize_add(image, tf.floor(110.0 * m)),
      lambda: _blend(tf.tile(_gray(image), [1, 1, 3]), image, enhance),           # ColorIncreasing
      lambda: _blend(tf.fill(tf.shape(image), tf.round(tf.reduce_mean(_u8(_gray(image)))) / 255.0),
                     image, enhance),                                             # ContrastIncreasing
      lambda: _blend(tf.zeros_like(image), image, enhance),                       # BrightnessIncreasing
      lambda: sharpness(image, enhance),                                          # SharpnessIncreasing
      lambda: affine(image, [one, shear, zero, zero, one, zero], fill),           # ShearX
      lambda: affine(image, [one, zero, zero, shear, one, zero], fill),           # ShearY
      lambda: affine(image, [one, zero, shift * w, zero, one, zero], fill),       # TranslateXRel
      lambda: affine(image, [one, zero, zero, zero, one, shift * h], fill),       # TranslateYRel
  ]
  assert len(branches) == NUM_OPS
  return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, layers: int, magnitude: float, magnitude_std: float,
                 fill: Sequence[float]) -> tf.Tensor:
  """RandAugment on float32 [H, W, 3] in [0, 1] (see the module docstring); deterministic in `seed`.

  fill: the per-channel value in [0, 1] of pixels uncovered by rotate / shear / translate (timm: the
  dataset mean)."""
  fill = [round(255 * float(f)) / 255.0 for f in fill]
  seeds = tf.random.experimental.stateless_split(seed, 4 * layers)
  for i in range(layers):
    op_seed, apply_seed, magnitude_seed, sign_seed = (seeds[4 * i + j] for j in range(4))
    index = tf.random.stateless_uniform([], op_seed, 0, NUM_OPS, dtype=tf.int32)
    m = magnitude + magnitude_std * tf.random.stateless_normal([], magnitude_seed)
    m = tf.clip_by_value(m, 0.0, MAX_MAGNITUDE)
    applied = _apply_op(index, image, m, sign_seed, fill)
    image = tf.where(tf.random.stateless_uniform([], apply_seed) < _APPLY_PROB, applied, image)
  return image


def random_erase(image: tf.Tensor, seed: tf.Tensor, prob: float, fill_mean: Sequence[float] = (0., 0., 0.),
                 fill_std: Sequence[float] = (1., 1., 1.), attempts: int = 10) -> tf.Tensor:
  """timm's RandomErasing(probability=prob, mode="pixel", max_count=1) on one normalized image [H, W, C]:
  with probability `prob`, a box of area U(0.02, 1/3) of the image and aspect ratio log-uniform in
  (0.3, 1/0.3) (the first of `attempts` draws that fits) is filled with per-pixel noise
  fill_mean + fill_std * N(0, 1) (N(0, 1) in normalized space)."""
  if prob <= 0:
    return image
  apply_seed, box_seed, pos_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  shape = tf.shape(image)
  h_img, w_img = shape[0], shape[1]
  area = tf.cast(h_img * w_img, tf.float32)
  draws = tf.random.stateless_uniform([2, attempts], box_seed)
  target = (0.02 + draws[0] * (1 / 3 - 0.02)) * area
  ratio = tf.exp(math.log(0.3) + draws[1] * (math.log(1 / 0.3) - math.log(0.3)))
  # Python's round (half to even), as timm's int(round(...)).
  hs = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  fits = (hs < h_img) & (ws < w_img)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = hs[first], ws[first]
  # random.randint(0, H - h): both ends included.
  pos = tf.random.stateless_uniform([2], pos_seed)
  top = tf.minimum(tf.cast(pos[0] * tf.cast(h_img - h + 1, tf.float32), tf.int32), h_img - h)
  left = tf.minimum(tf.cast(pos[1] * tf.cast(w_img - w + 1, tf.float32), tf.int32), w_img - w)
  rows = tf.range(h_img)[:, None, None]
  cols = tf.range(w_img)[None, :, None]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  erase = box & tf.reduce_any(fits) & (tf.random.stateless_uniform([], apply_seed) < prob)
  noise = tf.random.stateless_normal(shape, noise_seed, dtype=image.dtype)
  noise = tf.constant(fill_mean, image.dtype) + tf.constant(fill_std, image.dtype) * noise
  return tf.where(erase, noise, image)
