"""Checkpoints: bitwise resume (6 steps == 3 + resume + 3), refusing a corrupt checkpoint,
`--resume latest` skipping a corrupt newer one, and SIGINT finishing with a checkpoint."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fluxlab import checkpoints
from fluxlab.cli import main
from fluxlab.config import load_config
from fluxlab.trainer import LORA_FILE, Trainer

ROOT = Path(__file__).resolve().parents[2]

# Accumulation 2 x batch 2 over 16 images: 4 steps per epoch, so 6 steps cross an epoch and the
# resume point (step 3) sits mid-epoch. Warm-up exercises the LR scheduler state, dropout the
# restored global RNG, validation the best-checkpoint metadata.
SETTINGS = {"num_workers": "0", "progress": "false", "max_sequence_length": "16", "batch_size": "2",
            "gradient_accumulation": "2", "rank": "4", "lora_dropout": "0.1", "lr_warmup_steps": "2",
            "device": "cpu", "log_every": "1", "checkpoint_every": "0", "validation_every": "0", "keep_last": "3"}


def _cfg(shapes, out, **kw):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       {**SETTINGS, "data": str(shapes), "output_dir": str(out), **{k: str(v) for k, v in kw.items()}})


def _run(pipe, cfg, resume=None):
    tr = Trainer(cfg, pipe=copy.deepcopy(pipe), resume=resume).setup()
    res = tr.train()
    return tr, res


@pytest.fixture(scope="module")
def three_steps(pipe, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    _run(pipe, _cfg(shapes, out, steps=3))
    return out


def test_resume_is_bitwise_exact(pipe, shapes, tmp_path, three_steps):
    full_tr, full = _run(pipe, _cfg(shapes, tmp_path / "full", steps=6))
    split = tmp_path / "split"
    shutil.copytree(three_steps, split)
    resumed_tr, resumed = _run(pipe, _cfg(shapes, split, steps=6), resume="latest")
    assert resumed.start_step == 3 and resumed.steps_done == full.steps_done == 6
    a, b = full_tr.trainable_parameters(), resumed_tr.trainable_parameters()
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    fa, fb = load_file(str(tmp_path / "full" / LORA_FILE)), load_file(str(split / LORA_FILE))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    # The LoRA really moved away from its init (B starts at zero), so equality is not trivial.
    assert any(fa[k].abs().sum() > 0 for k in fa if "lora_B" in k)
    # The metrics history reads once per step across the two processes.
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [round(x, 12) for x in resumed.losses] == [round(x, 12) for x in full.losses[3:]]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_dir_refuses_a_corrupt_checkpoint_naming_the_file(three_steps, shapes, tmp_path, capsys):
    bad = tmp_path / "step_3"
    shutil.copytree(three_steps / "checkpoints" / "step_3", bad)
    _flip_byte(bad / checkpoints.TENSORS_FILE)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()), **SETTINGS,
                                   "data": str(shapes), "output_dir": str(tmp_path / "out"), "steps": 6}))
    rc = main(["train", str(cfg), "--resume", str(bad)])
    assert rc != 0
    err = capsys.readouterr().err
    assert str(bad / checkpoints.TENSORS_FILE) in err and "SHA-256" in err
    assert not (tmp_path / "out" / LORA_FILE).exists()


def test_resume_latest_skips_a_corrupt_newer_checkpoint(pipe, three_steps, shapes, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    newer = out / "checkpoints" / "step_5"
    shutil.copytree(out / "checkpoints" / "step_3", newer)
    _flip_byte(newer / checkpoints.STATE_FILE)
    tr = Trainer(_cfg(shapes, out, steps=6), pipe=copy.deepcopy(pipe), resume="latest").setup()
    assert tr.global_step == 3
    err = capsys.readouterr().err
    assert f"skipping corrupt checkpoint {newer}" in err and checkpoints.STATE_FILE in err
    assert "resumed from" in err and "step_3" in err


def test_sigint_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(shapes, home, tmp_path):
    out = tmp_path / "sig"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()), **SETTINGS,
                                   "data": str(shapes), "output_dir": str(out), "steps": 100000}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fluxlab", "train", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]  # 128 + SIGINT: an interrupted run is not a success
    assert stderr.count("SIGINT received") == 1  # the main process alone speaks, not the workers
    assert f"fluxlab train {cfg} --resume latest" in stderr
    path, skipped = checkpoints.latest_checkpoint(out / "checkpoints")
    assert path is not None and not skipped
    checkpoints.verify_checkpoint(path)
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert checkpoints.load_checkpoint(path).step == last >= 2
    assert not (out / LORA_FILE).exists()  # interrupted: only the checkpoint, no "final" LoRA
