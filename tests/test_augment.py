"""Tests of ssl_jax.data.augment on small synthetic images."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from ssl_jax.data import augment

# A view that changes nothing when crop_size equals the input side; tests switch single ops on.
IDENTITY = dict(crop_scale=(1.0, 1.0), flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0,
                blur_prob=0.0, solarize_prob=0.0)
# Everything on, with a probability strictly between 0 and 1 where possible (exercises tf.cond paths).
FULL = dict(crop_size=32, blur_prob=0.5, solarize_prob=0.2)


def _image(h, w, seed=0, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, (h, w, 3), dtype=np.uint8)


def _seed(a, b=0, dtype=tf.int32):
  return tf.constant([a, b], dtype)


def _identity(size, **overrides):
  return dict(IDENTITY, crop_size=size, **overrides)


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
def test_same_seed_same_output_different_seed_different_output(dtype):
  image = _image(64, 64)
  a = augment.view_transform(FULL, image, _seed(3, 7, dtype)).numpy()
  b = augment.view_transform(FULL, image, _seed(3, 7, dtype)).numpy()
  c = augment.view_transform(FULL, image, _seed(4, 7, dtype)).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_output_dtype_shape_range():
  for seed in range(8):
    out = augment.view_transform(FULL, _image(64, 48, seed), _seed(seed))
    assert out.dtype == tf.float32 and out.shape == (32, 32, 3)
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0


def test_configdict_view_matches_dict_view():
  image = _image(64, 64)
  a = augment.view_transform(FULL, image, _seed(1))
  b = augment.view_transform(ml_collections.ConfigDict(FULL), image, _seed(1))
  np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("size", [32, 64])
def test_identity_view(size):
  image = _image(size, size)
  for seed in range(3):
    out = augment.view_transform(_identity(size), image, _seed(seed)).numpy()
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6, rtol=0)


def test_grayscale_gives_equal_channels():
  out = augment.view_transform(_identity(32, grayscale_prob=1.0), _image(32, 32), _seed(0)).numpy()
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-7)
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-7)


def test_solarize_matches_numpy():
  image = _image(32, 32)
  out = augment.view_transform(_identity(32, solarize_prob=1.0, solarize_threshold=0.5), image, _seed(0))
  x = image / 255.0
  np.testing.assert_allclose(out.numpy(), np.where(x >= 0.5, 1.0 - x, x), atol=1e-6, rtol=0)


def test_flip_matches_fliplr():
  image = _image(32, 32)
  out = augment.view_transform(_identity(32, flip_prob=1.0), image, _seed(0)).numpy()
  np.testing.assert_allclose(out, np.fliplr(image) / 255.0, atol=1e-6, rtol=0)


def _jitter_only(**magnitudes):
  zeros = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
  return _identity(32, color_jitter_prob=1.0, **dict(zeros, **magnitudes))


def test_brightness_simclrv2_is_one_factor():
  b = 0.4
  image = _image(32, 32, low=1)
  factors = []
  for seed in range(5):
    out = augment.view_transform(_jitter_only(brightness=b), image, _seed(seed)).numpy()
    unclipped = out < 1.0
    ratio = out[unclipped] / (image[unclipped] / 255.0)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    assert 1 - b <= ratio[0] <= 1 + b
    factors.append(ratio[0])
  assert np.ptp(factors) > 1e-3  # the factor is random


def test_brightness_simclrv1_is_one_offset():
  b = 0.4
  image = _image(32, 32)
  x = image / 255.0
  out = augment.view_transform(_jitter_only(brightness=b, color_jitter_impl="simclrv1"), image,
                               _seed(0)).numpy()
  unclipped = (out > 0.0) & (out < 1.0)
  delta = out[unclipped] - x[unclipped]
  np.testing.assert_allclose(delta, delta[0], atol=1e-6)
  assert -b <= delta[0] <= b


def test_contrast_scales_around_grayscale_mean():
  image = _image(32, 32, low=100, high=156)  # mid-range: a factor in [0.6, 1.4] never clips
  x = image / 255.0
  out = augment.view_transform(_jitter_only(contrast=0.4), image, _seed(0)).numpy()
  mean = np.mean(x @ np.array([0.2989, 0.587, 0.114]))
  away = np.abs(x - mean) > 0.02  # the factor is ill-conditioned next to the mean
  factor = (out[away] - mean) / (x[away] - mean)
  np.testing.assert_allclose(factor, np.median(factor), rtol=1e-3)
  assert 0.6 <= np.median(factor) <= 1.4


def test_color_jitter_strength_overrides_magnitudes():
  image = _image(32, 32)
  strength = augment.view_transform(_identity(32, color_jitter_prob=1.0, color_jitter_strength=0.5,
                                               brightness=0.9), image, _seed(5))
  explicit = augment.view_transform(_identity(32, color_jitter_prob=1.0, brightness=0.4, contrast=0.4,
                                               saturation=0.4, hue=0.1), image, _seed(5))
  np.testing.assert_array_equal(strength.numpy(), explicit.numpy())


def test_blur_keeps_constant_and_smooths_noise():
  constant = np.full((64, 64, 3), 77, np.uint8)
  out = augment.view_transform(_identity(64, blur_prob=1.0), constant, _seed(0)).numpy()
  np.testing.assert_allclose(out, 77 / 255.0, atol=1e-5)

  noise = _image(64, 64)
  # blur_sigma (1, 2): even the smallest sigma averages over several pixels of the 7-tap kernel.
  out = augment.view_transform(_identity(64, blur_prob=1.0, blur_sigma=(1.0, 2.0)), noise, _seed(0)).numpy()
  assert out.var() < 0.5 * (noise / 255.0).var()


@pytest.mark.parametrize("height,width,radius", [(224, 224, 11), (96, 80, 4), (20, 24, 1), (7, 9, 3)])
def test_blur_equals_a_direct_reflect_padded_convolution(height, width, radius):
  """The two banded matrix products against float64 numpy: reflect padding (edge not repeated), the
  normalized Gaussian, first along H then along W; radius 0 returns the image."""
  x = np.random.default_rng(radius).uniform(size=(height, width, 3)).astype(np.float32)
  for sigma in (0.1, 0.7, 2.0):
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    want = sum(kernel[t] * padded[t:t + height] for t in range(2 * radius + 1))
    want = sum(kernel[t] * want[:, t:t + width] for t in range(2 * radius + 1))
    got = augment.gaussian_blur(tf.constant(x), tf.constant(sigma, tf.float32), radius).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert np.array_equal(augment.gaussian_blur(tf.constant(x), 0.5, 0).numpy(), x)


def test_blur_is_random_per_seed():
  noise = _image(64, 64)
  a = augment.view_transform(_identity(64, blur_prob=1.0), noise, _seed(0)).numpy()
  b = augment.view_transform(_identity(64, blur_prob=1.0), noise, _seed(1)).numpy()
  assert not np.allclose(a, b)  # different sigmas


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 0.5)])
def test_crop_box_area_and_ratio_within_range(scale):
  h, w = 64, 48
  ratio = (3 / 4, 4 / 3)
  sample = tf.function(lambda s: tf.map_fn(
      lambda si: tf.concat(augment.sample_crop_box(tf.constant([h, w, 3]), si, scale, ratio), 0), s))
  seeds = tf.stack([tf.range(400), tf.fill([400], 9)], axis=1)
  boxes = sample(seeds).numpy()
  y, x, bh, bw = boxes.T
  area = bh * bw / (h * w)
  assert np.all((scale[0] <= area) & (area <= scale[1]))
  # Integer box sides round the ratio by up to half a pixel on the width.
  aspect = bw / bh
  assert np.all((aspect >= ratio[0] - 0.5 / bh) & (aspect <= ratio[1] + 0.5 / bh))
  assert np.all((y >= 0) & (x >= 0) & (y + bh <= h) & (x + bw <= w))
  # The samples cover the range, not one corner of it.
  assert area.min() < scale[0] + 0.1 and area.max() > scale[1] - 0.15
  assert len(np.unique(y)) > 5 and len(np.unique(x)) > 5


def test_unknown_view_key_raises():
  with pytest.raises(ValueError, match="blurr_prob"):
    augment.view_transform({"crop_size": 32, "blurr_prob": 0.5}, _image(32, 32), _seed(0))
  with pytest.raises(ValueError, match="colour_jitter"):
    augment.view_transform(ml_collections.ConfigDict({"colour_jitter": 0.5}), _image(32, 32), _seed(0))


def test_view_defaults_cover_all_keys():
  image = _image(32, 32)
  out = augment.view_transform(dict(augment.VIEW_DEFAULTS, crop_size=32), image, _seed(0))
  assert out.shape == (32, 32, 3)


def test_eval_transform_identity_on_cifar_size():
  image = _image(32, 32)
  out = augment.eval_transform(image, 32, 1.0)
  assert out.dtype == tf.float32
  np.testing.assert_allclose(out.numpy(), image / 255.0, atol=1e-6, rtol=0)


def test_eval_transform_centre_crop():
  image = _image(64, 48)
  out = augment.eval_transform(image, 32, 0.875)
  assert out.shape == (32, 32, 3) and out.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
  # Proportion 1 and crop_size equal to the shorter side: the centred 48 x 48 square, offset (64 - 48) / 2.
  square = augment.eval_transform(image, 48, 1.0).numpy()
  np.testing.assert_allclose(square, image[8:56] / 255.0, atol=1e-6, rtol=0)


def test_normalize():
  image = tf.fill([4, 4, 3], 0.5)
  out = augment.normalize(image, (0.5, 0.25, 0.0), (1.0, 0.5, 0.25)).numpy()
  np.testing.assert_allclose(out[0, 0], [0.0, 0.5, 2.0])


def test_multi_view_transform_sub_seeds_and_sizes():
  image = _image(64, 64)
  views = [FULL, FULL, dict(FULL, crop_size=16, crop_scale=(0.05, 0.4))]
  a, b, small = augment.multi_view_transform(views, image, _seed(2))
  assert a.shape == (32, 32, 3) and small.shape == (16, 16, 3)
  assert not np.allclose(a.numpy(), b.numpy())  # same config, independent sub-seeds
  sub = tf.random.experimental.stateless_split(_seed(2), 3)[1]
  np.testing.assert_array_equal(b.numpy(), augment.view_transform(FULL, image, sub).numpy())


def test_tf_data_map_is_deterministic_and_matches_eager():
  images = np.stack([_image(48, 40, seed) for seed in range(6)])
  seeds = np.stack([np.arange(6), np.full(6, 11)], axis=1).astype(np.int64)
  views = [FULL, dict(FULL, blur_prob=0.1, solarize_prob=0.0, crop_size=24)]

  def run():
    ds = tf.data.Dataset.from_tensor_slices((images, seeds))
    ds = ds.map(lambda im, s: augment.multi_view_transform(views, im, s), num_parallel_calls=2)
    return [tuple(v.numpy() for v in element) for element in ds]

  first, second = run(), run()
  for x, y in zip(first, second):
    for vx, vy in zip(x, y):
      np.testing.assert_array_equal(vx, vy)
  # Graph mode inside tf.data gives the same pixels as eager execution.
  eager = augment.multi_view_transform(views, images[3], seeds[3])
  for graph_view, eager_view in zip(first[3], eager):
    np.testing.assert_allclose(graph_view, eager_view.numpy(), atol=1e-6)


def test_importing_tensorflow_before_ssl_jax_is_warned_about():
  """ssl_jax turns TensorFlow's oneDNN kernels off (the same images on every CPU; they also ran the blur's
  old depthwise form 7x faster, so the two settings are easy to mix up); imported after tensorflow it
  cannot, and says so, unless the user chose TF_ENABLE_ONEDNN_OPTS."""
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}

  def stderr(code):
    return subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, cwd=REPO).stderr

  assert "tensorflow was imported before ssl_jax" in stderr("import tensorflow, ssl_jax")
  assert "imported before" not in stderr("import ssl_jax, tensorflow")
