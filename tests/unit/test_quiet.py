"""Quiet runs: what a command prints is what the user needs (no torchvision fallback notes, config
warnings as one line without Python's source echo)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code_or_args, home, **kw):
    env = {**os.environ, "FLUXLAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": ""}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300, **kw)


def test_loading_a_pipeline_prints_no_torchvision_fallback_note(home, pipe):
    proc = _run(["-c", "from fluxlab import models; models.load_pipeline('tiny', 'cpu'); print('ok')"], home)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "torchvision" not in proc.stderr, proc.stderr[-2000:]


def test_config_warnings_are_one_plain_line(home, tmp_path):
    proc = _run(["-m", "fluxlab", "train", "configs/tiny.yaml", "--set", "steps=1", "--set", "lr_warmup_steps=50",
                 "--set", f"data={tmp_path / 'missing'}", "--set", f"output_dir={tmp_path / 'out'}"], home)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[0] == ("fluxlab: warning: lr_warmup_steps (50) > steps (1): the learning rate never reaches "
                        "learning_rate"), lines
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert len(lines) == 2 and lines[1].startswith("fluxlab: error: dataset folder")
