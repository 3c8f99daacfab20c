"""The encoded-image path of the input pipeline: a JPEG decoded only inside each view's crop box gives the
pixels of the whole image decoded then cropped; other formats are decoded then cropped as before; the
pre-training stream over JPEGs resumes exactly and is a function of the seed."""

import io
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax import config as config_lib
from ssl_jax.data import augment, pipeline
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR, IMAGENET_MEAN, IMAGENET_STD

REPO = pathlib.Path(__file__).resolve().parent.parent
# Two global views and a small one, everything on (exercises every tf.cond branch).
VIEWS = [dict(crop_size=32, blur_prob=0.5, solarize_prob=0.2), dict(crop_size=32, color_jitter_strength=0.5),
         dict(crop_size=16, crop_scale=(0.05, 0.4))]


def _photo(h, w, seed):
  """A smooth image with texture, so that a JPEG of it has real chroma detail."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w] / max(h, w)
  base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)),
                   np.sin(4 * (x + y))], -1)
  return np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(image, fmt, **kwargs):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


# 4:2:0 (PIL's default), 4:4:4 and 4:2:2 chroma, odd sizes, and a grayscale JPEG.
JPEGS = [_encode(_photo(77, 91, 0), "JPEG", quality=90), _encode(_photo(64, 50, 1), "JPEG", subsampling=0),
         _encode(_photo(49, 83, 2), "JPEG", quality=75, subsampling=1),
         _encode(_photo(60, 60, 3)[..., 0], "JPEG")]


@pytest.mark.parametrize("index", range(len(JPEGS)))
def test_fused_decode_equals_decode_then_crop_on_jpegs(index):
  encoded = tf.constant(JPEGS[index])
  assert bool(tf.io.is_jpeg(encoded))
  decoded = augment.decode(encoded)
  for seed in range(3):
    s = tf.constant([seed, index], tf.int64)
    whole = augment.multi_view_transform(VIEWS[:2], decoded, s)
    # At most FUSED_DECODE_MAX_VIEWS views: one box decode per view; fused_max_views=0: one whole decode.
    for fused_max_views in (None, 0):
      out = augment.multi_view_transform(VIEWS[:2], encoded, s, fused_max_views=fused_max_views)
      for a, b in zip(whole, out):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Three views: the whole image decoded once, shared.
    for a, b in zip(augment.multi_view_transform(VIEWS, decoded, s), augment.multi_view_transform(VIEWS, encoded, s)):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  for proportion in (0.875, 1.0):
    np.testing.assert_array_equal(augment.eval_transform(decoded, 24, proportion).numpy(),
                                  augment.eval_transform(encoded, 24, proportion).numpy())


def test_png_path_equals_tfds_decoding():
  """CIFAR-10 (PNG in TFDS): the bytes decoded here are TFDS's pixels, so every view is unchanged."""
  builder = pipeline.get_builder("cifar10", EMBEDDED_DATA_DIR)
  decoded = list(tfds.as_numpy(builder.as_dataset(split="train[:4]")))
  encoded = list(builder.as_dataset(split="train[:4]", decoders={"image": tfds.decode.SkipDecoding()}))
  for i, (d, e) in enumerate(zip(decoded, encoded)):
    assert not bool(tf.io.is_jpeg(e["image"]))
    np.testing.assert_array_equal(augment.decode(e["image"]).numpy(), d["image"])
    s = tf.constant([7, i], tf.int64)
    for a, b in zip(augment.multi_view_transform(VIEWS[:2], d["image"], s),
                    augment.multi_view_transform(VIEWS[:2], e["image"], s)):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(augment.eval_transform(d["image"], 32, 1.0).numpy(),
                                  augment.eval_transform(e["image"], 32, 1.0).numpy())


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
  """A TFDS dataset named imagenet2012 of 40 mixed JPEG (3 in 4) and PNG images, 40-70 px a side."""
  root = tmp_path_factory.mktemp("jpeg_tfds")
  rng = np.random.default_rng(0)
  rows = {}
  for split, count in (("train", 40), ("validation", 10)):
    rows[split] = []
    for i in range(count):
      image = _photo(int(rng.integers(40, 70)), int(rng.integers(40, 70)), 100 + i)
      path = root / f"{split}_{i}.{'png' if i % 4 == 3 else 'jpg'}"
      path.write_bytes(_encode(image, "PNG" if i % 4 == 3 else "JPEG", quality=90))
      rows[split].append((i, {"image": str(path), "label": i % 10}))
  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                         "label": tfds.features.ClassLabel(num_classes=1000)})
  tfds.dataset_builders.store_as_tfds_dataset(name="imagenet2012", version="5.0.0", features=features,
                                              split_datasets=rows, data_dir=str(root))
  return root


def _config(data_dir, seed=0):
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.dataset, cfg.data_dir, cfg.seed = "imagenet2012", str(data_dir), seed
  cfg.batch_size, cfg.shuffle_buffer = 8, 16
  return config_lib.resolve(cfg, 40)


def _steps(cfg, start, count):
  batches = pipeline.pretrain_batches(cfg, VIEWS[:2], 8, start_step=start)
  return [next(batches) for _ in range(count)]


def test_jpeg_stream_resumes_exactly_and_follows_the_seed(jpeg_dir):
  cfg = _config(jpeg_dir)
  uninterrupted = _steps(cfg, 0, 7)  # past the first epoch (5 steps of 8)
  resumed = _steps(cfg, 4, 3)
  for a, b in zip(uninterrupted[4:], resumed):
    np.testing.assert_array_equal(a["index"], b["index"])
    for x, y in zip(a["views"], b["views"]):
      np.testing.assert_array_equal(x, y)
  again = _steps(cfg, 0, 2)
  other = _steps(_config(jpeg_dir, seed=1), 0, 2)
  for a, b, c in zip(uninterrupted, again, other):
    np.testing.assert_array_equal(a["views"][0], b["views"][0])
    assert not np.array_equal(a["views"][0], c["views"][0])


def test_jpeg_eval_batches_equal_decode_then_crop(jpeg_dir):
  cfg = _config(jpeg_dir)
  batch = next(pipeline.eval_batches(cfg, "validation", 16, 24, 0.875))
  assert batch["mask"].sum() == 10
  builder = pipeline.get_builder("imagenet2012", str(jpeg_dir))
  for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False))):
    expected = augment.eval_transform(ex["image"], 24, 0.875)
    if cfg.normalize_inputs:
      expected = augment.normalize(expected, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_array_equal(batch["image"][i], expected.numpy())
