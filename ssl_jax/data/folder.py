"""`dataset=folder`: a directory of image files as a dataset, for pre-training and every evaluation protocol.

Layouts of `data_dir` (JPEG, PNG, BMP, GIF; any depth below a class folder):
  data_dir/train/<class>/*.jpg + data_dir/{val,validation,test}/<class>/*.jpg   splits and labels
  data_dir/<class>/*.jpg                 labels; a held-out "test" split of `folder.test_fraction` per class
  data_dir/*.jpg                         unlabelled; a held-out "test" split of `folder.test_fraction`
A split folder may be flat (unlabelled) too. The held-out draw and the order of each split are a seeded
permutation (`folder.split_seed`), fixed by the config a run saves, so evaluation sees the split that
pre-training held out, and examples are spread over the data shards as in a shuffled TFDS dataset.

The file list is indexed once (progress on the log every 10,000 files) and cached as JSON, keyed by the
folder's path and validated by the modification times of its directories (adding or removing a file
changes its directory's). Indexing reads each file's first and last bytes, so a file that is not an image
or is cut short is found before anything compiles: it is named in one line (DataError), or with
`folder.skip_bad=True` left out and counted. A file damaged in a way those bytes do not show fails at
decoding, with the folder named.

`builder(cfg)` returns an object with the methods of a TFDS builder that the pipeline uses (`info.splits`,
`info.features`, `as_dataset`), so pipeline.py reads a folder as it reads a prepared dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from ssl_jax.data import datasets
from ssl_jax.data.integrity import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLIT_FOLDERS = {"train": "train", "val": "test", "validation": "test", "test": "test"}
_INDEX_VERSION = 1
_PROGRESS_EVERY = 10_000


def _cache_dir() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ssl_jax", "folders")


def _check_image(path: str) -> Optional[str]:
  """Why `path` cannot be an image TF decodes ("" read as fine), from its first and last bytes."""
  try:
    with open(path, "rb") as f:
      head = f.read(16)
      size = os.fstat(f.fileno()).st_size
      f.seek(max(0, size - 1024))
      tail = f.read()
  except OSError as e:
    return f"unreadable ({e.strerror or e})"
  if not head:
    return "empty file"
  if head.startswith(b"\xff\xd8\xff"):
    # A JPEG ends with the EOI marker; writers may append a few bytes after it.
    return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
  if head.startswith(b"\x89PNG\r\n\x1a\n"):
    return None if b"IEND" in tail[-12:] else "truncated PNG (no IEND chunk)"
  if head.startswith((b"GIF87a", b"GIF89a")):
    return None
  if head.startswith(b"BM"):
    return None if int.from_bytes(head[2:6], "little") <= size else "truncated BMP"
  return f"not a JPEG, PNG, BMP or GIF image (starts with {head[:8]!r})"


def _list_images(top: str, progress: List[int]) -> Tuple[List[str], Dict[str, int]]:
  """Image files below `top` (sorted paths relative to `top`) and {directory: mtime_ns} of every
  directory walked."""
  files, mtimes = [], {}
  for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    mtimes[dirpath] = os.stat(dirpath).st_mtime_ns
    for name in sorted(filenames):
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
        files.append(os.path.relpath(os.path.join(dirpath, name), top))
        progress[0] += 1
        if progress[0] % _PROGRESS_EVERY == 0:
          logging.info("folder: indexed %d images", progress[0])
  return files, mtimes


def _subdirs(path: str) -> List[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def _scan_part(top: str, progress: List[int]) -> Tuple[Dict[str, List[str]], Dict[str, int], List[str]]:
  """{class name ("" when unlabelled): files relative to data_dir's part `top`}, directory mtimes, and the
  loose files beside class folders (left out)."""
  classes = _subdirs(top)
  loose = sorted(f for f in os.listdir(top) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
  mtimes = {top: os.stat(top).st_mtime_ns}
  if not classes:
    files, m = _list_images(top, progress)
    mtimes.update(m)
    return {"": files}, mtimes, []
  groups = {}
  for name in classes:
    files, m = _list_images(os.path.join(top, name), progress)
    mtimes.update(m)
    if files:
      groups[name] = [os.path.join(name, f) for f in files]
  return groups, mtimes, loose


def _index(data_dir: str) -> dict:
  """Walks `data_dir`: {"parts": {split folder or "": {class: [relative paths]}}, "mtimes", "bad"}."""
  progress = [0]
  subdirs = _subdirs(data_dir)
  test_dir = next((d for d in ("val", "validation", "test") if d in subdirs), None)
  parts, mtimes = {}, {data_dir: os.stat(data_dir).st_mtime_ns}
  for part in (["train", test_dir] if "train" in subdirs and test_dir else [""]):
    groups, m, loose = _scan_part(os.path.join(data_dir, part) if part else data_dir, progress)
    if loose:
      logging.warning("folder: %d image files beside the class folders of %s are left out (e.g. %s)",
                      len(loose), os.path.join(data_dir, part), loose[0])
    mtimes.update(m)
    parts[part] = {c: [os.path.join(part, f) if part else f for f in files] for c, files in groups.items()}
  logging.info("folder: %d images in %s; checking their first and last bytes", progress[0], data_dir)
  bad, checked = {}, 0
  for groups in parts.values():
    for files in groups.values():
      for f in files:
        reason = _check_image(os.path.join(data_dir, f))
        if reason:
          bad[f] = reason
        checked += 1
        if checked % _PROGRESS_EVERY == 0:
          logging.info("folder: checked %d of %d images", checked, progress[0])
  return {"version": _INDEX_VERSION, "data_dir": data_dir, "parts": parts,
          "mtimes": {os.path.relpath(d, data_dir): t for d, t in mtimes.items()}, "bad": bad}


def _cached_index(data_dir: str) -> dict:
  """The index of `data_dir`, from the cache while none of its directories changed, else made anew."""
  data_dir = os.path.realpath(data_dir)
  key = hashlib.sha1(data_dir.encode()).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f"{key}.json")
  try:
    with open(path) as f:
      index = json.load(f)
    if index.get("version") == _INDEX_VERSION and index.get("data_dir") == data_dir and all(
        os.stat(os.path.join(data_dir, d)).st_mtime_ns == t for d, t in index["mtimes"].items()):
      return index
  except (OSError, ValueError, KeyError):
    pass
  index = _index(data_dir)
  try:  # written whole then renamed, so that a reader (another process, a kill) never sees half of it
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(index, f)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("folder: cannot cache the index of %s in %s (%s); it is made anew next time", data_dir,
                    path, e)
  return index


@dataclasses.dataclass(frozen=True)
class _Split:
  num_examples: int


class FolderInfo:
  """What the pipeline reads off a TFDS builder's `info`: splits and feature names."""

  def __init__(self, splits: Dict[str, int], labelled: bool):
    self.splits = {name: _Split(n) for name, n in splits.items()}
    self.features = ("image", "file_name") + (("label",) if labelled else ())


class FolderBuilder:
  """The splits of an indexed folder: "train" and "test", each [(relative path, label)] in a seeded order,
  and "all", both in path order."""

  def __init__(self, data_dir: str, splits: Dict[str, List[Tuple[str, int]]], class_names: List[str],
               skipped: int):
    self.data_dir = data_dir
    self._splits = splits
    self.class_names = class_names
    self.skipped = skipped
    self.info = FolderInfo({k: len(v) for k, v in splits.items()}, labelled=bool(class_names))

  def file_names(self, split: str) -> List[str]:
    """The paths of `split`'s images relative to data_dir, in split order."""
    return [f for f, _ in self._splits[split]]

  def as_dataset(self, split: str, shuffle_files: bool = False, read_config=None, decoders=None):
    """{"image": uint8 [h, w, 3] (or the file's bytes with decoders={"image": SkipDecoding()}),
    "file_name": path relative to data_dir, "label": int64 (labelled folders)} of `split`, which may
    carry a slice: "train[10:20]"."""
    del shuffle_files, read_config  # the order is the split's seeded one
    import tensorflow as tf
    import tensorflow_datasets as tfds
    match = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", split)
    if not match or match.group(1) not in self._splits:
      raise DataError(f"folder {self.data_dir} has the splits {', '.join(self._splits)}, not {split!r}")
    examples = self._splits[match.group(1)]
    start = int(match.group(2) or 0)
    stop = int(match.group(3)) if match.group(3) else len(examples)
    examples = examples[start:stop]
    names = [f for f, _ in examples]
    ds = tf.data.Dataset.from_tensor_slices({
        "path": tf.constant([os.path.join(self.data_dir, f) for f in names], tf.string),
        "file_name": tf.constant(names, tf.string),
        "label": tf.constant([label for _, label in examples], tf.int64)})
    skip_decoding = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)
    labelled = "label" in self.info.features

    def read(ex):
      data = tf.io.read_file(ex["path"])
      if not skip_decoding:
        data = tf.io.decode_image(data, channels=3, expand_animations=False)
        data.set_shape([None, None, 3])
      out = {"image": data, "file_name": ex["file_name"]}
      if labelled:
        out["label"] = ex["label"]
      return out

    return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def read_error(self, split: str, error: Exception) -> DataError:
    """The one-line error for a TF error met while reading `split` (integrity.read_error asks)."""
    message = str(getattr(error, "message", error)).strip().splitlines()[0]
    return DataError(f"an image of {self.data_dir} ({split} split) could not be read: {message}; remove "
                     f"the damaged file, or set --config.folder.skip_bad=True after the index names it")


