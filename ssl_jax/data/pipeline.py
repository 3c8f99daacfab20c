"""tf.data input pipelines over prepared TFDS datasets.

Pre-training stream (`pretrain_batches`), per process:
  read this process's contiguous shard of the split, images still encoded -> attach each example's global
  index -> [cache] -> repeat -> shuffle (seeded) -> count elements -> skip the elements already consumed
  (resume) -> decode and augment every view with stateless ops seeded by (seed, element count) -> batch
  (drop_remainder) -> prefetch.
Every random choice is a function of the seed and the element's position in the stream, so a run that
resumes at step s (skipping s * local_batch elements before any decoding or augmentation) sees exactly
the batches an uninterrupted run sees.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from ssl_jax.data import augment, datasets, integrity
# Defined beside the file checks (which raise it without importing TF); pipeline.DataError is the name
# callers use.
from ssl_jax.data.integrity import DataError

# The input pipeline runs on the host CPU; TF must not claim accelerators that JAX uses.
tf.config.set_visible_devices([], "GPU")


def _prepare_command(name: str, data_dir: str) -> str:
  hint = datasets.DATASETS[name].prepare_hint if name in datasets.DATASETS else None
  return hint or (f"prepare it with: python -c \"import tensorflow_datasets as tfds; "
                  f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"")


def get_builder(dataset: str, data_dir: str, splits: Sequence[str] = ()) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `dataset` under `data_dir`; never downloads. Raises DataError.

  splits: split names ("train", "train+unlabelled") whose record files are checked against the dataset's
  metadata first (integrity.check_split_files: a stat per file, once per process), so that a missing or
  damaged file is named in one line before anything compiles instead of failing a minute in."""
  info = datasets.get(dataset)
  if not data_dir:
    raise DataError("data_dir is not set: pass --config.data_dir=DIR (a prepared TFDS directory)")
  if not epath.Path(data_dir).exists():
    raise DataError(f"data_dir {data_dir} does not exist; {_prepare_command(dataset, data_dir)}")
  # The newest prepared version under DATA_DIR/<name>/, read with the features stored on disk (as TFDS
  # does for a prepared copy), so a copy prepared by another TFDS version or by hand reads as it is.
  root = epath.Path(data_dir) / info.tfds_name
  versions = sorted((d for d in root.iterdir() if (d / "dataset_info.json").exists()),
                    key=lambda d: tuple(int(p) if p.isdigit() else 0 for p in d.name.split("."))) \
      if root.exists() else []
  if not versions:
    raise DataError(f"no prepared {info.tfds_name} in {data_dir}; {_prepare_command(dataset, data_dir)}")
  try:
    builder = tfds.builder_from_directory(str(versions[-1]))
  except Exception as e:  # tfds raises many types for unreadable metadata
    raise DataError(f"cannot read dataset {dataset} in {versions[-1]}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}")
  for split in splits:
    integrity.check_split_files(builder, split)
  return builder


def builder_of(cfg, splits: Sequence[str] = ()):
  """The builder of cfg.dataset: get_builder's, or for dataset=folder the indexed image folder (folder.py),
  which has the methods of a TFDS builder that the pipeline uses."""
  if cfg.dataset == "folder":
    from ssl_jax.data import folder
    return folder.builder(cfg)
  return get_builder(cfg.dataset, cfg.data_dir, splits)


class _NamedReadErrors:
  """Wraps a numpy batch iterator of `split`: a TF op error raised by next() (a record that fails its
  checksum, a file truncated or removed after the up-front check) becomes a one-line DataError naming the
  damaged file, where TF's own message names none. Errors that are not about the data keep their
  traceback."""

  def __init__(self, batches: Iterator, builder, split: str):
    self._batches, self._builder, self._split = batches, builder, split

  def __iter__(self):
    return self

  def __next__(self):
    try:
      return next(self._batches)
    except tf.errors.OpError as e:
      error = integrity.read_error(self._builder, self._split, e)
      if error is None:
        raise
      raise error from e


def num_examples(builder, split: str) -> int:
  return sum(builder.info.splits[s].num_examples for s in split.split("+"))


