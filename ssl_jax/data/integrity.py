"""Checks a prepared TFDS split's record files against its metadata, and names the damaged file when a
read fails anyway.

Why: TensorFlow reports a damaged file as "truncated record at 998664" or "corrupted record at 4999181",
without the file's name, from deep inside a tf.data iterator: in a training run that is a 46-line
traceback after the model has compiled, a minute in, with a half-made workdir. Everything needed to catch
most damage up front is already on disk: dataset_info.json records each split's shard files (name template
and records per shard) and `num_bytes`, the size of the serialized examples. A TFRecord file frames each
record as [uint64 length][uint32 masked crc32c of the length][data][uint32 masked crc32c of the data], so
a split's files hold exactly num_bytes + 16 * records bytes (the embedded CIFAR-10 subset: 9447025 + 16 *
4000 = 9511025). Checking that costs one stat per file. Only when the sizes disagree are the record
headers walked (a seek and a 12-byte read per record, the data is skipped) to say which file is damaged,
where, and how.

A flipped bit inside a record's data leaves sizes and headers intact; only TF's reader sees it, through
the data checksum. `read_error` turns such a failure into a DataError naming the file: TF gives the byte
offset of the bad record, and the one file of the split whose record at that offset fails its checksum is
the damaged one.

This module imports neither TensorFlow nor TFDS at load (TF only inside `read_error`'s last resort): the
checks are plain file reads, so they work before, and without, anything heavy.
"""

from __future__ import annotations

import concurrent.futures
import re
import struct
from typing import List, Optional, Sequence, Tuple

from absl import logging
from etils import epath

from ssl_jax.errors import UserError

_HEADER = 12  # uint64 length + uint32 masked crc32c of those 8 bytes
_FOOTER = 4   # uint32 masked crc32c of the data
# Reading every byte of a split with TF's reader (data checksums included) to find a damaged file is
# affordable up to about this size (CIFAR-10's 118 MB train split: 0.25 s, so this is seconds); bigger
# splits (ImageNet's 140 GB) rely on the byte offset in TF's message instead.
_FULL_READ_BYTES = 1 << 30


class DataError(UserError, ValueError):
  """Missing or unreadable data; the message names the path and how to prepare it."""


def _crc32c_table() -> Tuple[int, ...]:
  """The byte table of CRC-32C (Castagnoli; reflected polynomial 0x82F63B78), which TFRecord uses."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data`, in pure Python: fast enough for record headers (8 bytes) and the single record
  `read_error` inspects per file; not meant for whole files."""
  crc, table = 0xFFFFFFFF, _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The checksum as TFRecord stores it: rotated right by 15 bits plus a constant (so that a CRC computed
  over data that itself embeds CRCs is not trivially related to them)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def walk_records(path, size: Optional[int] = None) -> Tuple[int, Optional[str]]:
  """(whole records, None) for a sound file, else (whole records before the damage, what is wrong there),
  from the record headers alone: each length is checked against its checksum and the data skipped."""
  path = epath.Path(path)
  size = path.stat().length if size is None else size
  count, pos = 0, 0
  with path.open("rb") as f:
    while pos < size:
      f.seek(pos)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        return count, (f"truncated record header at byte offset {pos} after {count} whole records "
                       f"(the file ends at byte {size})")
      length, crc = struct.unpack("<QI", header)
      if masked_crc32c(header[:8]) != crc:
        return count, f"corrupt record header at byte offset {pos} after {count} whole records"
      end = pos + _HEADER + length + _FOOTER
      if end > size:
        return count, (f"truncated record at byte offset {pos} after {count} whole records (it needs "
                       f"{end - pos} bytes; the file ends at byte {size})")
      count, pos = count + 1, end
  return count, None


def _remedy(builder) -> str:
  return (f"copy the file again from a good copy, or delete {builder.data_dir} and prepare "
          f"{builder.info.name} again")


def _file_error(builder, path, problem: str, tf_message: Optional[str] = None) -> DataError:
  """One line: the file, what is wrong with it, what TF said when reading it failed, what to do."""
  reading = f" (reading it, TensorFlow said: {tf_message})" if tf_message else ""
  return DataError(f"dataset file {path} {problem}{reading}; {_remedy(builder)}")


def _split_names(split: str) -> List[str]:
  """"train+unlabelled" -> ["train", "unlabelled"]; slices ("train[:10%]") check the whole split."""
  return [part.split("[")[0].strip() for part in split.split("+")]


