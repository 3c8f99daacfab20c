"""RandAugment's ops against PIL's (what timm applies), the sampling of ops and magnitudes, random erasing's
box statistics, and that views without them are unchanged."""

import math

import numpy as np
import pytest
import tensorflow as tf

from ssl_jax.data import augment
from ssl_jax.data import randaugment as ra

Image = pytest.importorskip("PIL.Image")
from PIL import ImageEnhance, ImageOps  # noqa: E402

_FILL = (124, 116, 104)  # timm: round(255 * ImageNet mean)


def _image(seed=0, h=32, w=40):
  """A smooth image with a skewed histogram, so equalize and autocontrast do something."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([np.sin(xx / 5.0 + c) * np.cos(yy / 7.0 - c) for c in range(3)], -1)
  img = 90 + 60 * base + rng.normal(0, 8, (h, w, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def _levels(x):
  return np.round(np.asarray(x) * 255.0)


def _enhance_ops():
  gray = lambda x: tf.tile(ra._gray(x), [1, 1, 3])
  mean = lambda x: tf.fill(tf.shape(x), tf.round(tf.reduce_mean(ra._u8(ra._gray(x)))) / 255.0)
  return [("color", lambda x, f: ra._blend(gray(x), x, f), ImageEnhance.Color),
          ("contrast", lambda x, f: ra._blend(mean(x), x, f), ImageEnhance.Contrast),
          ("brightness", lambda x, f: ra._blend(tf.zeros_like(x), x, f), ImageEnhance.Brightness),
          ("sharpness", lambda x, f: ra.sharpness(x, tf.constant(f)), ImageEnhance.Sharpness)]


def test_pixel_ops_equal_pil():
  img = _image()
  x, pil = tf.constant(img, tf.float32) / 255.0, Image.fromarray(img)
  exact = [(ra.autocontrast(x), ImageOps.autocontrast(pil)), (ra.equalize(x), ImageOps.equalize(pil)),
           (ra.posterize(x, tf.constant(2)), ImageOps.posterize(pil, 2)),
           (ra.solarize(x, tf.constant(100.0)), ImageOps.solarize(pil, 100)),
           (ra.solarize_add(x, tf.constant(50.0)), pil.point([min(255, i + 50) if i < 128 else i
                                                              for i in range(256)] * 3)),
           (1.0 - x, ImageOps.invert(pil))]
  for ours, ref in exact:
    np.testing.assert_array_equal(_levels(ours), np.asarray(ref))
  # The blends: PIL rounds its uint8 result; ours stays float (one level at most).
  for name, ours, enhancer in _enhance_ops():
    for factor in (0.1, 0.6, 1.9):
      diff = np.abs(_levels(ours(x, factor)) - np.asarray(enhancer(pil).enhance(factor), np.float64))
      assert diff.max() <= 1, (name, factor)


@pytest.mark.parametrize("kind,arg", [("rotate", 20.0), ("rotate", -90.0), ("shear_x", 0.25),
                                      ("shear_y", -0.2), ("translate_x", 6.0), ("translate_y", -4.5)])
def test_geometric_ops_match_pil_bilinear(kind, arg):
  img = _image(1)
  x, pil = tf.constant(img, tf.float32) / 255.0, Image.fromarray(img)
  fill = [v / 255.0 for v in _FILL]
  matrix = {"shear_x": (1, arg, 0, 0, 1, 0), "shear_y": (1, 0, 0, arg, 1, 0),
            "translate_x": (1, 0, arg, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, arg)}.get(kind)
  if kind == "rotate":
    ours = ra.rotate(x, tf.constant(arg), fill)
    ref = pil.rotate(arg, resample=Image.BILINEAR, fillcolor=_FILL)
  else:
    ours = ra.affine(x, [float(v) for v in matrix], fill)
    ref = pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)
  diff = np.abs(_levels(ours) - np.asarray(ref, np.float64))
  # Away from where the image meets the fill (PIL fills a pixel whose sample falls outside; TF blends the
  # fill in bilinearly) the two agree to rounding.
  inside = np.asarray(ref).astype(np.int64) - np.array(_FILL)
  inner = np.ones(img.shape[:2], bool)
  for dy in (-2, -1, 0, 1, 2):
    for dx in (-2, -1, 0, 1, 2):
      inner &= np.roll(np.any(inside != 0, -1), (dy, dx), (0, 1))
  inner[:2], inner[-2:], inner[:, :2], inner[:, -2:] = False, False, False, False
  assert inner.sum() > img.shape[0] * img.shape[1] // 3
  assert diff[inner].max() <= 2, diff[inner].max()
  assert diff.mean() < 2.5


def test_rand_augment_samples_ops_and_magnitudes():
  x = tf.constant(_image(2), tf.float32) / 255.0
  fill = (0.485, 0.456, 0.406)
  run = tf.function(lambda s: ra.rand_augment(x, s, 2, 9.0, 0.5, fill))
  outs = [run(tf.constant([7, i], tf.int64)).numpy() for i in range(200)]
  assert np.array_equal(outs[3], run(tf.constant([7, 3], tf.int64)).numpy())  # deterministic in the seed
  unchanged = np.mean([np.array_equal(o, x.numpy()) for o in outs])
  # Each of 2 layers applies with p 0.5: 1/4 of images untouched, a few more when an op is a no-op
  # (a posterize to 4 bits at magnitude ~9 or an autocontrast of an already stretched image are not).
  assert 0.15 < unchanged < 0.4, unchanged
  assert all(o.shape == x.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
  # layers 0 or magnitude 0 with std 0 at an op that only depends on it: identity for brightness.
  bright = ra._apply_op(tf.constant(9), x, tf.constant(0.0), tf.constant([1, 2]), fill)
  np.testing.assert_allclose(bright, x, atol=1e-6)
  # Magnitude 10 brightness is a factor 1.9 or 0.1.
  bright = ra._apply_op(tf.constant(9), x, tf.constant(10.0), tf.constant([1, 2]), fill).numpy()
  ratio = np.median(bright[x.numpy() > 0.2] / x.numpy()[x.numpy() > 0.2])
  assert math.isclose(ratio, 0.1, abs_tol=1e-3) or (bright.max() == 1.0 and ratio > 1.5)


def test_views_without_randaugment_or_erasing_are_unchanged():
  img = tf.constant(_image(3))
  seed = tf.constant([1, 2], tf.int64)
  base = dict(crop_size=24, color_jitter_prob=0.8, grayscale_prob=0.2)
  plain = augment.view_transform(base, img, seed).numpy()
  same = augment.view_transform(dict(base, randaugment_layers=0, erase_prob=0.0), img, seed).numpy()
  np.testing.assert_array_equal(plain, same)
  (erased_off,) = augment.erase_views([base], [tf.constant(plain)], seed, (0.,) * 3, (1.,) * 3)
  np.testing.assert_array_equal(plain, erased_off.numpy())
  # RandAugment changes the view after the same crop, flip and jitter.
  with_ra = [augment.view_transform(dict(base, randaugment_layers=2), img, tf.constant([1, s], tf.int64))
             for s in range(2, 12)]
  assert any(not np.array_equal(plain, v.numpy()) for v in with_ra)
  with pytest.raises(ValueError, match="randaugment_magnitude"):
    augment.view_transform(dict(base, randaugment_layers=2, randaugment_magnitude=11.0), img, seed)
  with pytest.raises(ValueError, match="erase_prob"):
    augment.view_transform(dict(base, erase_prob=1.5), img, seed)


def test_random_erase_box_statistics():
  side = 64
  x = tf.zeros([side, side, 3])
  run = tf.function(lambda s: ra.random_erase(x, s, 0.25, (0.,) * 3, (1.,) * 3))
  areas, ratios, values, erased = [], [], [], 0
  for i in range(800):
    out = run(tf.constant([3, i], tf.int64)).numpy()
    mask = np.any(out != 0, -1)
    if not mask.any():
      continue
    erased += 1
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert mask.sum() == h * w  # one solid box
    areas.append(h * w / side ** 2)
    ratios.append(h / w)
    values.append(out[mask])
  assert abs(erased / 800 - 0.25) < 0.05, erased
  areas, ratios = np.array(areas), np.array(ratios)
  assert areas.min() >= 0.015 and areas.max() <= 0.36
  assert 0.12 < areas.mean() < 0.2  # U(0.02, 1/3) less the draws that did not fit
  assert ratios.min() >= 0.25 and ratios.max() <= 4.0 and abs(np.median(np.log(ratios))) < 0.3
  values = np.concatenate(values)
  assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05
  # Unnormalized images take mean + std * N(0, 1).
  out = ra.random_erase(x, tf.constant([3, 0], tf.int64), 1.0, (0.5, 0.4, 0.3), (0.01, 0.01, 0.01)).numpy()
  mask = np.any(out != 0, -1)
  np.testing.assert_allclose(out[mask].mean(0), [0.5, 0.4, 0.3], atol=0.01)
