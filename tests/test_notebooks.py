"""The notebooks: each runs top to bottom in a fresh kernel and draws its figures, and none is committed with
(stale) outputs. The kernel inherits this process's environment (CPU only under the test suite)."""

import runpy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# figures each notebook draws; the performance notebook draws two per GPU model found in benchmarks/results
FIGURES = {"01_formats.ipynb": 6, "02_quantized_moe_layer.ipynb": 4, "03_performance.ipynb": 2}
strip = runpy.run_path(str(ROOT / "scripts" / "strip_notebooks.py"))["strip"]


def _figures(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def test_the_three_notebooks_are_there_and_linked_from_the_readme():
    assert [p.name for p in NOTEBOOKS] == sorted(FIGURES)
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"README does not link notebooks/{path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    stripped = nbformat.writes(strip(nbformat.read(path, as_version=4)))
    assert nbformat.writes(notebook) == stripped, (
        f"{path.name} has outputs or run metadata: run `python scripts/strip_notebooks.py {path.relative_to(ROOT)}`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom_and_draws_its_figures(path, monkeypatch):
    # the kernel inherits the environment: an MPLBACKEND=Agg there would turn plt.show() into nothing
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    # raises CellExecutionError (with the cell and its traceback) on any error, the notebooks' own asserts too
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    figures = _figures(notebook)
    if path.name == "03_performance.ipynb":
        assert figures >= FIGURES[path.name] and figures % 2 == 0, figures
    else:
        assert figures == FIGURES[path.name]
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert _figures(strip(notebook)) == 0  # and stripping the executed notebook removes them again
