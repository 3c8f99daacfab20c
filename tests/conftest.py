"""Test set-up: 8 simulated CPU devices (a TPU slice stand-in) and the data locations."""

import os

# XLA:CPU's backend optimization level 0 for the tests: compiling, not running, is most of a test's time
# here, and at -O0 the tiny train step compiles in half the time and the parameter initializer (dozens of
# threefry + truncated-normal draws) in 3 s instead of 14; the steps run about 20% slower, which the few
# steps a test takes do not notice (suite: 14 min 15 s -> 9 min 11 s). It changes the speed of XLA's
# generated code, not the computation (a tiny SimCLR run printed the same losses at both levels), and
# every comparison a test makes is between runs under the same flags. README figures use the default.
# --xla_cpu_use_fusion_emitters=false: XLA:CPU's older elemental emitter for loop fusions, which compiles
# the tiny SimSiam step in 7.3 s instead of 10.2 (tests/test_swav.py, test_vit_methods.py and test_cpc.py on
# 2 workers: 3:02 -> 2:35).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The library's setting (ssl_jax/__init__.py), whichever a test file imports first, tensorflow or ssl_jax.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# One persistent XLA compilation cache for the whole test session, shared through the environment with
# the subprocesses the tests start (ssl_jax.main, ssl_jax.evaluate, notebook kernels, multi-process runs):
# many tests compile the same tiny train step, and compiling dominates their time on 2 cores. A cache hit
# is the same executable, so no result changes. Under pytest-xdist the controller creates the directory
# and its workers inherit the variable; the controller removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="ssl_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_TFDS = REPO.parent / "shared" / "data" / "tfds"


@pytest.fixture
def cifar10_dir():
  """The full shared CIFAR-10 (TFDS); tests that need it skip on a fresh clone without ../shared."""
  if not (SHARED_TFDS / "cifar10").exists():
    pytest.skip(f"full CIFAR-10 not found at {SHARED_TFDS} (only present beside the development checkout)")
  return str(SHARED_TFDS)


@pytest.fixture
def data_dir():
  """A prepared TFDS directory holding `cifar10`: the full shared copy when present, else the subset
  embedded in the repository (same format), so end-to-end tests run on a fresh clone."""
  from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
  return str(SHARED_TFDS) if (SHARED_TFDS / "cifar10").exists() else EMBEDDED_DATA_DIR


def flip_bytes(checkpoint: pathlib.Path, count: int = 4096) -> pathlib.Path:
  """XORs `count` bytes in the middle of the largest data file of an orbax checkpoint (size unchanged), as
  a damaged disk or a bad copy would; returns the file."""
  files = [p for p in (checkpoint / "state").rglob("*") if p.is_file() and "ocdbt.process" in str(p)]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  start = max(0, len(data) // 2 - count // 2)
  for i in range(start, min(len(data), start + count)):
    data[i] ^= 0xFF
  target.write_bytes(bytes(data))
  return target


# The longest files first. Under `pytest -n 2 --dist loadfile --no-loadscope-reorder` each file runs on one
# worker and files are handed out in collection order as workers free up: starting the long ones first keeps
# both workers busy to the end instead of leaving one long file running alone. (Without
# --no-loadscope-reorder, pytest-xdist 3.8 hands out the files with the most tests first, whatever this
# order: test_multihost.py, 5 tests and 4 minutes, then started near the end.) Seconds per file, one run
# of the suite on 2 workers (2026-12-07): 463, 263, 220, 193, 124, 115, 111, 104, 91, 77, 66, 59, 55, 55,
# 48, 48, 38, 34, 34; the rest under 25. Order within a file is unchanged.
LONGEST_FIRST = ("test_train.py", "test_multihost.py", "test_evaluate.py", "test_sharding.py", "test_instdisc.py",
                 "test_cpc.py", "test_finetune.py", "test_export.py", "test_device_augment.py", "test_swav.py",
                 "test_reliability.py", "test_dead_peer.py", "test_notebook.py", "test_folder.py",
                 "test_notebook_dino.py", "test_supervised.py", "test_mae.py", "test_notebook_mae.py",
                 "test_vit_methods.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def set_keys(cfg, overrides):
  """cfg with each dotted key of `overrides` ("method.temperature") set to its value."""
  from ssl_jax import config as config_lib
  for key, value in overrides.items():
    config_lib.set_value(cfg, key, value)
  return cfg


def killed_after(workdir: pathlib.Path, step: int, copy: pathlib.Path) -> pathlib.Path:
  """`copy`: a copy of the training workdir `workdir` without its checkpoints after `step`, the workdir of
  a run killed after saving step `step` (metrics.jsonl rows past it are dropped by the resumed run). One
  run and a resumed copy check exact resume at the cost of 1.5 runs instead of the 2 of a separate stopped
  run: the step-`step` checkpoint of an uninterrupted run is the stopped run's (same batches and keys);
  stopping at a step (train.train's stop_at_step) has its own tests."""
  shutil.copytree(workdir, copy)
  for child in (copy / "checkpoints").iterdir():
    if child.name.isdigit() and int(child.name) > step:
      shutil.rmtree(child)
  return copy


def stop_and_resume(cfg, tmp_path, steps: int = 4):
  """Trains `cfg` on the embedded subset for `steps` steps in tmp_path/whole (a checkpoint every steps / 2),
  then resumes tmp_path/parts, a copy killed after the checkpoint at steps / 2 (killed_after); asserts the
  two final states are equal bit for bit and returns (whole, parts), train.train's results."""
  import jax
  import numpy as np
  from ssl_jax import train
  cfg.data_dir = str(REPO / "ssl_jax" / "data" / "embedded")
  cfg.total_steps = steps
  cfg.log_every_steps = 1
  cfg.checkpoint_every_steps = steps // 2
  cfg.shuffle_buffer = 256
  whole = train.train(cfg, str(tmp_path / "whole"))
  parts = train.train(cfg, str(killed_after(tmp_path / "whole", steps // 2, tmp_path / "parts")))
  for a, b in zip(jax.tree.leaves(jax.device_get(whole["state"])), jax.tree.leaves(jax.device_get(parts["state"]))):
    np.testing.assert_array_equal(a, b)
  return whole, parts


def numeric_grad(fn, x, eps: float = 1e-6):
  """Central differences of the scalar function `fn` at the float64 array `x`: what a loss's gradient is
  checked against."""
  import numpy as np
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = eps
    g[i] = (fn(x + d) - fn(x - d)) / (2 * eps)
  return g
