"""notebooks/quickstart.ipynb runs headless end to end (TINY training in a temporary workdir) and shows its
figures and kNN accuracies."""

import re

from conftest import REPO
from notebooks import assert_no_outputs, execute, has_png, stdout, tagged

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
  assert_no_outputs(NOTEBOOK)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  workdir = tmp_path / "workdir"
  nb = execute(NOTEBOOK, f"WORKDIR = {str(workdir)!r}\nTRAIN_IF_MISSING = True\nTINY = True\n", tmp_path,
               monkeypatch)

  assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints").is_dir()
  for tag in ("views", "curves", "retrieval"):
    assert has_png(tagged(nb, tag)), f"the {tag!r} cell shows no figure"
  text = stdout(tagged(nb, "knn"))
  trained = re.search(r"trained encoder \(step (\d+)\): +([\d.]+)%", text)
  random = re.search(r"random-init encoder: +([\d.]+)%", text)
  assert trained and random, text
  assert int(trained.group(1)) == 4
  for m in (trained.group(2), random.group(1)):
    assert 0 <= float(m) <= 100
