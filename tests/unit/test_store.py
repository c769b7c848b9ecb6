"""The results store: round trip, provenance, concurrency, corruption, export/import, harvest."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fluxlab import cli, store

EXPORTED = ("benchmark", "verdict", "ratio", "ci_low", "ci_high")


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "results" / "fluxlab.db"


def _two_records(db):
    a = store.record("rope.fwd", verdict="faster", ratio=1.31, ci_low=1.22, ci_high=1.4,
                     samples={"baseline": [2.0, 2.1, 2.05], "candidate": [1.5, 1.6, 1.55]},
                     metrics={"tflops": 312.5, "evidence": {"ran": True, "reason": "rope.fwd +3"}}, params={"seq": 4608, "dtype": "bf16"},
                     notebook="validation_session", device="cuda:0", store=db, display=False)
    b = store.record("train.step", verdict="no-difference", ratio=0.99, ci_low=0.95, ci_high=1.03,
                     samples=[545.0, 546.0, 544.5], store=db, display=False)
    return a, b


def test_record_round_trip_and_query_filters(db):
    a, b = _two_records(db)
    assert store.query(db) == [a, b]
    assert store.query(db, benchmark="rope.fwd") == [a]
    assert store.query(db, verdict="no-difference", ratio=0.99) == [b]  # SQL column + JSON field filters
    assert a["id"] != b["id"] and a["run_id"] == b["run_id"]  # one process = one run
    assert a["samples"]["candidate"] == [1.5, 1.6, 1.55]
    with pytest.raises(ValueError, match="unknown field"):
        store.query(db, benchmarck="rope.fwd")


def test_provenance_fields_present(db):
    rec = store.record("x", store=db, display=False, params={"n": 1}, notebook="nb")
    for key in ("run_id", "notebook", "params", "git_commit", "git_dirty", "host", "device", "device_name",
                "driver", "torch", "triton", "diffusers", "peft", "utc", "samples"):
        assert key in rec, key
    assert rec["params"] == {"n": 1} and rec["notebook"] == "nb"
    # This test runs inside the git checkout, so the commit must be resolved, not left unknown.
    assert rec["git_commit"] is not None and len(rec["git_commit"]) == 40
    assert isinstance(rec["git_dirty"], bool)
    assert rec["utc"].endswith("Z")


def test_default_store_path_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXLAB_STORE", str(tmp_path / "env.db"))
    assert store.default_store_path() == tmp_path / "env.db"
    rec = store.record("via-env", display=False)
    assert [r["id"] for r in store.query()] == [rec["id"]]
    monkeypatch.delenv("FLUXLAB_STORE")
    assert store.default_store_path().parts[-2:] == ("results", "fluxlab.db")


def test_record_displays_mime_bundle_in_ipython(db, monkeypatch):
    IPython = pytest.importorskip("IPython")
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    rec = store.record("shown", ratio=1.5, ci_low=1.4, ci_high=1.6, store=db)
    (bundle, raw), = shown
    assert raw and bundle[store.RECORD_MIME] == rec and "shown" in bundle["text/plain"]


WRITER = textwrap.dedent("""
    import sys, time, pathlib
    from fluxlab import store
    db, who, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
    pathlib.Path(go.parent, who + ".ready").touch()
    while not go.exists():  # start together so the writes really overlap
        time.sleep(0.005)
    for i in range(n):
        store.record("concurrent", params={"writer": who, "i": i}, store=db, display=False)