def shard_split(builder, split: str, shard: int, num_shards: int):
  """[(split slice string, global index of its first example)] of one contiguous shard, one entry per part
  of a split like "train+unlabelled" (parts are numbered one after the other).

  Every shard gets the same number of examples (the remainder is dropped), so every input stream runs
  the same number of steps."""
  parts, offset = [], 0
  for name in split.split("+"):
    n = builder.info.splits[name].num_examples
    per = n // num_shards
    parts.append((f"{name}[{shard * per}:{(shard + 1) * per}]", offset + shard * per))
    offset += n
  return parts


# Images are read as their encoded files and decoded inside the augmentation, where a JPEG is decoded only
# inside each view's crop box (augment.multi_view_transform, eval_transform); the pixels are those of
# TFDS's default decoding.
_ENCODED = {"image": tfds.decode.SkipDecoding()}


def _read(builder, split: str, shard: int, num_shards: int) -> tf.data.Dataset:
  """One shard's examples as {"image": string (the encoded file), "label": int32, "index": int64
  (global), "file_name": string ("" where the dataset has none)}."""
  has_label = "label" in builder.info.features
  has_name = "file_name" in builder.info.features
  ds = None
  for split_string, first_index in shard_split(builder, split, shard, num_shards):
    part = builder.as_dataset(split=split_string, shuffle_files=False,
                              read_config=tfds.ReadConfig(interleave_cycle_length=1),
                              decoders=_ENCODED).enumerate(start=first_index)
    ds = part if ds is None else ds.concatenate(part)
  return ds.map(lambda i, ex: {"image": ex["image"],
                               "label": tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1),
                               "index": i, "file_name": ex["file_name"] if has_name else tf.constant("")},
                num_parallel_calls=tf.data.AUTOTUNE)


def _graph_fn(fn: Callable) -> Callable:
  """`fn` for Dataset.map without AutoGraph's conversion: the augmentations branch with explicit tf.cond
  and loop over static ranges only, so the conversion changes no graph (same batches, bit for bit) but
  took 60% of building a pre-training pipeline (4.0 s -> 1.6 s for BYOL's two views), which every
  train, resume and evaluation pays. Python control flow on a tensor fails to trace, loudly."""
  return tf.autograph.experimental.do_not_convert(fn)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
  return options


def num_data_shards(cfg, process_count: int) -> int:
  """cfg.data_shards, or one shard per process when it is 0."""
  return cfg.data_shards or process_count


def pretrain_batches(
    cfg, views: Sequence[Dict[str, Any]], local_batch: int, start_step: int = 0,
    process_index: int = 0, process_count: int = 1, split: Optional[str] = None,
    keep: Optional[Callable[[Dict[str, tf.Tensor]], tf.Tensor]] = None,
    device_ops: bool = False) -> Iterator[Dict[str, Any]]:
  """Yields numpy batches {"views": tuple of float32 [local_batch, s, s, 3], "label": int32 [local_batch],
  "index": int64 [local_batch]} for steps start_step, start_step + 1, ... of this process.

  The split is cut into `data_shards` contiguous shards, each an independent seeded stream contributing
  batch_size / data_shards examples to every global batch, in shard order; a process reads only its own
  shards. The global batch of a step therefore depends on the seed and the number of shards, not on how
  many processes read them: 2 processes x 1 shard give the batches of 1 process x 2 shards (tested).

  device_ops: the views' colour, grayscale, blur and solarize are left to the train step
  (device_augment.py), which also normalizes: the host yields the crops and flips in [0, 1].
  """
  if device_ops:
    from ssl_jax.data import device_augment
    views = device_augment.host_views(views)
  shards = num_data_shards(cfg, process_count)
  per_process = shards // process_count
  per_shard = local_batch // per_process
  info = datasets.of(cfg)
  split = split or info.pretrain_split
  builder = builder_of(cfg, splits=(split,))
  streams = [_shard_stream(cfg, builder, split, views, shard, shards, per_shard, start_step, keep,
                           normalize=cfg.normalize_inputs and not device_ops)
             for shard in range(process_index * per_process, (process_index + 1) * per_process)]
  ds = streams[0] if len(streams) == 1 else tf.data.Dataset.zip(tuple(streams)).map(
      lambda *parts: tf.nest.map_structure(lambda *x: tf.concat(x, axis=0), *parts))
  return _NamedReadErrors(iter(tfds.as_numpy(ds.prefetch(2).with_options(_options()))), builder, split)


