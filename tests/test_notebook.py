"""launch/shapes_ablation.ipynb executes: the Shapes job and an ablation, at a micro scale.

Its parameters are overridden the way papermill does it (a cell inserted after the one tagged
"parameters"); it runs in a temporary directory on a copy of the shared micro workdir (the job's
last stage removed, so the notebook trains it again), with the package importable, so the install
cell does nothing.
"""

import os
import shutil

import nbformat
import pytest
from micro_job import MICRO_OVERRIDES, REPO, copy_of_micro_run
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(REPO, "launch", "shapes_ablation.ipynb")


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text", ""))
        out.extend(str(v) for v in o.get("data", {}).values())
    return "\n".join(out)


def test_notebook_runs_the_job_and_the_ablation(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    workdir = copy_of_micro_run(str(tmp_path / "run"))
    shutil.rmtree(os.path.join(workdir, "rl"))
    params = (f"PRESET = 'smoke'\nWORKDIR = {workdir!r}\nVARIANTS = ['pair_none']\n"
              f"OVERRIDES = {MICRO_OVERRIDES!r}\n")
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        params, metadata={"tags": ["injected-parameters"]}))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        REPO, os.environ.get("PYTHONPATH")])))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "pairuni_jax is importable: nothing to install" in text
    assert "== rl: done in" in text  # the job's last stage trained in the notebook
    assert "after RL (2)" in text  # its report, displayed
    assert "| pair_none |" in text and "| sft |" in text  # the ablation table, displayed
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images == 3  # rewards, eval accuracy, ablation plot
    assert os.path.exists(os.path.join(workdir, "ablations", "pair_none", "result.json"))