""")


def test_concurrent_writers_lose_no_rows(db, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), f"w{k}", "25", str(go)]) for k in range(4)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("*.ready"))) < 4 and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    rows = store.query(db, benchmark="concurrent")
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100
    assert {(r["params"]["writer"], r["params"]["i"]) for r in rows} == {(f"w{k}", i) for k in range(4) for i in range(25)}


def test_corrupt_database_gives_clear_error(db, capsys):
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not sqlite " * 300)
    with pytest.raises(store.StoreError) as err:
        store.record("x", store=db, display=False)
    assert str(db) in str(err.value) and "corrupt" in str(err.value) and "Move it aside" in str(err.value)
    assert cli.main(["results", "--store", str(db), "list"]) == 2
    assert str(db) in capsys.readouterr().err


def test_export_json_and_csv_fields(db, tmp_path, capsys):
    a, b = _two_records(db)
    lines = [json.loads(line) for line in store.export_records("json", db).splitlines()]
    assert [ln["id"] for ln in lines] == [a["id"], b["id"]]
    for line, rec in zip(lines, (a, b)):
        assert {k: line[k] for k in EXPORTED} == {k: rec[k] for k in EXPORTED}
    rows = list(csv.DictReader(io.StringIO(store.export_records("csv", db))))
    assert rows[0]["benchmark"] == "rope.fwd" and float(rows[0]["ci_high"]) == a["ci_high"]
    assert json.loads(rows[0]["samples"]) == a["samples"]  # nested fields survive as JSON
    assert rows[1]["verdict"] == "no-difference" and float(rows[1]["ratio"]) == b["ratio"]
    out = tmp_path / "out.csv"
    assert cli.main(["results", "--store", str(db), "export", "--csv", "--out", str(out)]) == 0
    assert out.read_text() == store.export_records("csv", db)
    assert cli.main(["results", "--store", str(db), "export", "--json"]) == 0
    assert capsys.readouterr().out.endswith(store.export_records("json", db))


def test_import_jsonl_is_idempotent(db, tmp_path, capsys):
    a, b = _two_records(db)
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    (committed / "h200.jsonl").write_text(store.export_records("json", db))
    fresh = tmp_path / "fresh.db"
    assert store.import_jsonl(committed, fresh) == 2
    assert store.import_jsonl(committed, fresh) == 0
    assert store.query(fresh) == [a, b]
    assert cli.main(["results", "--store", str(fresh), "import", str(committed)]) == 0
    assert "0 new records" in capsys.readouterr().out
    (committed / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(store.StoreError, match=r"bad\.jsonl:1"):
        store.import_jsonl(committed, fresh)


def test_harvest_rebuilds_records_from_executed_notebooks(db, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    a, _ = _two_records(db)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# run"),
        nbformat.v4.new_code_cell("store.record(...)", execution_count=1, outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="hello\n"),
            nbformat.v4.new_output("display_data", data={store.RECORD_MIME: a, "text/plain": "rec"}),
            nbformat.v4.new_output("execute_result", data={"text/plain": "42"}, execution_count=1),
        ]),
    ]
    run_dir = tmp_path / "runs" / "validation_session"
    run_dir.mkdir(parents=True)
    nbformat.write(nb, run_dir / "20260101T000000Z_abc.ipynb")
    fresh = tmp_path / "fresh.db"
    assert store.harvest(tmp_path / "runs", fresh) == 1
    assert store.harvest(tmp_path / "runs", fresh) == 0
    assert store.query(fresh) == [a]


def test_series_never_mixes_devices_or_params():
    base = {"benchmark": "b", "device_name": "H200", "params": {"n": 1}}
    recs = [dict(base, utc="2026-01-02"), dict(base, utc="2026-01-01"),
            dict(base, device_name="H100", utc="2026-01-01"), dict(base, params={"n": 2}, utc="2026-01-01")]
    groups = store.series(recs)
    assert len(groups) == 3
    assert [r["utc"] for r in groups[store.series_key(base)]] == ["2026-01-01", "2026-01-02"]
    # Samples taken with another clock (do_bench then, blocked CUDA events now) are another series.
    blocked = dict(base, utc="2026-01-03", metrics={"timing": {"clock": "blocked-events"}})
    assert len(store.series(recs + [blocked])) == 4


def test_comparison_records_with_its_statistics(db):
    from fluxlab import bench

    base, cand = [2.0, 2.1, 2.05, 2.02, 2.08], [1.0, 1.05, 1.02, 1.01, 1.04]
    cmp = bench.compare(base, cand)
    rec = store.record("kernel", samples={"baseline": base, "candidate": cand}, store=db, display=False,
                       **cmp.record_fields())
    assert (rec["verdict"], rec["ratio"], rec["ci_low"]) == (cmp.verdict, cmp.ratio, cmp.ci_low)
    assert rec["metrics"]["p_faster"] == cmp.p_faster


def test_cli_list_and_reading_a_missing_store(db, capsys):
    assert cli.main(["results", "--store", str(db), "list"]) == 0
    assert "no records" in capsys.readouterr().out and not db.exists()  # listing creates nothing
    a, _ = _two_records(db)
    assert cli.main(["results", "--store", str(db), "list"]) == 0
    head, rule, *out = capsys.readouterr().out.splitlines()  # a header and its rule, then the records
    assert head.split() == ["utc", "benchmark", "device", "verdict", "ratio", "95%", "CI", "id"] and set(rule) <= {"-", " "}
    assert len(out) == 2 and "rope.fwd" in out[0] and "faster" in out[0] and a["id"][:8] in out[0]