_BUILDERS: Dict[tuple, FolderBuilder] = {}


def _make(data_dir: str, test_fraction: float, split_seed: int, skip_bad: bool) -> FolderBuilder:
  if not data_dir:
    raise DataError("data_dir is not set: pass --config.data_dir=DIR (a folder of images)")
  if not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir} is not a directory of images")
  if not 0 < test_fraction < 1:
    raise DataError(f"folder.test_fraction must lie in (0, 1), got {test_fraction}")
  index = _cached_index(data_dir)
  bad = index["bad"]
  if bad and not skip_bad:
    first = sorted(bad)[0]
    raise DataError(f"{os.path.join(data_dir, first)}: {bad[first]}"
                    + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                    + "; remove it, or set --config.folder.skip_bad=True to leave such files out")
  if bad:
    logging.warning("folder: left out %d damaged files of %s (folder.skip_bad), e.g. %s: %s", len(bad),
                    data_dir, sorted(bad)[0], bad[sorted(bad)[0]])
  parts = {p: {c: [f for f in files if f not in bad] for c, files in groups.items()}
           for p, groups in index["parts"].items()}
  labelled = all("" not in groups for groups in parts.values())
  class_names = sorted({c for groups in parts.values() for c in groups}) if labelled else []
  if labelled and "" not in parts:
    test_part = next(p for p in parts if p != "train")
    unknown = sorted(set(parts[test_part]) - set(parts["train"]))
    if unknown:
      raise DataError(f"the test split of {data_dir} has classes the train split lacks: {', '.join(unknown[:5])}")
  label_of = {c: i for i, c in enumerate(class_names)}
  rng = np.random.default_rng([split_seed, 20260401])  # own second word: never the draws of a model seed
  splits = {"train": [], "test": []}
  for part, groups in parts.items():
    for c, files in groups.items():
      label = label_of.get(c, -1)
      if part:  # a split folder
        splits[SPLIT_FOLDERS[part]] += [(f, label) for f in files]
      else:  # held out per class (per folder when unlabelled): round(fraction x n), at least one if n > 1
        order = rng.permutation(len(files))
        held = min(len(files) - 1, max(1 if len(files) > 1 else 0, int(round(test_fraction * len(files)))))
        splits["test"] += [(files[i], label) for i in order[:held]]
        splits["train"] += [(files[i], label) for i in order[held:]]
  for name in splits:  # a seeded order, as the records of a shuffled TFDS dataset
    splits[name] = [splits[name][i] for i in rng.permutation(len(splits[name]))]
  splits["all"] = sorted(splits["train"] + splits["test"])  # every image in path order (ssl_jax.embed)
  if not splits["train"]:
    raise DataError(f"no images in {data_dir} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in class "
                    f"folders or flat)")
  return FolderBuilder(os.path.realpath(data_dir), splits, class_names, len(bad))


