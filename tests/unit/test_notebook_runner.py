"""The papermill runner (fluxlab.notebook) on a tiny throwaway notebook: parameter checks,
output naming, exit status, and sweep mechanics (skip on re-run, failed cells, GPU pinning)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from fluxlab import cli, notebook, sweeps, tables

PARAMS = '''x: int = 1  # grid value; 2 fails on purpose
rate: float = 0.5  # a float
label: str = "a"  # a string
flag: bool = False  # a bool
shapes: list = [[1, 2]]  # a list
out_dir: str = ""  # where to write what the kernel saw'''

BODY = '''import json, os, pathlib
if out_dir:
    pathlib.Path(out_dir, f"cell_{x}_{label}.json").write_text(json.dumps(
        {"x": x, "rate": rate, "flag": flag, "shapes": shapes, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
         "run_id": os.environ.get("FLUXLAB_RUN_ID"), "notebook": os.environ.get("FLUXLAB_NOTEBOOK")}))
assert x != 2, "x=2 is the planted failure"'''


def _make_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell(PARAMS)
    p.metadata.tags = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(BODY)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tinynb.ipynb"
    nbformat.write(nb, path)
    (folder / "params" / "ci").mkdir(parents=True)
    (folder / "params" / "ci" / "tinynb.yaml").write_text("rate: 0.25\n")
    return path


@pytest.fixture()
def nb(tmp_path):
    return _make_notebook(tmp_path / "nbs")


def test_unknown_parameter_is_refused_with_a_suggestion(nb):
    with pytest.raises(notebook.ParameterError, match=r"unknown parameter 'rat'; did you mean 'rate'\?"):
        notebook.check_parameters(nb, {"rat": "0.1"})
    with pytest.raises(notebook.ParameterError, match="unknown parameter 'zzz'"):
        notebook.check_parameters(nb, {"zzz": "1"})


@pytest.mark.parametrize("name,value", [("x", "abc"), ("x", "1.5"), ("x", "true"), ("rate", "fast"),
                                        ("flag", "maybe"), ("shapes", "3")])
def test_mistyped_value_is_refused(nb, name, value):
    with pytest.raises(notebook.ParameterError, match=f"parameter '{name}' expects"):
        notebook.check_parameters(nb, {name: value})


def test_values_are_converted_to_the_declared_type(nb):
    got = notebook.check_parameters(nb, {"x": "3", "rate": "2", "label": "1e-3", "flag": "true",
                                         "shapes": "[[2, 64], [1, 3]]"})
    assert got == {"x": 3, "rate": 2.0, "label": "1e-3", "flag": True, "shapes": [[2, 64], [1, 3]]}
    assert isinstance(got["rate"], float)


def test_preset_file_is_checked_too(nb):
    assert notebook.prepare(nb, "ci")[1] == {"rate": 0.25}
    (nb.parent / "params" / "ci" / "tinynb.yaml").write_text("rte: 0.25\n")
    with pytest.raises(notebook.ParameterError, match="did you mean 'rate'"):
        notebook.prepare(nb, "ci")


def test_split_values_keeps_brackets_together():
    assert notebook.split_values("a,b , [1, 2],{'k': 1}") == ["a", "b", "[1, 2]", "{'k': 1}"]


def test_cli_refuses_unknown_parameter_before_running(nb, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["notebook", "run", str(nb), "-p", "lable=b"])
    assert rc == 2
    assert "did you mean 'label'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_unknown_notebook_name_is_refused():
    with pytest.raises(notebook.ParameterError, match="unknown notebook 'validation_sesion'"):
        notebook.resolve("validation_sesion")


def test_run_writes_stamped_output_and_reports_failure(nb, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = tmp_path / "seen"
    seen.mkdir()
    res = notebook.run(nb, "ci", {"x": "5", "out_dir": str(seen)}, runs_dir=tmp_path / "runs")
    assert res.ok, res.error
    out = Path(res.output)
    assert out.parent == tmp_path / "runs" / "tinynb" and out.exists()
    assert out.name.endswith(f"_{res.run_id}.ipynb") and out.name[:8].isdigit() and out.name[15] == "Z"
    kernel_saw = json.loads((seen / "cell_5_a.json").read_text())
    assert kernel_saw["rate"] == 0.25 and kernel_saw["run_id"] == res.run_id and kernel_saw["notebook"] == "tinynb"
    # A failing cell: the CLI exits non-zero and names the error.
    rc = cli.main(["notebook", "run", str(nb), "-p", "x=2"])
    assert rc == 1
    assert "x=2 is the planted failure" in capsys.readouterr().err


def test_sweep_runs_every_cell_skips_successes_and_lists_failures(nb, tmp_path, monkeypatch):
    seen = tmp_path / "seen"
    seen.mkdir()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # two "GPUs": each worker is pinned to one
    grid = {"x": ["1", "2", "3"], "out_dir": [str(seen)]}
    first = sweeps.sweep(nb, "ci", grid, workers=2, runs_dir=tmp_path / "runs")
    status = {r.params["x"]: r for r in first}
    assert [status[x].status for x in (1, 2, 3)] == ["ok", "failed", "ok"]  # the failure did not stop x=3
    assert "AssertionError" in status[2].error and "planted failure" in status[2].error
    for r in first:
        assert Path(r.output).exists()  # each cell has its own output notebook, the failed one too
    gpus = {json.loads((seen / f"cell_{x}_a.json").read_text())["gpu"] for x in (1, 2, 3)}
    assert gpus <= {"5", "7"}  # one GPU per cell, never the whole list
    summary = sweeps.sweep_summary(first)
    assert "failed" in summary and "planted failure" in summary

    # Re-run: the successes are skipped, the failure runs again.
    for f in seen.iterdir():
        f.unlink()
    second = sweeps.sweep(nb, "ci", grid, workers=2, runs_dir=tmp_path / "runs")
    assert {r.params["x"]: r.status for r in second} == {1: "skipped", 2: "failed", 3: "skipped"}
    assert sorted(p.name for p in seen.iterdir()) == ["cell_2_a.json"]

    # --force runs everything again.
    forced = sweeps.sweep(nb, "ci", {"x": ["1"], "out_dir": [str(seen)]}, force=True, runs_dir=tmp_path / "runs")
    assert [r.status for r in forced] == ["ok"]


def test_sweep_refuses_a_bad_value_before_running_anything(nb, tmp_path):
    with pytest.raises(notebook.ParameterError, match="expects int"):
        sweeps.sweep(nb, "ci", {"x": ["1", "two"]}, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_verdict_table_lists_records_and_failed_runs():
    recs = [{"notebook": "validation_session", "benchmark": "rope", "verdict": "faster", "ratio": 1.5,
             "ci_low": 1.4, "ci_high": 1.6}]
    failed = notebook.RunResult("memory_graphs", "x.ipynb", False, {}, "id", 1.0, error="AssertionError: leak")
    table = tables.verdict_table(recs, [failed])
    assert "rope" in table and "faster" in table and "1.500" in table and "[1.400, 1.600]" in table
    assert "memory_graphs" in table and "AssertionError: leak" in table


def test_series_samples_track_the_measured_side_whatever_the_key_order():
    from fluxlab.measure.regression import series_samples

    base, cand = [10.0, 11.0, 12.0], [5.0, 6.0, 7.0]
    # The store sorts keys: "baseline" comes first, and must not be mistaken for the measured side.
    for key in ("candidate", "variant", "impl", "ddp"):
        assert series_samples({"samples": {"baseline": base, key: cand}}) == cand
    assert series_samples({"samples": {"baseline": base, "compiled": base}}) is None
    assert series_samples({"samples": cand}) == cand
    # A record whose fast path did not run is not a point in the fast path's history.
    assert series_samples({"samples": cand, "metrics": {"evidence": {"ran": False}}}) is None
    assert series_samples({"samples": cand, "metrics": {"evidence": {"ran": True}}}) == cand
