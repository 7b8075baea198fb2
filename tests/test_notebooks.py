"""The notebooks in notebooks/ run headless (nbclient, a real Jupyter kernel) on the logs of fresh tiny
runs, with no cell error, and their figures show the per-step ratio distributions."""

import base64
import io
import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.conftest import REPO_ROOT  # noqa: E402
from tests.test_analysis import STEPS, tiny_runs  # noqa: E402, F401  (the fixture: two fresh tiny runs)

NOTEBOOKS = os.path.join(REPO_ROOT, "notebooks")

# Appended to the notebook in memory (the file is not changed): describes the named figure's panels as JSON.
DESCRIBE = """
import json
print("FIGURE " + json.dumps([
    {"title": ax.get_title(), "lines": [len(l.get_xdata()) for l in ax.get_lines()]} for ax in {name}.axes
]))
"""


def _execute(name, tmp_path, describe):
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(DESCRIBE.replace("{name}", describe)))
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any cell error
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, errors
    pngs = [base64.b64decode(out.data["image/png"]) for out in outputs if "image/png" in out.get("data", {})]
    stdout = "".join(out.text for out in outputs if out.output_type == "stream" and out.name == "stdout")
    (line,) = [text for text in stdout.splitlines() if text.startswith("FIGURE ")]
    return pngs, json.loads(line[len("FIGURE ") :]), stdout


def _check_pngs(pngs, count):
    from PIL import Image

    assert len(pngs) == count
    for png in pngs:
        width, height = Image.open(io.BytesIO(png)).size
        assert width >= 300 and height >= 150


def test_ratio_histograms_notebook(tiny_runs, tmp_path, monkeypatch):  # noqa: F811
    # The kernel inherits this environment; its working folder (tmp_path) holds no runs of its own.
    monkeypatch.setenv("GUARDRL_RUN_DIR", str(tiny_runs["grpo_guard"]))
    pngs, panels, stdout = _execute("ratio_histograms.ipynb", tmp_path, describe="fig_ratio")
    assert str(tiny_runs["grpo_guard"] / "version_0") in stdout  # the run it was pointed at
    # 5 figures: ratio distribution, plain log r, histograms, clip fractions, proxy vs gold.
    _check_pngs(pngs, 5)
    # The diagnostic figure: one panel per trained denoising step, each with the mean over 3 iterations.
    assert [panel["title"] for panel in panels] == [f"k = {k}" for k in STEPS]
    assert all(3 in panel["lines"] for panel in panels)


def test_compare_runs_notebook(tiny_runs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GUARDRL_RUN_DIRS", ",".join(f"{label}={path}" for label, path in tiny_runs.items()))
    pngs, panels, _ = _execute("compare_runs.ipynb", tmp_path, describe="fig_compare")
    _check_pngs(pngs, 4)  # log-ratio, plain log r, clip fractions, reward
    assert [panel["title"] for panel in panels] == [f"k = {k}" for k in STEPS]
    # one mean line per run in every step's panel (besides the dotted zero line)
    assert all(panel["lines"].count(3) == 2 for panel in panels)