def _split_files(builder, name: str) -> Tuple[List[epath.Path], List[int], int]:
  """(the split's files, records per file, num_bytes (0: not recorded)) as the metadata lists them."""
  splits = builder.info.splits
  if name not in splits.keys():
    raise DataError(f"dataset {builder.info.name} in {builder.data_dir} has no split {name!r}; it has "
                    f"{', '.join(splits.keys())}")
  info = splits[name]
  try:
    files = [epath.Path(p) for p in info.filepaths]
  except Exception as e:  # metadata without a file name template: nothing to check against
    logging.warning("cannot list the files of split %s of %s (%s: %s); not checking them",
                    name, builder.data_dir, type(e).__name__, e)
    return [], [], 0
  return files, [int(n) for n in info.shard_lengths], int(info.num_bytes or 0)


def _size(builder, path: epath.Path) -> Optional[int]:
  """The file's size, or None when it does not exist."""
  try:
    return path.stat().length
  except Exception as e:  # FileNotFoundError locally; other types from remote filesystems (gs://)
    if not path.exists():
      return None
    raise DataError(f"cannot read dataset file {path}: {type(e).__name__}: {_first_line(str(e))}; "
                    f"{_remedy(builder)}") from e


def _sizes(builder, files: Sequence[epath.Path]) -> List[Optional[int]]:
  # A stat is a round trip on gs:// (ImageNet has 1,024 train files): overlap them.
  if len(files) <= 1:
    return [_size(builder, p) for p in files]
  with concurrent.futures.ThreadPoolExecutor(min(32, len(files))) as pool:
    return list(pool.map(lambda p: _size(builder, p), files))


def _is_tfrecord(builder) -> bool:
  file_format = getattr(builder.info, "file_format", None)
  return getattr(file_format, "value", file_format) in (None, "tfrecord")


def _find_damage(builder, name: str, walk: bool = False) -> Optional[Tuple[epath.Path, str]]:
  """(path, what is wrong) of the first missing or damaged file of split `name`, or None.

  Sizes first; the record headers are walked only when the split's total size disagrees with the
  metadata (or always, with `walk`), and a file is called damaged only by that walk: metadata whose
  num_bytes is off while every file is sound gives a warning, not an error."""
  files, lengths, num_bytes = _split_files(builder, name)
  sizes = _sizes(builder, files)
  for i, (path, size) in enumerate(zip(files, sizes)):
    if size is None:
      return path, (f"is missing (file {i + 1} of {len(files)} of split {name!r} listed in "
                    f"{builder.data_dir}/dataset_info.json)")
  if not _is_tfrecord(builder):
    return None  # other formats frame records differently; existence is all that is checked
  expected = num_bytes + (_HEADER + _FOOTER) * sum(lengths)
  if not walk and (not num_bytes or sum(sizes) == expected):
    return None
  for path, size, records in zip(files, sizes, lengths):
    count, what = walk_records(path, size)
    if what is None and count != records:
      what = f"{count} records where the metadata says {records}"
    if what is not None:
      if len(files) == 1 and num_bytes and size != expected:
        what += f"; it is {size} bytes where the metadata implies {expected}"
      return path, f"is damaged: {what}"
  if num_bytes and sum(sizes) != expected:
    logging.warning("split %s of %s: its files hold %d bytes where dataset_info.json implies %d, but every "
                    "record header is sound and the record counts match; using it", name, builder.data_dir,
                    sum(sizes), expected)
  return None


# (dataset directory, split name) pairs found sound in this process: repeated calls (every input stream
# and evaluation pass checks the split it reads) cost nothing.
_checked = set()


def check_split_files(builder, split: str, cache: bool = True) -> None:
  """Raises DataError naming the first missing or damaged record file of `split` ("train", or parts
  joined by "+": each is checked), judged against the builder's metadata (dataset_info.json).

  Cheap: one stat per file when the sizes agree with the metadata (milliseconds; nothing is read). The
  result is remembered per (dataset directory, split) for this process unless cache=False."""
  for name in _split_names(split):
    key = (str(builder.data_dir), name)
    if cache and key in _checked:
      continue
    found = _find_damage(builder, name)
    if found is not None:
      raise _file_error(builder, *found)
    _checked.add(key)


def _first_line(text: str) -> str:
  return text.strip().splitlines()[0] if text.strip() else ""


