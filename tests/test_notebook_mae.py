"""notebooks/mae_reconstruction.ipynb runs headless end to end (a TINY MAE run trained in a temporary
workdir) and shows masks, reconstructions and each image's masked-patch loss against random init (what it
computes is tested in test_mae.py: reconstruct_images)."""

import math
import re

from conftest import REPO
from notebooks import assert_no_outputs, execute, has_png, stdout, tagged

NOTEBOOK = REPO / "notebooks" / "mae_reconstruction.ipynb"


def test_committed_notebook_has_no_outputs():
  assert "WORKDIR" in tagged(assert_no_outputs(NOTEBOOK), "parameters").source


def test_mae_reconstruction_notebook_runs(tmp_path, monkeypatch):
  workdir = tmp_path / "workdir"
  nb = execute(NOTEBOOK, f"WORKDIR = {str(workdir)!r}\nTRAIN_IF_MISSING = True\nTINY = True\nNUM_IMAGES = 3\n"
               "TRAIN_STEPS = None\nMASK_SEED = 0\n", tmp_path, monkeypatch)

  assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints").is_dir()
  assert has_png(tagged(nb, "reconstructions")), "the reconstructions cell shows no figure"
  text = stdout(tagged(nb, "loss"))
  rows = re.findall(r"image (\d) \((\w+)\): (\S+)  \(random init: (\S+)\)", text)
  assert [int(i) for i, _, _, _ in rows] == [0, 1, 2], text
  mean = re.search(r"mean over 3 images: (\S+)  \(random init: (\S+)\)", text)
  assert mean, text
  for _, _, trained, random in rows:
    for value in (float(trained), float(random)):
      assert math.isfinite(value) and 0 < value < 10, text
  # norm_pix targets have unit variance per patch: predicting 0 scores about 1, a random decoder about 2.
  assert 0.5 < float(mean.group(2)) < 4.0, text
