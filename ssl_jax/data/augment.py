"""Stateless tf.data augmentations for SimCLR, BYOL, MoCo v2 and multi-crop methods.

Every random choice is drawn with `tf.random.stateless_*` ops from an explicit seed (an int32/int64 tensor of
shape [2]), so the same image with the same seed always gives the same pixels. The input pipeline relies on
this to resume a run by skipping elements.

A view is described by a plain dict or ml_collections.ConfigDict whose keys are those of VIEW_DEFAULTS. The
ops run in the order of SimCLR (Chen et al. 2020, Appendix A) and BYOL (Grill et al. 2020, Appendix B):
    random resized crop -> horizontal flip -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p)
    -> solarize (p) -> RandAugment (randaugment.py; supervised fine-tuning only);
and random erasing after the mean/std normalization (erase_views). All images after the crop are float32 in
[0, 1].
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from ssl_jax.data import randaugment
from ssl_jax.data import views as views_lib


# Sub-seeds of one view, one per random decision. Fixed indices keep every draw independent of which ops a
# view enables, so changing e.g. blur_prob does not change the crops.
(_SEED_CROP, _SEED_FLIP, _SEED_JITTER_APPLY, _SEED_JITTER, _SEED_GRAY, _SEED_BLUR_APPLY, _SEED_BLUR_SIGMA,
 _SEED_SOLARIZE, _NUM_SEEDS) = range(9)
# Later additions fold these into the view's seed instead of widening the split above, which would change
# every existing view's draws.
_FOLD_RANDAUGMENT, _FOLD_ERASE = _NUM_SEEDS, _NUM_SEEDS + 1


# The view settings, validated (views.py: no TensorFlow there, the device-side ops read them too).
_resolve_view = views_lib.resolve_view
VIEW_DEFAULTS = views_lib.VIEW_DEFAULTS


def _uniform(seed: tf.Tensor, minval, maxval) -> tf.Tensor:
  """A float32 scalar ~ U[minval, maxval) drawn statelessly from `seed`."""
  return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _maybe_apply(fn: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor, prob: float,
                 seed: tf.Tensor) -> tf.Tensor:
  """fn(image) with probability `prob` (a Bernoulli draw from `seed`), else image.

  prob 0 and 1 are resolved at trace time so that disabled ops cost nothing; the draw U[0, 1) < prob gives
  the same decisions, so this does not change any output.
  """
  if prob <= 0:
    return image
  if prob >= 1:
    return fn(image)
  return tf.cond(_uniform(seed, 0.0, 1.0) < prob, lambda: fn(image), lambda: image)


def sample_crop_box(image_shape: tf.Tensor, seed: tf.Tensor, crop_scale: Tuple[float, float] = (0.08, 1.0),
                    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[tf.Tensor, tf.Tensor]:
  """Samples the box of an Inception-style random resized crop (Szegedy et al. 2015; SimCLR App. A).

  Args:
    image_shape: int [3] tensor, the (height, width, channels) of the image.
    seed: int32/int64 [2].
    crop_scale: range of the box area as a fraction of the image area.
    crop_ratio: range of the box aspect ratio width / height.
  Returns:
    (offset, size): int32 [2] tensors, the box's top-left corner (y, x) and its (height, width).
  """
  # min_object_covered=0 makes crop_scale the only constraint on the area. SimCLR's code passes 0.1, which
  # silently raises the lower end of its (0.08, 1) area range to 0.1. After max_attempts failures the op
  # returns the whole image (SimCLR's code falls back to a centre crop instead).
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.cast(image_shape, tf.int32), bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=crop_ratio, area_range=crop_scale, max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def _resize_crop(crop: tf.Tensor, crop_size: int) -> tf.Tensor:
  """uint8 [h, w, 3] (a box already cut out) -> resized bicubically to float32 [crop_size, crop_size, 3] in
  [0, 1]. A crop of side crop_size returns crop / 255 exactly."""
  # Cast before resizing: tf.image.resize returns its input unchanged (still uint8) when the static shape
  # already matches.
  crop = tf.image.resize(tf.cast(crop, tf.float32), [crop_size, crop_size], method="bicubic")
  # Bicubic interpolation overshoots near edges.
  return tf.ensure_shape(tf.clip_by_value(crop / 255.0, 0.0, 1.0), [crop_size, crop_size, 3])


def _slice_box(image: tf.Tensor, offset: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  return tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [3]], 0))


def _crop_and_resize(image: tf.Tensor, offset: tf.Tensor, size: tf.Tensor, crop_size: int) -> tf.Tensor:
  """uint8 [H, W, 3] -> the box (offset, size) resized bicubically to float32 [crop_size, crop_size, 3] in
  [0, 1]. A box equal to the image with crop_size equal to its side returns image / 255 exactly."""
  return _resize_crop(_slice_box(image, offset, size), crop_size)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, crop_size: int,
                        crop_scale: Tuple[float, float] = (0.08, 1.0),
                        crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """uint8 [H, W, 3] -> float32 [crop_size, crop_size, 3] in [0, 1]: a box from `sample_crop_box`, resized
  bicubically (as SimCLR's code)."""
  offset, size = sample_crop_box(tf.shape(image), seed, crop_scale, crop_ratio)
  return _crop_and_resize(image, offset, size, crop_size)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """float [..., 3] -> its luma (ITU-R 601, tf.image.rgb_to_grayscale) repeated on 3 channels."""
  return tf.tile(tf.image.rgb_to_grayscale(image), [1] * (image.shape.rank - 1) + [3])


def adjust_brightness(image: tf.Tensor, amount: tf.Tensor, impl: str = "simclrv2") -> tf.Tensor:
  """float [H, W, 3] in [0, 1]; `amount` is a factor (simclrv2: image * amount, like torchvision) or an
  offset (simclrv1: image + amount, like tf.image.adjust_brightness). Clipped to [0, 1]."""
  out = image * amount if impl == "simclrv2" else image + amount
  return tf.clip_by_value(out, 0.0, 1.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """float [H, W, 3] in [0, 1] -> (image - m) * factor + m, clipped to [0, 1], where m is the mean of the
  image's grayscale, one scalar per image (as torchvision; tf.image.adjust_contrast uses per-channel
  means, which also shifts the colours)."""
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return tf.clip_by_value((image - mean) * factor + mean, 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, brightness: float, contrast: float, saturation: float,
                 hue: float, impl: str = "simclrv2") -> tf.Tensor:
  """SimCLR's colour distortion (Chen et al. 2020, Appendix A): brightness, contrast, saturation and hue
  changes in a random order, each clipped to [0, 1]. A magnitude of 0 disables that change.

  Args:
    image: float32 [H, W, 3] in [0, 1].
    seed: int32/int64 [2].
    brightness: b; factor ~ U[max(0, 1 - b), 1 + b] (simclrv2) or offset ~ U[-b, b] (simclrv1).
    contrast, saturation: c; factor ~ U[max(0, 1 - c), 1 + c].
    hue: h <= 0.5; hue rotation ~ U[-h, h] of a full turn.
    impl: "simclrv2" or "simclrv1", the brightness variant.
  Returns:
    float32 [H, W, 3] in [0, 1].
  """
  order_seed, b_seed, c_seed, s_seed, h_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
  if impl == "simclrv2":
    b = _uniform(b_seed, max(0.0, 1.0 - brightness), 1.0 + brightness)
  else:
    b = _uniform(b_seed, -brightness, brightness)
  c = _uniform(c_seed, max(0.0, 1.0 - contrast), 1.0 + contrast)
  s = _uniform(s_seed, max(0.0, 1.0 - saturation), 1.0 + saturation)
  h = _uniform(h_seed, -hue, hue)

  ops = []
  if brightness > 0:
    ops.append(lambda x: adjust_brightness(x, b, impl))
  if contrast > 0:
    ops.append(lambda x: adjust_contrast(x, c))
  if saturation > 0:
    ops.append(lambda x: tf.clip_by_value(tf.image.adjust_saturation(x, s), 0.0, 1.0))
  if hue > 0:
    ops.append(lambda x: tf.clip_by_value(tf.image.adjust_hue(x, h), 0.0, 1.0))
  if len(ops) <= 1:
    return ops[0](image) if ops else image
  # A uniformly random permutation: the argsort of i.i.d. uniforms.
  order = tf.argsort(tf.random.stateless_uniform([len(ops)], order_seed))  # int32
  for i in range(len(ops)):
    image = tf.switch_case(order[i], [functools.partial(op, image) for op in ops])
  return image


def _reflect_blur_matrix(n, kernel: tf.Tensor, radius: int) -> tf.Tensor:
  """float32 [n, n] M with (M @ x)[i] = sum_t kernel[t] x[reflect(i + t - radius)]: a 1-D filter over a
  signal of length n, reflect-padded (the edge sample not repeated, as tf.pad's REFLECT and torchvision);
  taps that reflect onto one sample add up."""
  rows = tf.range(n)[:, None]
  cols = tf.abs(rows + tf.range(-radius, radius + 1)[None, :])      # reflected at 0
  cols = (n - 1) - tf.abs((n - 1) - cols)                            # and at n - 1
  index = tf.stack([tf.broadcast_to(rows, tf.shape(cols)), cols], -1)
  weights = tf.broadcast_to(kernel[None, :], tf.shape(cols))
  return tf.scatter_nd(tf.reshape(index, [-1, 2]), tf.reshape(weights, [-1]), tf.stack([n, n]))


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
  """Separable Gaussian blur of float32 [H, W, C] with a (2 * radius + 1)-tap kernel of std `sigma` pixels.

  The image is reflect-padded (like torchvision's GaussianBlur), so a constant image stays constant up to
  its borders; SimCLR's code zero-pads, which darkens the borders. Each pass is a matrix product with the
  banded [H, H] or [W, W] filter matrix: with TensorFlow's oneDNN kernels off (ssl_jax/__init__.py) its
  depthwise convolution took 13 ms per 224 x 224 view on one core, the products 2 ms (same values to
  float rounding).
  """
  if radius < 1:
    return image
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / tf.cast(sigma, tf.float32)))
  kernel /= tf.reduce_sum(kernel)
  shape = tf.shape(image)
  channels_first = tf.transpose(image, [2, 0, 1])                                          # [C, H, W]
  out = tf.matmul(_reflect_blur_matrix(shape[0], kernel, radius), channels_first)         # along H
  out = tf.matmul(out, _reflect_blur_matrix(shape[1], kernel, radius), transpose_b=True)  # along W
  return tf.transpose(out, [1, 2, 0])


