"""The validation notebook on a researcher's own target (examples/my_gelu.py), named as
package.module:ATTR: the fast path that silently falls back is recorded did-not-run, the one that
really runs gets a timing verdict, both with evidence from the timed loop."""

from __future__ import annotations

import os

import pytest

from fluxlab import notebook, store

ENV = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET") or ("1" if not notebook.gpu_ids() else "")}


@pytest.mark.parametrize("dtype, ran", [("bf16", False), ("fp32", True)])
def test_external_target_through_the_notebook(tmp_path, dtype, ran):
    db = tmp_path / "r.db"
    res = notebook.run("validation_session", "ci", {"target": "examples.my_gelu:T", "dtype": dtype},
                       runs_dir=tmp_path / "runs", env={"FLUXLAB_STORE": str(db), **{k: v for k, v in ENV.items() if v}},
                       timeout=300)
    assert res.ok, res.error
    (rec,) = store.query(db, benchmark="validation/my_gelu", run_id=res.run_id)
    ev = rec["metrics"]["evidence"]
    assert ev["checked"] == "timed-loop" and ev["ran"] is ran, ev
    if ran:
        assert rec["verdict"] not in ("did-not-run", "unverified") and ev["kernel_names"] == ["fluxlab_example::fast_gelu"]
    else:
        assert rec["verdict"] == "did-not-run"