def builder(cfg) -> FolderBuilder:
  """The FolderBuilder of cfg.data_dir with cfg.folder's split settings (made once per process)."""
  f = cfg.folder
  key = (os.path.realpath(cfg.data_dir) if cfg.data_dir else "", float(f.test_fraction), int(f.split_seed),
         bool(f.skip_bad))
  if key not in _BUILDERS:
    _BUILDERS[key] = _make(cfg.data_dir, *key[1:])
  return _BUILDERS[key]


def info(cfg) -> datasets.DatasetInfo:
  """The DatasetInfo of a folder: its classes, and cfg.folder's image size, centre crop, mean and std."""
  f = cfg.folder
  return datasets.DatasetInfo("folder", "train", "train", "test", len(builder(cfg).class_names),
                              int(f.image_size), float(f.eval_crop_proportion), tuple(f.mean), tuple(f.std))


def write_embedded(out: str, layout: str = "splits", fmt: str = "png", per_class: int = 0) -> int:
  """Writes the embedded CIFAR-10 subset as image files under `out` (scripts/embedded_to_folder.py):
  layout "splits" (out/{train,test}/<class>/), "classes" (out/<class>/) or "flat"; fmt "png" (the
  stored bytes) or "jpg" (quality 95); at most per_class images of each class and split (0: all).
  Returns the number of files written."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tfds_builder = tfds.builder("cifar10", data_dir=datasets.EMBEDDED_DATA_DIR)
  names = tfds_builder.info.features["label"].names
  written = 0
  for split in ("train", "test"):
    counts = {}
    ds = tfds_builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    for i, ex in enumerate(tfds.as_numpy(ds)):
      label = names[int(ex["label"])]
      counts[label] = counts.get(label, 0) + 1
      if per_class and counts[label] > per_class:
        continue
      data = ex["image"] if fmt == "png" else tf.io.encode_jpeg(tf.io.decode_png(ex["image"]), quality=95).numpy()
      target = {"splits": os.path.join(out, split, label), "classes": os.path.join(out, label), "flat": out}[layout]
      os.makedirs(target, exist_ok=True)
      with open(os.path.join(target, f"{split}_{i:05d}.{fmt}"), "wb") as f:
        f.write(data)
      written += 1
  return written
