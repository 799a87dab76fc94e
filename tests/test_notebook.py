"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel (about 10 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def outputs(cell):
    """``(mime type or stream name, text)`` of every output of a code cell."""
    found = []
    for output in cell.outputs:
        if output.output_type == "stream":
            found.append((output.name, output.text))
        for mime, data in output.get("data", {}).items():
            found.append((mime, data))
    return found


def test_quickstart_notebook_runs_in_a_jupyter_kernel():
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    cells = {cell.source.splitlines()[0]: outputs(cell) for cell in notebook.cells
             if cell.cell_type == "code"}
    assert not any(o.output_type == "error" for c in notebook.cells if c.cell_type == "code"
                   for o in c.outputs)
    before = dict(cells["program.visualize()"])
    assert "classifier" in before["image/svg+xml"]
    assert "cg, inner_steps=5" in before["image/svg+xml"]
    after = dict(cells['program.visualize(direction="LR")'])
    assert "60 steps, loss " in after["image/svg+xml"] and "residual " in after["image/svg+xml"]
    assert "300/300" in "".join(text for kind, text in cells["history = program.run(steps=STEPS)"]
                                if kind == "stderr")  # the progress bar, on in a notebook
    assert any(kind == "image/png" for kind, _ in cells["fig = history.plot(smooth=0.9)"])
    assert "flowchart TB" in dict(cells['print(program.visualize(detail="compact").mermaid())'])[
        "stdout"]