def solarize(image: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
  """float [..., C] in [0, 1]: pixels >= threshold become 1 - x (BYOL, Grill et al. 2020, Appendix B)."""
  return tf.where(image >= threshold, 1.0 - image, image)


def view_transform(view: Mapping, image: tf.Tensor, seed: tf.Tensor,
                   mean: Sequence[float] = (0.5, 0.5, 0.5)) -> tf.Tensor:
  """One augmented view of an image (random erasing, which follows normalization, is erase_views).

  Args:
    view: dict or ConfigDict with keys of VIEW_DEFAULTS (missing keys take the defaults).
    image: uint8 [H, W, 3], any size.
    seed: int32/int64 [2]; the output is a deterministic function of (view, image, seed).
    mean: the dataset's per-channel mean in [0, 1]: RandAugment's fill for uncovered pixels.
  Returns:
    float32 [crop_size, crop_size, 3] in [0, 1], not mean/std normalized.
  Raises:
    ValueError: for an unknown key or an invalid value in `view`.
  """
  image = _check_decoded(image, "view_transform")
  return _view(_resolve_view(view), tf.shape(image), functools.partial(_slice_box, image), seed, mean)


def _check_decoded(image: tf.Tensor, caller: str) -> tf.Tensor:
  image = tf.ensure_shape(tf.convert_to_tensor(image), [None, None, 3])
  if image.dtype != tf.uint8:
    raise TypeError(f"{caller} expects a uint8 image, got {image.dtype.name}")
  return image


def _view(cfg: Dict[str, Any], image_shape: tf.Tensor, cut: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
          seed: tf.Tensor, mean: Sequence[float]) -> tf.Tensor:
  """view_transform of an image known by its shape (int [3]) and `cut(offset, size)`, which returns the
  uint8 pixels of a box: a slice of the decoded image, or a JPEG decoded only inside the box."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), _NUM_SEEDS))
  size = cfg["crop_size"]

  offset, box = sample_crop_box(image_shape, seeds[_SEED_CROP], cfg["crop_scale"], cfg["crop_ratio"])
  out = _resize_crop(cut(offset, box), size)
  out = _maybe_apply(tf.image.flip_left_right, out, cfg["flip_prob"], seeds[_SEED_FLIP])
  jitter = functools.partial(color_jitter, seed=seeds[_SEED_JITTER], brightness=cfg["brightness"],
                             contrast=cfg["contrast"], saturation=cfg["saturation"], hue=cfg["hue"],
                             impl=cfg["color_jitter_impl"])
  out = _maybe_apply(jitter, out, cfg["color_jitter_prob"], seeds[_SEED_JITTER_APPLY])
  out = _maybe_apply(to_grayscale, out, cfg["grayscale_prob"], seeds[_SEED_GRAY])
  # Kernel side 10% of the crop side, made odd (SimCLR App. A; BYOL App. B gives 23 px for 224 px crops).
  sigma = _uniform(seeds[_SEED_BLUR_SIGMA], *cfg["blur_sigma"])
  blur = functools.partial(gaussian_blur, sigma=sigma, radius=size // 20)
  out = _maybe_apply(blur, out, cfg["blur_prob"], seeds[_SEED_BLUR_APPLY])
  out = _maybe_apply(functools.partial(solarize, threshold=cfg["solarize_threshold"]), out,
                     cfg["solarize_prob"], seeds[_SEED_SOLARIZE])
  if cfg["randaugment_layers"]:
    out = randaugment.rand_augment(
        out, tf.random.experimental.stateless_fold_in(tf.convert_to_tensor(seed), _FOLD_RANDAUGMENT),
        cfg["randaugment_layers"], cfg["randaugment_magnitude"], cfg["randaugment_magnitude_std"], mean)
  return tf.ensure_shape(out, [size, size, 3])


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """A scalar string of an encoded image file (JPEG, PNG, BMP, GIF's first frame) -> uint8 [H, W, 3]; the
  pixels TFDS's default decoding gives."""
  return tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False), [None, None, 3])


