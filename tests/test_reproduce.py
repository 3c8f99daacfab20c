"""The reproduction table (ssl_jax/reproduce.py): every row's config loads, carries the values the row cites,
validates for a 256-device mesh at its batch and builds its state abstractly with the encoder's published
parameter count; docs/reproduce.md is the generated table; the CLI lists, filters and prints commands."""

import math

import jax
import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import methods, reproduce, train

CONFIGURED = [row for row in reproduce.ROWS if row.config]


def row_config(row):
  cfg = config_lib.load(str(REPO / row.config.split(":")[0]) + ":" + row.config.split(":")[1])
  for key, value in row.overrides:
    config_lib.set_value(cfg, key, value)
  return cfg


def lookup(cfg, key):
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


@pytest.mark.parametrize("row", CONFIGURED, ids=lambda r: r.key)
def test_row_config_has_the_cited_recipe_and_validates_on_256_devices(row):
  cfg = row_config(row)
  assert cfg.dataset == "imagenet2012"
  assert cfg.batch_size == row.batch and cfg.num_epochs == row.epochs
  for key, value in row.cited:
    got = lookup(cfg, key)
    if isinstance(value, float):
      assert math.isclose(got, value, rel_tol=1e-9), (key, got, value)
    else:
      assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, (key, got, value)
  cfg.data_dir = "gs://bucket/tensorflow_datasets"
  config_lib.validate(cfg, 256, 64, "tpu")
  assert row.gflop > 0 and row.params_m > 0 and row.protocols


@pytest.mark.parametrize("row", CONFIGURED, ids=lambda r: r.key)
def test_row_builds_abstractly_with_the_published_encoder_size(row):
  cfg = config_lib.resolve(row_config(row), reproduce.IMAGENET_TRAIN_IMAGES)
  method = methods.get(cfg, methods.DataFacts(reproduce.IMAGENET_TRAIN_IMAGES, cfg.batch_size))
  batch = train.init_batch(cfg, method.views())
  params, _, _ = jax.eval_shape(method.init, jax.random.key(0), batch)
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params["encoder"])) / 1e6
  assert abs(count - row.params_m) < 0.01, (row.key, count)


def test_cost_is_flops_over_half_the_peak():
  row = reproduce.get("simclr-r50")
  flops = row.gflop * 1e9 * 1_281_167 * 1000
  assert math.isclose(row.device_hours("v4 chip"), flops / (275e12 * 0.5) / 3600)
  assert math.isclose(row.device_hours("v3 core") / row.device_hours("v4 chip"), 275 / 61.5)


def test_rows_cover_the_papers_figures():
  figures = {(r.method, r.linear) for r in reproduce.ROWS}
  for wanted in [("InstDisc", 54.0), ("CPC v1", 48.7), ("MoCo", 60.6), ("MoCo v2", 67.5), ("MoCo v2", 71.1),
                 ("SimCLR", 69.3), ("BYOL", 74.3), ("SimSiam", 68.1), ("SwAV", 75.3), ("Barlow Twins", 73.2),
                 ("DINO", 75.3), ("DINO", 77.0), ("DINO", 80.1), ("MoCo v3", 76.7), ("MAE", 68.0), ("VICReg", 73.2)]:
    assert wanted in figures
  assert reproduce.get("mae-vitb16").finetune == 83.6
  assert len({r.key for r in reproduce.ROWS}) == len(reproduce.ROWS)


def test_docs_are_the_generated_table():
  assert (REPO / "docs" / "reproduce.md").read_text() == reproduce.markdown() + "\n", \
      "docs/reproduce.md is stale: python -m ssl_jax.reproduce --markdown > docs/reproduce.md"


def test_cli_lists_filters_and_prints_commands(capsys):
  assert reproduce.main(["--method", "dino"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 2 + 3 and all("DINO" in line for line in out[2:])
  assert reproduce.main(["--row", "moco_v2-r50-800ep"]) == 0
  commands = capsys.readouterr().out.splitlines()
  assert commands[0].startswith("python -m ssl_jax.main --config=configs/moco_v2.py:imagenet")
  assert commands[0].endswith("--config.num_epochs=800.0") and "--protocol=linear" in commands[1]
  assert reproduce.main(["--row", "nope"]) == 2
  assert "no reproduction row 'nope'" in capsys.readouterr().err
  assert reproduce.main(["--method", "nope"]) == 2
