"""notebooks/quickstart.ipynb runs headless end to end (TINY training in a temporary workdir) and shows its
figures and kNN accuracies."""

import json
import re
import sys

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


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


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
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
  tagged(nb, "parameters").source = f"WORKDIR = {str(workdir)!r}\nTRAIN_IF_MISSING = True\nTINY = True\n"
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": str(REPO / "notebooks")}})
  client.execute()

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
