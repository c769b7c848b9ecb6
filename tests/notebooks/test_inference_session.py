"""inference_session.ipynb with the ci parameters on the CPU: it runs under papermill (every assert
cell passes, records land in the store), then its papermill-prepared copy, which carries the committed
expected output of the checked cell, passes `pytest --nbval-lax` (the comparison included)."""

from __future__ import annotations

import pytest
from test_notebooks import ENV_KEEP, nbval, prepared_copy

RECORDS = {"inference/latency", "inference/vram_stages", "inference/leak", "inference/determinism"}


@pytest.mark.slow
def test_inference_session_papermill_then_nbval(tmp_path):
    from fluxlab import notebook

    env = {"FLUXLAB_STORE": str(tmp_path / "store.db"), "HF_HUB_OFFLINE": "1",
           **{k: v for k, v in ENV_KEEP.items() if v}}
    result = notebook.run("inference_session", "ci", runs_dir=tmp_path / "runs", env=env)
    assert result.ok, result.error
    assert {r["benchmark"] for r in result.records} == RECORDS
    assert all(r["params"]["model"] == "tiny" for r in result.records)

    proc = nbval(prepared_copy("inference_session", tmp_path / "nbval"), env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
