"""notebooks/dino_attention.ipynb runs headless end to end (a TINY DINO run trained in a temporary workdir)
and shows the class token's attention maps and per-head entropies; the attention it reads is the class
token's row of the last block's softmax."""

import json
import math
import re
import sys

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "notebooks" / "dino_attention.ipynb"


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def has_png(cell):
  return any(o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
             for o in cell.outputs)


def stdout(cell):
  return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before committing"
  assert "WORKDIR" in tagged(nb, "parameters").source


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
  # A python3 kernelspec that runs this interpreter (the venv's), whatever else is installed.
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")

  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "workdir"
  tagged(nb, "parameters").source = (f"WORKDIR = {str(workdir)!r}\nTRAIN_IF_MISSING = True\nTINY = True\n"
                                     "NUM_IMAGES = 4\nTRAIN_STEPS = None\n")
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": str(REPO / "notebooks")}})
  client.execute()

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