def _jpeg_shape(encoded: tf.Tensor) -> tf.Tensor:
  """int32 [3]: (height, width, 3) of a JPEG read from its header (the decoded image has 3 channels)."""
  return tf.concat([tf.image.extract_jpeg_shape(encoded)[:2], [3]], 0)


# Columns decoded on each side of a box beyond it, then dropped. libjpeg decodes a window as if its left and
# right edges were the image's: the chroma upsampling of the window's first and last columns then lacks
# its outer neighbour, and those columns differ from the whole image's decoding (up to 24 of 255 levels
# on 0.05% of the pixels of 2-view SimCLR crops of 4:2:0 JPEGs, quality 90). One chroma sample of
# context suffices (2 px at 4:2:0, 4 at 4:1:1); 8 px leaves margin at a negligible cost.
_JPEG_BOX_MARGIN = 8


def _jpeg_box(encoded: tf.Tensor, image_shape: tf.Tensor, offset: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """uint8 [h, w, 3]: the box (offset, size) of a JPEG of shape `image_shape`, decoded only inside the box
  widened by _JPEG_BOX_MARGIN columns (libjpeg skips the rows above and below and the blocks left and
  right); the same pixels as the whole image decoded, then sliced."""
  left = tf.maximum(offset[1] - _JPEG_BOX_MARGIN, 0)
  right = tf.minimum(offset[1] + size[1] + _JPEG_BOX_MARGIN, image_shape[1])
  window = tf.image.decode_and_crop_jpeg(encoded, tf.stack([offset[0], left, size[0], right - left]),
                                         channels=3)
  return tf.slice(window, tf.stack([0, offset[1] - left, 0]), tf.concat([size, [3]], 0))


# multi_view_transform of an encoded JPEG decodes each view's box alone while there are at most this many
# views, and decodes the whole image once for all views beyond it (docs/input_pipeline.md measures both).
FUSED_DECODE_MAX_VIEWS = 2


def multi_view_transform(views: Sequence[Mapping], image: tf.Tensor, seed: tf.Tensor,
                         mean: Sequence[float] = (0.5, 0.5, 0.5),
                         fused_max_views: Optional[int] = None) -> Tuple[tf.Tensor, ...]:
  """Applies each view to `image`, view i with sub-seed i of stateless_split(seed, len(views)).

  Args:
    views: view configs, as for view_transform (possibly with different crop sizes, e.g. multi-crop).
    image: uint8 [H, W, 3]; or a scalar string, the image's encoded file. A JPEG (tf.io.is_jpeg, decided
      per image) with at most `fused_max_views` views is decoded once per view, only inside the view's
      crop box (tf.image.decode_and_crop_jpeg); any other file, or a JPEG with more views, is decoded
      whole once and cropped. The boxes and every other draw are those of the decoded image's.
    seed: int32/int64 [2].
    mean: as for view_transform.
    fused_max_views: see `image`; None reads FUSED_DECODE_MAX_VIEWS; 0 never decodes a box alone.
  Returns:
    A tuple with one float32 [crop_size_i, crop_size_i, 3] tensor in [0, 1] per view.
  """
  seeds = tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), len(views))
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.string:
    return tuple(view_transform(view, image, seeds[i], mean) for i, view in enumerate(views))
  encoded = image

  def decoded():
    return multi_view_transform(views, decode(encoded), seed, mean)

  if len(views) > (FUSED_DECODE_MAX_VIEWS if fused_max_views is None else fused_max_views):
    return decoded()

  def fused():
    shape = _jpeg_shape(encoded)
    cut = functools.partial(_jpeg_box, encoded, shape)
    return tuple(_view(_resolve_view(view), shape, cut, seeds[i], mean)
                 for i, view in enumerate(views))

  return tf.cond(tf.io.is_jpeg(encoded), fused, decoded)


