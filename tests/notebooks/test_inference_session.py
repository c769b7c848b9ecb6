"""inference_session.ipynb with the ci parameters on the CPU: it runs under papermill (every assert
cell passes, records land in the store), then the papermill-prepared copy passes `pytest --nbval-lax`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDS = {"inference/latency", "inference/vram_stages", "inference/leak", "inference/determinism"}


@pytest.mark.slow
def test_inference_session_papermill_then_nbval(tmp_path):
    from fluxlab import notebook

    env = {"FLUXLAB_STORE": str(tmp_path / "store.db"), "HF_HUB_OFFLINE": "1"}
    result = notebook.run("inference_session", "ci", runs_dir=tmp_path / "runs", env=env)
    assert result.ok, result.error
    assert {r["benchmark"] for r in result.records} == RECORDS
    assert all(r["params"]["model"] == "tiny" for r in result.records)

    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", result.output]
    sanitize = ROOT / "notebooks" / "nbval_sanitize.cfg"
    if sanitize.exists():
        cmd += ["--nbval-sanitize-with", str(sanitize)]
    # cwd = tmp_path: no ini file there, so the repo's pytest options do not apply to the notebook run.
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
