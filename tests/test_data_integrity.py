"""Damaged dataset files are named in one line: up front from the metadata (truncated, missing), or when a
read fails later (a flipped byte inside a record's data), never as a TF traceback without a file name."""

import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import methods
from ssl_jax.data import integrity, pipeline
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR

VERSION = "cifar10/3.0.2"
TRAIN_FILE = "cifar10-train.tfrecord-00000-of-00001"
TEST_FILE = "cifar10-test.tfrecord-00000-of-00001"


@pytest.fixture
def copy(tmp_path):
  """A writable copy of the embedded CIFAR-10 subset (4,000 train records, one file per split)."""
  root = tmp_path / "tfds"
  shutil.copytree(EMBEDDED_DATA_DIR, root)
  for path in (root / VERSION).iterdir():
    path.chmod(0o644)
  return root


def _builder(root):
  return pipeline.get_builder("cifar10", str(root))


def _config(root):
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.data_dir = str(root)
  cfg.batch_size = 16
  cfg.shuffle_buffer = 256
  return config_lib.resolve(cfg, 4000)


def _record_starts(path, count):
  """Byte offsets of the first `count` records, read from the framing independently of the module."""
  starts, pos = [], 0
  with open(path, "rb") as f:
    for _ in range(count):
      starts.append(pos)
      f.seek(pos)
      length, = struct.unpack("<Q", f.read(8))
      pos += 12 + length + 4
  return starts, pos


def test_crc32c_matches_the_standard_and_the_files():
  assert integrity.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  with open(os.path.join(EMBEDDED_DATA_DIR, VERSION, TRAIN_FILE), "rb") as f:
    length, crc = struct.unpack("<QI", f.read(12))
    data, data_crc = f.read(length), struct.unpack("<I", f.read(4))[0]
  assert integrity.masked_crc32c(struct.pack("<Q", length)) == crc
  assert integrity.masked_crc32c(data) == data_crc


def test_intact_copy_passes_and_the_result_is_remembered(copy):
  builder = _builder(copy)
  start = time.perf_counter()
  integrity.check_split_files(builder, "train+test")
  assert time.perf_counter() - start < 0.5
  assert integrity.walk_records(copy / VERSION / TRAIN_FILE) == (4000, None)
  assert integrity.walk_records(copy / VERSION / TEST_FILE) == (1000, None)
  # Once found sound, a split is not checked again in this process; an uncached check sees the change.
  (copy / VERSION / TRAIN_FILE).unlink()
  pipeline.get_builder("cifar10", str(copy), splits=("train",))
  with pytest.raises(pipeline.DataError, match="is missing"):
    integrity.check_split_files(builder, "train", cache=False)


def test_truncated_file_is_named_before_any_batch(copy):
  path = copy / VERSION / TRAIN_FILE
  os.truncate(path, 1 << 20)
  start = time.perf_counter()
  with pytest.raises(pipeline.DataError) as e:
    pipeline.pretrain_batches(_config(copy), [dict(crop_size=32)], 16)
  assert time.perf_counter() - start < 3
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"dataset file {path} is damaged: truncated record at "
                                                    "byte offset ")
  assert "it is 1048576 bytes where the metadata implies 9511025" in message
  assert f"delete {copy / VERSION} and prepare cifar10 again" in message


def test_file_cut_at_a_record_boundary_reports_the_record_count(copy):
  path = copy / VERSION / TRAIN_FILE
  _, end = _record_starts(path, 100)
  os.truncate(path, end)
  with pytest.raises(pipeline.DataError, match=f"{TRAIN_FILE} is damaged: 100 records where the metadata "
                                                "says 4000"):
    pipeline.get_builder("cifar10", str(copy), splits=("train",))


def test_missing_file_is_named(copy):
  path = copy / VERSION / TRAIN_FILE
  path.unlink()
  with pytest.raises(pipeline.DataError, match=f"dataset file {path} is missing"):
    pipeline.pretrain_batches(_config(copy), [dict(crop_size=32)], 16)


def test_each_part_of_a_combined_split_is_checked(copy):
  os.truncate(copy / VERSION / TEST_FILE, 1000)
  with pytest.raises(pipeline.DataError, match=f"{TEST_FILE} is damaged"):
    integrity.check_split_files(_builder(copy), "train+test")


def test_flipped_data_bytes_end_in_a_data_error_naming_the_file(copy):
  path = copy / VERSION / TRAIN_FILE
  starts, _ = _record_starts(path, 11)
  with open(path, "r+b") as f:  # the middle of record 10's data: sizes and headers stay intact
    f.seek(starts[10] + 12 + 1000)
    data = f.read(4)
    f.seek(starts[10] + 12 + 1000)
    f.write(bytes(b ^ 0xFF for b in data))
  cfg = _config(copy)
  batches = pipeline.pretrain_batches(cfg, methods.get(cfg).views(), 16)  # the up-front check passes
  with pytest.raises(pipeline.DataError) as e:
    for _ in range(300):  # the error comes while the shuffle buffer fills, at the first batch
      next(batches)
  message = str(e.value)
  assert "\n" not in message and "Op:" not in message and "function_node" not in message
  assert message.startswith(f"dataset file {path} is damaged: the record at byte offset {starts[10]} fails "
                            f"its data checksum (reading it, TensorFlow said: corrupted record at "
                            f"{starts[10] + 12})")
  # Evaluation streams are wrapped the same way.
  with pytest.raises(pipeline.DataError, match=f"dataset file {path} is damaged"):
    next(pipeline.eval_batches(cfg, "train", 16, 32, 1.0))


def test_read_errors_that_no_file_explains(copy):
  """A TF error that no damaged file explains: a data error still becomes one line naming the split's
  files; any other error (a bug in the pipeline, say) is left alone, to keep its traceback."""
  import tensorflow as tf
  builder = _builder(copy)
  bug = tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [16,32] vs. [16,33]")
  assert integrity.read_error(builder, "train", bug) is None
  lost = tf.errors.DataLossError(None, None, "{{function_node __wrapped__IteratorGetNext}} checksum mismatch "
                                 "[Op:IteratorGetNext] name: ")
  message = str(integrity.read_error(builder, "train", lost))
  assert message.startswith("reading split 'train' of cifar10 failed: checksum mismatch; one of its 1 files "
                            f"({copy / VERSION / TRAIN_FILE}) is unreadable")


def test_full_shared_copy_passes(cifar10_dir):
  builder = _builder(cifar10_dir)
  integrity.check_split_files(builder, "train+test", cache=False)
  train_file = builder.info.splits["train"].filepaths[0]
  assert integrity.walk_records(train_file) == (50000, None)


def test_main_names_a_damaged_file_in_one_line_before_creating_the_workdir(copy, tmp_path):
  """Needs train.train to check the pre-training split before it builds the model state and the workdir
  (pipeline.get_builder(..., splits=(info.pretrain_split,)))."""
  path = copy / VERSION / TRAIN_FILE
  os.truncate(path, 1 << 20)
  workdir = tmp_path / "w"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "ssl_jax.main", "--config=configs/simclr.py:cifar10,tiny",
       f"--config.data_dir={copy}", f"--workdir={workdir}", "--config.batch_size=16",
       "--config.model.width=8", "--config.total_steps=3", "--config.shuffle_buffer=256"],
      cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(errors) == 1 and f"dataset file {path} is damaged" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()
