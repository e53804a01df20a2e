"""Every notebook runs top to bottom, headless, on the embedded models (its `parameters` cell can be overridden,
as papermill does), and committed notebooks carry no outputs. Runs the notebooks launch go to a temporary
runs folder (WORKBENCH_RUNS), never into the repository."""
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SMALL = {  # small settings for CI, per notebook (appended to its parameters cell)
    "02_three_training_paradigms.ipynb": "MINUTES = 0.1\nTRAIN_LIMIT = 200\nEVAL_SAMPLES = 8\nPOLL_SECONDS = 1\n",
    "03_integrators_compared.ipynb": 'INTEGRATORS = ["linear", "llama_adapter"]\nMINUTES = 0.1\nTRAIN_LIMIT = 200\n'
                                     "EVAL_SAMPLES = 8\nPOLL_SECONDS = 1\n",
    "04_chat_and_attention.ipynb": "RELEVANCY = True\n",
    "05_bring_your_own_data.ipynb": "MINUTES = 0.1\nPOLL_SECONDS = 1\n",
}


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs before committing"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"


@pytest.mark.e2e
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))  # the kernel (and its runs) inherit it

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            cell.source += "\n" + SMALL.get(path.name, "")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