def tf_message(error: Exception) -> str:
  """The readable part of a TF op error's message: "{{function_node ...}} corrupted record at 4999181
  [Op:IteratorGetNext] name: " -> "corrupted record at 4999181"."""
  text = _first_line(getattr(error, "message", None) or str(error))
  text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)
  text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
  return re.sub(r"(\d)' failed", r"\1 failed", text) or type(error).__name__  # TF's stray quote


def _record_damage(path: epath.Path, offset: int) -> Optional[str]:
  """What is wrong with the record of `path` that starts at `offset` (its header checksum holds): its data
  is cut short or fails its checksum; None when it is sound or no record starts there (elsewhere a header
  checksum holds by chance with probability 2**-32)."""
  with path.open("rb") as f:
    f.seek(offset)
    header = f.read(_HEADER)
    if len(header) < _HEADER:
      return None
    length, crc = struct.unpack("<QI", header)
    if masked_crc32c(header[:8]) != crc or length > 1 << 30:
      return None
    data = f.read(length + _FOOTER)
  if len(data) < length + _FOOTER:
    return f"the record at byte offset {offset} is cut short"
  if masked_crc32c(data[:length]) != struct.unpack("<I", data[length:])[0]:
    return f"the record at byte offset {offset} fails its data checksum"
  return None


def _read_fully(path: epath.Path) -> Tuple[int, Optional[str]]:
  """(records, None), or (-1, TF's message) when TF's reader, data checksums included, fails on it."""
  import tensorflow as tf  # only on this error path: the module's checks do not need TF

  def count(total, batch):
    return total + tf.size(batch, out_type=tf.int64)

  # Batched, the count runs at disk speed (CIFAR-10's 118 MB train file: 0.25 s; one element at a time,
  # 2.6 s).
  records = tf.data.TFRecordDataset(str(path), buffer_size=8 << 20).batch(256)
  try:
    return int(records.reduce(tf.constant(0, tf.int64), count)), None
  except tf.errors.OpError as e:
    return -1, tf_message(e)


# TF op errors (by class name, so this module needs no TF import) that mean the data, not the program, is
# at fault even when no damaged file can be found (a file removed after the check, a lost permission).
_DATA_ERRORS = ("DataLossError", "NotFoundError", "PermissionDeniedError")


def read_error(builder, split: str, error: Exception) -> Optional[DataError]:
  """The DataError to raise in place of `error`, a tf.errors.OpError met while reading `split`, naming the
  damaged file with TF's own message; None where no file is found damaged and the error is not about
  data (a bug in the pipeline keeps its traceback). Slow (reads files) but only ever on this error path.

  In order: the up-front check again, uncached (a file truncated or deleted since), walking every record
  header where the split is small; the record at the byte offset TF names, in each file of the split (a
  few small reads per file, whatever the split's size); for splits small enough, every file read through
  by TF's reader."""
  if hasattr(builder, "read_error"):  # a folder of images (folder.py) names its own errors
    return builder.read_error(split, error)
  message = tf_message(error)
  parts = [_split_files(builder, name) for name in _split_names(split)]
  total = sum(size or 0 for files, _, _ in parts for size in _sizes(builder, files))
  small = total <= _FULL_READ_BYTES
  for name in _split_names(split):
    found = _find_damage(builder, name, walk=small)
    if found is not None:
      return _file_error(builder, *found, message)
  offset = re.search(r"record at (\d+)", message)
  if offset:
    # TF names the offset of the read that failed: the record's start for its header ("truncated record
    # at 998664"), 12 bytes further for its data ("corrupted record at 4999181" of the record at 4999169).
    for files, _, _ in parts:
      for path in files:
        for start in (int(offset.group(1)) - _HEADER, int(offset.group(1))):
          what = _record_damage(path, start) if start >= 0 else None
          if what is not None:
            return _file_error(builder, path, f"is damaged: {what}", message)
  if small:
    for files, lengths, _ in parts:
      for path, records in zip(files, lengths):
        count, failure = _read_fully(path)
        if failure is not None:
          return _file_error(builder, path, "is damaged", failure)
        if count != records:
          return _file_error(builder, path, f"is damaged: {count} records where the metadata says {records}",
                             message)
  if type(error).__name__ not in _DATA_ERRORS:
    return None
  listed = ", ".join(str(p) for files, _, _ in parts for p in files[:3])
  count = sum(len(files) for files, _, _ in parts)
  return DataError(f"reading split {split!r} of {builder.info.name} failed: {message}; one of its {count} "
                   f"files ({listed}{', ...' if count > 3 else ''}) is unreadable, but none could be "
                   f"singled out; {_remedy(builder)}")