def _shard_stream(cfg, builder, split: str, views, shard: int, num_shards: int, batch: int, start_step: int,
                  keep=None, normalize: bool = True):
  """Batches of `batch` augmented examples from one shard of `split`, from step `start_step` on."""
  info = datasets.of(cfg)
  ds = _read(builder, split, shard, num_shards)
  if keep is not None:
    ds = ds.filter(keep)
  if cfg.cache_dataset:
    ds = ds.cache()
  ds = ds.repeat()
  ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed * 1000 + shard, reshuffle_each_iteration=True)
  ds = ds.enumerate()
  # Resume: skip what earlier steps consumed, before any decoding or augmentation.
  ds = ds.skip(start_step * batch)
  mean, std = info.mean, info.std
  seed = int(cfg.seed)

  def transform(count, ex):
    # (seed, position in this shard's stream, shard) -> the element's augmentation seed.
    element_seed = tf.stack([tf.constant(seed, tf.int64), count * num_shards + shard])
    out = augment.multi_view_transform(views, ex["image"], element_seed, mean)
    if normalize:
      out = tuple(augment.normalize(v, mean, std) for v in out)
    out = augment.erase_views(views, out, element_seed, *(((0.,) * 3, (1.,) * 3) if normalize else (mean, std)))
    return {"views": out, "label": ex["label"], "index": ex["index"]}

  ds = ds.map(_graph_fn(transform), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True)


def eval_batches(cfg, split: str, local_batch: int, crop_size: int, crop_proportion: float,
                 process_index: int = 0, process_count: int = 1,
                 in_order: bool = False) -> Iterator[Dict[str, np.ndarray]]:
  """One pass over `split` for evaluation, every example exactly once over all processes.

  in_order: read the files one after the other, so that `index` is the example's position in the split,
  the index pretrain_batches gives it (_read); by default TFDS interleaves the files of a split, which
  reads faster from remote storage and is all that evaluation needs (it pairs features with labels).

  Each process reads a contiguous share (sizes differ by at most one example); the last batch of each
  process, and any batch a process needs to match the batch count of the others, is padded, and
  `mask` marks the real examples. Yields {"image": float32 [b, s, s, 3], "label", "index", "mask" bool}."""
  builder = builder_of(cfg, splits=(split,))
  info = datasets.of(cfg)
  n = num_examples(builder, split)
  bounds = [n * p // process_count for p in range(process_count + 1)]
  start, stop = bounds[process_index], bounds[process_index + 1]
  most = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
  num_batches = -(-most // local_batch)
  read_config = tfds.ReadConfig(interleave_cycle_length=1) if in_order else None
  ds = builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False, decoders=_ENCODED,
                          read_config=read_config)
  has_label = "label" in builder.info.features
  normalize, mean, std = cfg.normalize_inputs, info.mean, info.std

  def prepare(i, ex):
    image = augment.eval_transform(ex["image"], crop_size, crop_proportion)
    if normalize:
      image = augment.normalize(image, mean, std)
    label = tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1)
    return {"image": image, "label": label, "index": i, "mask": tf.constant(True)}

  ds = ds.enumerate(start=start).map(_graph_fn(prepare), num_parallel_calls=tf.data.AUTOTUNE)
  # Pad with masked copies of zeros so every process yields num_batches full batches.
  pad = num_batches * local_batch - (stop - start)
  element = {"image": tf.zeros([crop_size, crop_size, 3]), "label": tf.constant(-1),
             "index": tf.constant(-1, tf.int64), "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(element).repeat(pad))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(2).with_options(_options())
  return _NamedReadErrors(iter(tfds.as_numpy(ds)), builder, split)
