"""What the CLI tables tell a reader: sweep files named by the swept keys, `results list` with a
header and no `None`, and the reason beside every `inconclusive` verdict."""

from fluxlab import cli, store, sweeps, tables

LONG = {"model": "tiny", "prompt": "a red circle on a white background " * 4, "seeds": list(range(20)),
        "peak_budget_mb": 4096.0, "max_sequence_length": 64, "leftover_budget_mb": 64.0}


def test_sweep_cell_names_start_with_the_swept_keys():
    a = sweeps.cell_key({**LONG, "steps": 2, "warmup": 1}, "ci", swept=["warmup", "steps"])
    b = sweeps.cell_key({**LONG, "steps": 4, "warmup": 1}, "ci", swept=["warmup", "steps"])
    assert a.startswith("warmup=1__steps=2__") and b.startswith("warmup=1__steps=4__")
    # Fixed parameters stay out of the name but not out of the hash: other fixed values, other file.
    c = sweeps.cell_key({**LONG, "model": "flux1-dev", "steps": 2, "warmup": 1}, "ci", swept=["warmup", "steps"])
    assert c.split("__")[:2] == a.split("__")[:2] and c != a
    # A long swept value is cut, its key never is.
    d = sweeps.cell_key(LONG, "ci", swept=["prompt", "model"])
    assert "__model=tiny__" in d and len(d.split("__")[0]) <= len("prompt=") + 40


def _rec(verdict, reason=None, **kw):
    return {"notebook": "validation_session", "benchmark": "rope.fwd", "verdict": verdict,
            "metrics": {"reason": reason} if reason else {}, **kw}


def test_verdict_table_gives_the_reason_beside_every_inconclusive_row():
    why = "n=4 per side: the smallest one-sided p reachable is 0.014 > 0.01"
    table = tables.verdict_table([_rec("inconclusive", why), _rec("inconclusive"), _rec(None),
                                    _rec("faster", "p=1e-6, ratio 1.31 > 1.05", ratio=1.31)])
    head, _, *rows = table.splitlines()
    assert head.split()[-1] == "reason"
    assert why in rows[0]
    assert "(no reason recorded)" in rows[1]
    assert "measured" in rows[2] and "None" not in table


def test_results_list_has_a_header_and_no_none_verdicts(tmp_path, capsys):
    db = tmp_path / "s.db"
    store.record("infer/latency", verdict=None, samples=[1.0, 2.0], store=db, display=False)
    store.record("rope.fwd", verdict="faster", ratio=1.31, ci_low=1.2, ci_high=1.4, samples=[1.0], store=db,
                 metrics={"evidence": {"ran": True, "reason": "rope +1"}},
                 display=False)
    assert cli.main(["results", "--store", str(db), "list"]) == 0
    head, rule, *rows = capsys.readouterr().out.splitlines()
    assert head.split()[:4] == ["utc", "benchmark", "device", "verdict"] and set(rule) <= {"-", " "}
    assert len(rows) == 2 and "None" not in "".join(rows)
    assert "measured" in rows[0] and "[1.200, 1.400]" in rows[1]
    # Columns line up under the header.
    col = head.index("verdict")
    assert rows[0][col:].startswith("measured") and rows[1][col:].startswith("faster")