def erase_views(views: Sequence[Mapping], images: Sequence[tf.Tensor], seed: tf.Tensor,
                fill_mean: Sequence[float], fill_std: Sequence[float]) -> Tuple[tf.Tensor, ...]:
  """Random erasing of the views that set erase_prob, on the images multi_view_transform(views, image,
  seed) gave after their normalization (fill_mean 0, fill_std 1 when they are normalized; the dataset's
  mean and std when they are not, which is the same noise in pixel space)."""
  seeds = tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), len(views))
  out = []
  for i, (view, image) in enumerate(zip(views, images)):
    prob = _resolve_view(view)["erase_prob"]
    if prob > 0:
      image = randaugment.random_erase(image, tf.random.experimental.stateless_fold_in(seeds[i], _FOLD_ERASE),
                                       prob, fill_mean, fill_std)
    out.append(image)
  return tuple(out)


def eval_transform(image: tf.Tensor, crop_size: int, crop_proportion: float) -> tf.Tensor:
  """Deterministic evaluation view: a centred square crop of side floor(crop_proportion * shorter side),
  resized bicubically to crop_size (SimCLR's code; 0.875 for ImageNet gives the usual 224 / 256).

  Args:
    image: uint8 [H, W, 3]; or a scalar string, the encoded file (a JPEG is decoded only inside the crop,
      as in multi_view_transform).
    crop_size: side of the output.
    crop_proportion: in (0, 1], the crop side relative to the shorter image side.
  Returns:
    float32 [crop_size, crop_size, 3] in [0, 1]; image / 255 exactly when crop_proportion is 1 and the image
    is square with side crop_size.
  """
  if not 0 < crop_proportion <= 1:
    raise ValueError(f"crop_proportion must lie in (0, 1], got {crop_proportion!r}")

  def centre_box(hw):
    side = tf.cast(crop_proportion * tf.cast(tf.reduce_min(hw), tf.float64), tf.int32)
    # Centre, rounding the offset up when the margin is odd (as SimCLR's center_crop).
    return (hw - side + 1) // 2, tf.stack([side, side])

  def decoded(image):
    image = _check_decoded(image, "eval_transform")
    return _crop_and_resize(image, *centre_box(tf.shape(image)[:2]), crop_size)

  image = tf.convert_to_tensor(image)
  if image.dtype != tf.string:
    return decoded(image)

  def fused():
    shape = _jpeg_shape(image)
    return _resize_crop(_jpeg_box(image, shape, *centre_box(shape[:2])), crop_size)

  return tf.cond(tf.io.is_jpeg(image), fused, lambda: decoded(decode(image)))


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """(image - mean) / std per channel; image float [..., C], mean and std of length C."""
  mean = tf.constant(mean, image.dtype)
  std = tf.constant(std, image.dtype)
  return (image - mean) / std
