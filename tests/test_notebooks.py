"""The numbered notebooks: saved clean, numbered 01-07, and each runs top to bottom.

Execution follows STYLE.md (principle 10): every ``notebooks/NN_*.ipynb`` is run in a fresh
kernel, errors are fatal, outputs are not compared. The kernel is started from this
interpreter (a kernelspec written for ``sys.executable``, so a ``python3`` kernel
registered elsewhere on the machine cannot be picked up instead) with
``OMP_NUM_THREADS=1`` in its environment; a cell appended to each notebook checks both
from inside the kernel. Notebooks run in a temporary folder.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra: "
                                                  "pip install -e '.[notebooks]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01", "02", "03", "04", "05", "06", "07"]
CELL_TIMEOUT = 300  # seconds per cell; a whole notebook is meant to take well under 3 min
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Appended to every notebook before it runs: the kernel must be this interpreter, with
# one OpenMP/torch thread (CI shares 2 cores between the kernel and everything else).
_KERNEL_CHECK = f"""
import os, sys
import torch
assert sys.prefix == {sys.prefix!r}, ("kernel interpreter", sys.executable, sys.prefix)
assert sys.executable == {sys.executable!r}, ("kernel interpreter", sys.executable)
assert os.environ.get("OMP_NUM_THREADS") == "1", os.environ.get("OMP_NUM_THREADS")
assert torch.get_num_threads() == 1, torch.get_num_threads()
"""


_EXPORT = re.compile(r"\b(export|export_session)\(")


def _require_browser() -> None:
    """Figure export renders through Chromium, which CI installs (``bash .ci/browser``)."""
    from thinklens.errors import ThinklensError
    from thinklens.figures import find_browser

    try:
        find_browser()
    except ThinklensError:
        pytest.skip("the notebook exports figures and there is no Chromium; run .ci/browser")


def _ids(paths):
    return [p.name for p in paths]


def test_notebooks_are_the_numbered_ones():
    names = [p.name for p in NOTEBOOKS]
    prefixes = [n[:2] for n in names]
    assert prefixes == EXPECTED, (
        f"notebooks/ holds {names}; expected one notebook per prefix {EXPECTED} "
        "(01 quickstart, 02 traces and attention, 03 probing, 04 patching, 05 circuits, "
        "06 batch jobs and export, 07 thought anchors)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_saved_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.name[:2]} "), (
        f"{path.name}: the first cell must be a markdown title '# {path.name[:2]} · …'")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", nb.metadata
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; clear "
                       f"them (jupyter nbconvert --clear-output --inplace {path.name})")
    shows = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and re.search(r"\.show\(\s*\)", c.source)]
    assert not shows, f"{path.name}: cells {shows} call .show(); end the cell with the figure"


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A ``python3`` kernelspec that starts ipykernel with this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (thinklens tests)", "language": "python"}))
    return [str(root)]


def _failure(path: Path, nb, error: Exception) -> str:
    """The failing cell's source and its traceback, without terminal colours."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = _ANSI.sub("", "\n".join(out.get("traceback", [])))
                return (f"{path.name}: cell {i} raised {out.get('ename')}: {out.get('evalue')}\n"
                        f"---- cell source ----\n{cell.source}\n---- traceback ----\n{tb}")
    return f"{path.name}: {_ANSI.sub('', str(error))}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path, monkeypatch, kernel_dirs):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # the kernel inherits os.environ
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet the debugger's warning
    nb = nbformat.read(path, as_version=4)
    if any(_EXPORT.search(c.source) for c in nb.cells if c.cell_type == "code"):
        _require_browser()
    nb.cells.append(nbformat.v4.new_code_cell(_KERNEL_CHECK))
    km = KernelManager(kernel_name="python3",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        pytest.fail(_failure(path, client.nb, e), pytrace=False)
    ran = [c for c in client.nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in ran), f"{path.name}: cells were skipped"
