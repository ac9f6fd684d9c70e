"""The notebooks in notebooks/ run top to bottom (nbclient, a fresh kernel each).

They run in their quick mode (``TRE_NOTEBOOK_QUICK=1``: tiny warm start and a
few PPO iterations, the same code path) with the warm-start cache in a
temporary folder shared by the notebooks of this module. Each notebook's own
``assert`` cells make the run fail when a claim it illustrates does not hold.
The committed notebooks carry no outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_tail_risk.ipynb", "02_quickstart.ipynb", "03_custom_regularizer.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: committed with outputs (strip them)"
            assert cell.execution_count is None, f"{path.name}: committed with execution counts"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmstart-cache")


#: notebooks that train for longer than a few seconds run with ``-m slow`` (the default suite stays short)
_SLOW_NOTEBOOKS = {"02_quickstart.ipynb", "03_custom_regularizer.ipynb"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in _SLOW_NOTEBOOKS else p
                                  for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, shared_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TRE_LIGHTNING_CACHE", str(shared_cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
