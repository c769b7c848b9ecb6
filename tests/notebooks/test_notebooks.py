"""The notebook suite on the CPU (ci preset), the way CI runs it (DESIGN.md §4):

1. each notebook through papermill via the runner: exit status, output under runs/, records in the store;
2. its papermill-prepared copy under `pytest --nbval-lax` with notebooks/nbval_sanitize.cfg and
   notebooks/conftest.py (a cell stopped by an IPython UsageError passes nbval, hence both);
3. validation_session with FLUXLAB_DISABLE=<target> records `did-not-run` (read back from the store);
4. static checks: every parameter is seen by papermill, typed and commented; committed without outputs.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fluxlab import notebook, store

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
MINE = ["validation_session", "regression_analysis", "memory_graphs", "gradient_flow"]
# inference_session.ipynb has its own test (tests/notebooks/test_inference_session.py).
NOTEBOOKS = MINE
TIMEOUT = 300  # per cell; a hung kernel fails the test instead of the whole CI job
ENV_KEEP = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET") or ("1" if not notebook.gpu_ids() else "")}


def _params_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in cells[0].metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    return cells[0]


@pytest.mark.parametrize("name", MINE)
def test_committed_notebook_is_clean_and_its_parameters_are_documented(name):
    path = NB_DIR / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, f"{name}: commit notebooks without outputs"
    src = _params_cell(nb).source
    tree = ast.parse(src)
    names = []
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{name}: parameters are typed literals (`x: int = 1  # help`)"
        ast.literal_eval(node.value)
        names.append(node.target.id)
    for line in src.splitlines():
        assert "  # " in line, f"{name}: every parameter needs a trailing comment: {line!r}"
    declared = notebook.declared(path)
    assert list(declared) == names, f"{name}: papermill sees {list(declared)}, the cell declares {names}"
    assert all(declared[n]["help"] for n in names)
    for preset in ("ci", "full"):
        notebook.prepare(name, preset)  # preset files name only declared parameters, with the right types


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_under_papermill_and_nbval(name, work):
    db = work / "store.db"
    env = {"FLUXLAB_STORE": str(db), **{k: v for k, v in ENV_KEEP.items() if v}}
    res = notebook.run(name, "ci", runs_dir=work / "runs", env=env, timeout=TIMEOUT)
    assert res.ok, f"{name} failed under papermill: {res.error} (see {res.output})"
    out = Path(res.output)
    assert out.parent == work / "runs" / name and out.name.endswith(f"_{res.run_id}.ipynb")
    assert res.records, f"{name} recorded nothing"
    stored = store.query(db, run_id=res.run_id)
    assert {r["id"] for r in stored} == {r["id"] for r in res.records}

    # The papermill-prepared copy under nbval, beside a copy of notebooks/conftest.py.
    nbval_dir = work / "nbval" / name
    nbval_dir.mkdir(parents=True)
    shutil.copy(NB_DIR / "conftest.py", nbval_dir / "conftest.py")
    prepared = notebook.prepare_copy(name, "ci", nbval_dir / f"{name}.ipynb")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
         "--nbval-sanitize-with", str(NB_DIR / "nbval_sanitize.cfg"), f"--nbval-cell-timeout={TIMEOUT}",
         "-p", "no:cacheprovider", "-q", "--rootdir", str(nbval_dir), str(prepared)],
        cwd=nbval_dir, env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, f"nbval failed for {name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout


def test_validation_session_records_did_not_run_when_the_target_is_disabled(work):
    db = work / "disabled.db"
    env = {"FLUXLAB_STORE": str(db), "FLUXLAB_DISABLE": "rope", **{k: v for k, v in ENV_KEEP.items() if v}}
    res = notebook.run("validation_session", "ci", {"target": "rope"}, runs_dir=work / "runs-disabled",
                       env=env, timeout=TIMEOUT)
    assert res.ok, res.error
    recs = store.query(db, benchmark="validation/rope", run_id=res.run_id)
    assert recs and all(r["verdict"] == "did-not-run" for r in recs), [r["verdict"] for r in recs]
    assert "FLUXLAB_DISABLE" not in os.environ  # the runner set it for the kernel only


def test_unknown_or_mistyped_notebook_parameters_are_refused(work):
    with pytest.raises(notebook.ParameterError, match=r"unknown parameter 'claimed_speed'; did you mean 'claimed_speedup'"):
        notebook.run("validation_session", "ci", {"claimed_speed": "1.3"}, runs_dir=work / "never")
    with pytest.raises(notebook.ParameterError, match="parameter 'repeats' expects int"):
        notebook.run("validation_session", "ci", {"repeats": "many"}, runs_dir=work / "never")
    assert not (work / "never").exists()
