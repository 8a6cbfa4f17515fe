"""The tutorials: stored clean (no outputs, reproducible from tutorials/_build.py), and every one runs.

The execution test runs each notebook in a fresh kernel of *this* interpreter (a kernelspec written on the fly
under a temporary JUPYTER_PATH, so it works on a fresh clone after ``pip install -e '.[dev]'`` whatever kernels
the machine has), from the ``tutorials/`` folder as Jupyter would, and fails on the first cell error, naming the
notebook and the cell.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 900
KERNEL = "probekit-tutorials"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, f"expected the tutorial notebooks under {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; notebooks are committed "
                       "without them: run `python tutorials/_build.py` to rewrite them")


def test_build_script_reproduces_the_notebooks(tmp_path):
    pytest.importorskip("nbformat")
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    built = {p.name: p.read_bytes() for p in build.main(tmp_path)}
    assert sorted(built) == [p.name for p in NOTEBOOKS], "tutorials/*.ipynb and _build.py list different notebooks"
    stale = [name for name, data in built.items() if (TUTORIALS / name).read_bytes() != data]
    assert not stale, f"{stale} differ from what tutorials/_build.py writes: edit _build.py and run it"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernelspec that starts ipykernel with this interpreter, found through a temporary JUPYTER_PATH."""
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "probekit tutorials", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.integration
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, kernel_name):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        # the failing cell: the one with an error output, or (timeout) the first code cell left unexecuted
        code = [c for c in nb.cells if c.cell_type == "code"]
        failing = next((c for c in code if any(o.get("output_type") == "error" for o in c.get("outputs", []))),
                       None) or next((c for c in code if c.get("execution_count") is None), None)
        source = failing.source if failing is not None else "(cell not found)"
        pytest.fail(f"{path.name}: a cell failed.\n--- cell source ---\n{source}\n--- error ---\n{e}",
                    pytrace=False)
    print(f"\n{path.name}: executed in {time.perf_counter() - t0:.0f} s")
