"""notebooks/dino_attention.ipynb runs headless end to end (a TINY DINO run trained in a temporary workdir)
and shows the class token's attention maps and per-head entropies; the attention it reads is the class
token's row of the last block's softmax."""

import math
import re

from conftest import REPO
from notebooks import assert_no_outputs, execute, has_png, stdout, tagged

NOTEBOOK = REPO / "notebooks" / "dino_attention.ipynb"


def test_committed_notebook_has_no_outputs():
  assert "WORKDIR" in tagged(assert_no_outputs(NOTEBOOK), "parameters").source


def test_class_token_attention_of_a_fresh_tiny_dino_model():
  """The notebook's extraction, on a freshly initialized tiny DINO model: the class token's row of the last
  block's attention is a distribution over all tokens, and its patch part makes one grid per head."""
  import jax
  import numpy as np
  from ssl_jax import config as config_lib, methods

  cfg = config_lib.load(str(REPO / "configs" / "dino.py") + ":cifar10,tiny")
  method = methods.get(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params, batch_stats, method_state = method.init(jax.random.PRNGKey(1), {"views": [x, x]})
  variables = method.encoder_variables(params, batch_stats, method_state)
  vit = method.evaluation_encoder()
  _, out = vit.apply(variables, x, train=False, mutable=["intermediates"])
  blocks = out["intermediates"]
  assert sorted(blocks) == [f"block_{i}" for i in range(vit.depth)]
  attn = np.asarray(blocks[f"block_{vit.depth - 1}"]["attn"]["attention"][0])
  grid = 32 // vit.patch_size
  assert (vit.depth, vit.num_heads, grid) == (4, 4, 8)
  assert attn.shape == (2, vit.num_heads, 1 + grid * grid, 1 + grid * grid)
  cls_row = attn[:, :, 0]
  np.testing.assert_allclose(cls_row.sum(axis=-1), 1.0, rtol=1e-5)
  assert (cls_row >= 0).all()
  maps = cls_row[:, :, 1:].reshape(2, vit.num_heads, grid, grid)
  assert maps.shape[1:] == (vit.num_heads, grid, grid)
  # Row-major patch order: the map's [r, c] is token 1 + r * grid + c.
  np.testing.assert_array_equal(maps[:, :, 2, 3], attn[:, :, 0, 1 + 2 * grid + 3])


def test_dino_attention_notebook_runs(tmp_path, monkeypatch):
  workdir = tmp_path / "workdir"
  nb = execute(NOTEBOOK, f"WORKDIR = {str(workdir)!r}\nTRAIN_IF_MISSING = True\nTINY = True\nNUM_IMAGES = 4\n"
               "TRAIN_STEPS = None\n", tmp_path, monkeypatch)

  assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints").is_dir()
  for tag in ("attention", "threshold"):
    assert has_png(tagged(nb, tag)), f"the {tag!r} cell shows no figure"
  text = stdout(tagged(nb, "entropy"))
  patches = re.search(r"entropy over (\d+) patches", text)
  heads = re.findall(r"head (\d+): +(\S+) +\(random init: +(\S+)\)", text)
  assert patches and int(patches.group(1)) == 64, text
  assert [int(h) for h, _, _ in heads] == [0, 1, 2, 3], text  # the tiny ViT's 4 heads
  for _, trained, random in heads:
    for value in (float(trained), float(random)):
      # At most log(64) = 4.15888..., printed to 3 decimals (a uniform map prints 4.159).
      assert math.isfinite(value) and 0 <= value <= round(math.log(64), 3), text
