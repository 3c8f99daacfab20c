"""augment_on_device (ssl_jax/data/device_augment.py): each per-pixel op equals the host's TensorFlow op
(augment.py, tf.image) at the same per-example parameters; the jitter runs each example's changes in its
drawn order; the apply probabilities are the view's; the global batch gives the same views on 8 devices
as on 1; the host then yields the same crops and flips, unnormalized; a run with the ops on the device
resumes bit for bit; host-only views are refused in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, stop_and_resume
from ssl_jax import config as config_lib
from ssl_jax import parallel
from ssl_jax.data import augment, device_augment, pipeline
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
from ssl_jax.data.views import resolve_view
from ssl_jax.errors import ConfigError

B, S = 6, 20


def images(seed=0, batch=B, size=S):
  return np.random.default_rng(seed).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)


def per_image(fn, x, params):
  """The host op applied to each image with its own parameter (tf, one image at a time)."""
  return np.stack([np.asarray(fn(tf.constant(img), float(p))) for img, p in zip(x, params)])


@pytest.mark.parametrize("name", ["brightness_v2", "brightness_v1", "contrast", "saturation", "hue"])
def test_colour_changes_equal_the_host_ops(name):
  x = images()
  params = {"brightness_v2": [0.6, 1.0, 1.4, 0.7, 1.2, 0.9], "brightness_v1": [-0.3, 0.0, 0.3, 0.1, -0.1, 0.2],
            "contrast": [0.6, 1.0, 1.4, 0.2, 1.8, 0.9], "saturation": [0.6, 1.0, 1.4, 0.0, 1.8, 0.3],
            "hue": [-0.1, 0.0, 0.1, 0.5, -0.5, 0.03]}[name]
  p = jnp.asarray(params, jnp.float32)
  ours, theirs = {
      "brightness_v2": (lambda: device_augment.adjust_brightness(x, p, "simclrv2"),
                        lambda: per_image(lambda i, a: augment.adjust_brightness(i, a, "simclrv2"), x, params)),
      "brightness_v1": (lambda: device_augment.adjust_brightness(x, p, "simclrv1"),
                        lambda: per_image(lambda i, a: augment.adjust_brightness(i, a, "simclrv1"), x, params)),
      "contrast": (lambda: device_augment.adjust_contrast(x, p),
                   lambda: per_image(augment.adjust_contrast, x, params)),
      "saturation": (lambda: device_augment.adjust_saturation(x, p),
                     lambda: per_image(lambda i, a: tf.clip_by_value(tf.image.adjust_saturation(i, a), 0., 1.),
                                       x, params)),
      "hue": (lambda: device_augment.adjust_hue(x, p),
              lambda: per_image(lambda i, a: tf.clip_by_value(tf.image.adjust_hue(i, a), 0., 1.), x, params)),
  }[name]
  np.testing.assert_allclose(np.asarray(jax.jit(ours)()), theirs(), atol=2e-6)


def test_grayscale_blur_solarize_equal_the_host_ops():
  x = images(1, size=40)
  np.testing.assert_allclose(device_augment.grayscale(x), augment.to_grayscale(tf.constant(x)), atol=1e-6)
  np.testing.assert_array_equal(device_augment.solarize(x, 0.5), augment.solarize(tf.constant(x), 0.5))
  sigmas = [0.1, 0.5, 1.0, 1.5, 2.0, 0.8]
  radius = 40 // 20
  ours = np.asarray(jax.jit(device_augment.gaussian_blur, static_argnums=2)(x, jnp.asarray(sigmas), radius))
  np.testing.assert_allclose(ours, per_image(lambda i, s: augment.gaussian_blur(i, s, radius), x, sigmas),
                             atol=2e-6)


def test_jitter_applies_each_examples_changes_in_its_drawn_order():
  """The device jitter equals the host's four changes applied one example at a time, at the example's
  drawn factors and in its drawn order (re-drawn here from the same key folds)."""
  view = resolve_view({"color_jitter_strength": 1.0})
  x = images(2, batch=8)
  key = jax.random.key(3)
  ours = np.asarray(device_augment.color_jitter(jnp.asarray(x), key, view))
  b_key, c_key, s_key, h_key = jax.random.split(jax.random.fold_in(key, device_augment._JITTER_FACTORS), 4)
  draw = lambda k, lo, hi: np.asarray(jax.random.uniform(k, (8,), jnp.float32, lo, hi))
  b, c, s, h = draw(b_key, 0.2, 1.8), draw(c_key, 0.2, 1.8), draw(s_key, 0.2, 1.8), draw(h_key, -0.2, 0.2)
  order = np.argsort(np.asarray(jax.random.uniform(jax.random.fold_in(key, device_augment._JITTER_ORDER), (8, 4))),
                     axis=1)
  assert len({tuple(o) for o in order}) > 1  # the examples do not share one order
  for n in range(8):
    img = tf.constant(x[n])
    ops = [lambda i: augment.adjust_brightness(i, b[n]), lambda i: augment.adjust_contrast(i, c[n]),
           lambda i: tf.clip_by_value(tf.image.adjust_saturation(i, s[n]), 0., 1.),
           lambda i: tf.clip_by_value(tf.image.adjust_hue(i, h[n]), 0., 1.)]
    for k in order[n]:
      img = ops[k](img)
    np.testing.assert_allclose(ours[n], np.asarray(img), atol=1e-5)


def test_apply_probabilities_are_the_views():
  """Over 4,000 examples each op's share of changed images is its probability (4 standard errors); the
  blur's sigma lies in its range."""
  n = 4000
  x = jnp.asarray(images(4, batch=n, size=4)) * 0.9 + 0.05   # colourful, no pixel at the solarize threshold
  key = jax.random.key(0)
  for view, p in [({"color_jitter_prob": 0.8, "grayscale_prob": 0.0}, 0.8),
                  ({"color_jitter_prob": 0.0, "grayscale_prob": 0.2}, 0.2),
                  ({"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "solarize_prob": 0.2}, 0.2)]:
    out = device_augment.augment_view(view, x, key)
    changed = np.asarray(jnp.any(jnp.abs(out - x) > 1e-6, axis=(1, 2, 3))).mean()
    assert abs(changed - p) < 4 * np.sqrt(p * (1 - p) / n), (view, changed)
  # Blur: 20-pixel crops (radius 1); a sigma drawn at the range's ends blurs by the range's extremes.
  y = jnp.asarray(images(5, batch=n, size=20))
  out = device_augment.augment_view({"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.5}, y, key)
  changed = np.asarray(jnp.any(jnp.abs(out - y) > 1e-6, axis=(1, 2, 3))).mean()
  assert abs(changed - 0.5) < 4 * np.sqrt(0.25 / n)


def test_eight_devices_give_the_views_of_one():
  assert jax.device_count() == 8
  views = [resolve_view({"crop_size": 24, "blur_prob": 1.0, "solarize_prob": 0.2}), resolve_view({"crop_size": 24})]
  batch = (images(6, batch=16, size=24), images(7, batch=16, size=24))
  key = jax.random.key(11)
  fn = jax.jit(lambda v, k: device_augment.apply(views, v, k, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), True))
  one = jax.device_get(fn(batch, key))
  mesh = parallel.make_mesh(jax.devices())
  eight = jax.device_get(fn(parallel.to_global(mesh, {"v": batch})["v"], key))
  for a, b in zip(one, eight):
    # Same draws (a different one would differ by O(1)); the contrast's per-image mean is summed in
    # another order on a sharded batch: ~1e-6 after the division by std.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  assert not np.allclose(one[0], (batch[0] - 0.4) / 0.2)  # something was applied


def simclr_config(**settings):
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.update(data_dir=EMBEDDED_DATA_DIR, batch_size=16, total_steps=4, shuffle_buffer=256, **settings)
  return cfg


def test_host_yields_the_same_crops_and_flips_unnormalized():
  cfg = simclr_config(normalize_inputs=True)
  views = [dict(v) for v in config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny").views.values()
           for _ in range(v.num)]
  views = [{k: v for k, v in view.items() if k not in ("num", "order")} for view in views]
  ours = next(pipeline.pretrain_batches(cfg, views, 16, device_ops=True))
  reference_cfg = simclr_config(normalize_inputs=False)
  reference = next(pipeline.pretrain_batches(reference_cfg, device_augment.host_views(views), 16))
  for a, b in zip(ours["views"], reference["views"]):
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_a_run_with_the_ops_on_the_device_resumes_bit_for_bit(tmp_path, monkeypatch):
  cfg = simclr_config(augment_on_device=True)
  cfg.views.view.blur_prob = 0.5  # every op of the path in use (CIFAR's recipe has no blur)
  cfg.views.view.solarize_prob = 0.2
  traced = []  # the train step calls the device ops while it is traced
  original = device_augment.apply

  def spy(views, images, key, mean, std, normalize):
    traced.append((len(views), [v["blur_prob"] for v in views], normalize))
    return original(views, images, key, mean, std, normalize)

  monkeypatch.setattr(device_augment, "apply", spy)
  stop_and_resume(cfg, tmp_path)
  assert traced and traced[0] == (2, [0.5, 0.5], False)  # SimCLR's views stay [0, 1] pixels


def test_host_only_views_are_refused_in_one_line():
  cfg = simclr_config(augment_on_device=True)
  cfg.views.view.randaugment_layers = 2
  with pytest.raises(ConfigError, match="augment_on_device=True: view 0 uses RandAugment"):
    config_lib.validate(config_lib.resolve(cfg, 4000), 8)
