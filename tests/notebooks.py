"""Shared by the notebook tests: run a notebook headless with this interpreter and read its tagged cells."""

import json
import sys

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def has_png(cell):
  return any(o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
             for o in cell.outputs)


def stdout(cell):
  return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def assert_no_outputs(path):
  """The committed notebook is valid and holds no outputs."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before committing"
  return nb


def execute(path, parameters: str, tmp_path, monkeypatch):
  """Runs the notebook at `path` with its "parameters" cell replaced by `parameters`, from notebooks/, in a
  python3 kernel of this interpreter (the venv's, whatever else is installed); returns the executed
  notebook."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  nb = nbformat.read(path, as_version=4)
  tagged(nb, "parameters").source = parameters
  nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  return nb
