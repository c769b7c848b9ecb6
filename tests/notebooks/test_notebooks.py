"""The notebook suite on the CPU (ci preset), the way CI runs it (docs/ARCHITECTURE.md, "Notebooks"):

1. each notebook through papermill via the runner: exit status, output under runs/, records in the store;
2. its papermill-prepared copy under `pytest --nbval-lax` with notebooks/nbval_sanitize.cfg and
   notebooks/conftest.py (a cell stopped by an IPython UsageError passes nbval, hence both); the copy
   carries the committed outputs of the `# NBVAL_CHECK_OUTPUT` cells, which nbval compares;
3. validation_session with FLUXLAB_DISABLE=<target> records `did-not-run` (read back from the store);
4. static checks: every parameter is seen by papermill, typed and commented; committed without outputs
   except the expected outputs of the checked cells (tests/notebooks/expected_outputs.py writes them);
5. the comparison can fail: a planted verdict change in an expected output fails nbval, and a number
   that nbval_sanitize.cfg masks does not.
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

from expected_outputs import checked_cells

from fluxlab import notebook, store

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
MINE = ["validation_session", "regression_analysis", "memory_graphs", "gradient_flow"]
# inference_session.ipynb has its own test (tests/notebooks/test_inference_session.py).
NOTEBOOKS = MINE
ALL = sorted(p.stem for p in NB_DIR.glob("*.ipynb"))
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
    checked = checked_cells(nb)
    for c in nb.cells:
        if c.cell_type == "code" and c not in checked:
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


@pytest.mark.parametrize("name", ALL)
def test_every_notebook_carries_the_expected_output_of_a_checked_cell(name):
    """nbval compares a `# NBVAL_CHECK_OUTPUT` cell only when the notebook it runs stores that cell with
    an execution count; an empty expected output would compare nothing."""
    checked = checked_cells(nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4))
    assert checked, f"{name}: no '# NBVAL_CHECK_OUTPUT' cell, so nbval compares nothing"
    for c in checked:
        assert c.execution_count is not None and c.outputs, \
            f"{name}: checked cell without its expected output; run tests/notebooks/expected_outputs.py {name}"
        assert all(o.output_type != "error" for o in c.outputs), f"{name}: the expected output is an error"


def nbval(notebook_path: Path, env: dict, sanitize: bool = True) -> subprocess.CompletedProcess:
    """`pytest --nbval-lax` on one notebook, beside a copy of notebooks/conftest.py, as CI runs it."""
    folder = notebook_path.parent
    shutil.copy(NB_DIR / "conftest.py", folder / "conftest.py")
    masks = ["--nbval-sanitize-with", str(NB_DIR / "nbval_sanitize.cfg")] if sanitize else []
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", *masks,
           f"--nbval-cell-timeout={TIMEOUT}", "-p", "no:cacheprovider", "-q", "--rootdir", str(folder),
           str(notebook_path)]
    return subprocess.run(cmd, cwd=folder, env={**os.environ, **env}, capture_output=True, text=True)


def prepared_copy(name: str, folder: Path) -> Path:
    """The papermill-prepared copy CI hands to nbval; it must still carry the expected outputs."""
    folder.mkdir(parents=True)
    prepared = notebook.prepare_copy(name, "ci", folder / f"{name}.ipynb")
    checked = checked_cells(nbformat.read(prepared, as_version=4))
    assert checked and all(c.execution_count is not None and c.outputs for c in checked), \
        f"{name}: the prepared copy lost the expected outputs, so nbval would compare nothing"
    return prepared


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
    proc = nbval(prepared_copy(name, work / "nbval" / name), env)
    assert proc.returncode == 0, f"nbval failed for {name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout


def test_a_changed_verdict_in_the_expected_output_fails_nbval(work):
    """The comparison can fail: one verdict in gradient_flow's expected output turned from pass to fail."""
    env = {"FLUXLAB_STORE": str(work / "planted.db"), **{k: v for k, v in ENV_KEEP.items() if v}}
    prepared = prepared_copy("gradient_flow", work / "planted")
    nb = nbformat.read(prepared, as_version=4)
    out = checked_cells(nb)[0].outputs[0]
    assert "gradflow/audits: pass\n" in out.text, out.text  # the line the mutation targets
    out.text = out.text.replace("gradflow/audits: pass\n", "gradflow/audits: fail\n")
    nbformat.write(nb, prepared)
    proc = nbval(prepared, env)
    assert proc.returncode != 0, "nbval passed although a verdict in the expected output was changed"
    assert "Cell outputs differ" in proc.stdout and "gradflow/audits: fail" in proc.stdout, proc.stdout[-3000:]


def test_sanitize_config_masks_numbers_but_not_words(tmp_path):
    """nbval_sanitize.cfg takes effect: a checked output that differs from the expected one only in a
    duration passes with it and fails without it; a changed word fails either way."""
    def notebook_printing(folder: Path, expected: str) -> Path:
        folder.mkdir()
        cell = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('rope: pass in 3.25 ms')", execution_count=1,
                                         outputs=[nbformat.v4.new_output("stream", name="stdout", text=expected)])
        path = folder / "tiny.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
        return path

    timing = notebook_printing(tmp_path / "timing", "rope: pass in 1.5 ms\n")
    assert nbval(timing, {}).returncode == 0
    assert nbval(timing, {}, sanitize=False).returncode != 0
    verdict = notebook_printing(tmp_path / "verdict", "rope: fail in 3.25 ms\n")
    assert nbval(verdict, {}).returncode != 0


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
