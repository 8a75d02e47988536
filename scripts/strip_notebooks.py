"""Strip outputs, execution counts and per-run metadata from notebooks before committing them.

    .venv/bin/python scripts/strip_notebooks.py notebooks/*.ipynb

The test suite executes every notebook fresh (tests/test_notebooks.py) and refuses committed outputs, so
figures in the repository are never stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

KEPT_NOTEBOOK_METADATA = ("kernelspec", "language_info")


def strip(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``notebook`` without outputs, execution counts, cell metadata or run-specific notebook metadata."""
    for cell in notebook.cells:
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    notebook.metadata = {k: v for k, v in notebook.metadata.items() if k in KEPT_NOTEBOOK_METADATA}
    notebook.metadata.get("language_info", {}).pop("version", None)
    return notebook


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        before = nbformat.writes(notebook)
        after = nbformat.writes(strip(notebook))
        if after != before:
            path.write_text(after + "\n")
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
