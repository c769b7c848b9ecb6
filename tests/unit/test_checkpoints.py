"""Checkpoints: round trip, refusal of every kind of damage, latest/retention, kill -9, RNG."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from fluxlab import checkpoints as ck


def _training_state(seed: int = 0):
    """A real optimizer + LR scheduler after a few steps, so their state is non-trivial."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(2, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ck.capture_rng_state(),
             "sampler": {"epoch": 2, "position": 17, "order": torch.randperm(10)}}
    return tensors, state


def _save(root, step, val_loss=None, seed=0):
    tensors, state = _training_state(seed)
    meta = {"config": {"lr": 1e-2, "rank": 4}} | ({"val_loss": val_loss} if val_loss is not None else {})
    return ck.save_checkpoint(root, step, tensors=tensors, state=state, meta=meta), tensors, state


def _assert_tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tree_equal(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    path, tensors, state = _save(tmp_path, 5, val_loss=0.25)
    assert path == tmp_path / "step_5"
    got = ck.load_checkpoint(path)
    _assert_tree_equal(tensors, got.tensors)
    _assert_tree_equal(state, got.state)
    assert got.meta == {"step": 5, "val_loss": 0.25, "config": {"lr": 1e-2, "rank": 4}}
    assert got.step == 5
    # The state file really is loadable by the restricted unpickler on its own.
    torch.load(path / ck.STATE_FILE, weights_only=True)
    assert sorted(os.listdir(tmp_path)) == ["step_5"]  # no temp folder left behind


def test_restored_optimizer_continues_identically(tmp_path):
    path, tensors, state = _save(tmp_path, 1)
    got = ck.load_checkpoint(path)

    def next_params(tensors, opt_state):
        model = torch.nn.Linear(8, 4)
        model.load_state_dict(tensors)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt.load_state_dict(opt_state)
        torch.manual_seed(123)
        model(torch.randn(2, 8)).square().mean().backward()
        opt.step()
        return model.weight.detach().clone()

    assert torch.equal(next_params(tensors, state["optimizer"]), next_params(got.tensors, got.state["optimizer"]))


def test_state_that_weights_only_refuses_is_rejected_at_save(tmp_path):
    import datetime  # picklable, but not on weights_only's allow-list

    with pytest.raises(TypeError, match="weights_only"):
        ck.save_checkpoint(tmp_path, 1, tensors={}, state={"x": datetime.date(2020, 1, 1)}, meta={})
    assert ck.list_checkpoints(tmp_path) == []


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-7])


def _flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ck.CHECKPOINT_FILES)
@pytest.mark.parametrize("damage,reason", [(_truncate, "truncated"), (_flip, "SHA-256"),
                                           (Path.unlink, "missing")])
def test_damage_is_refused_naming_the_file(tmp_path, monkeypatch, name, damage, reason):
    path, _, _ = _save(tmp_path, 3)
    damage(path / name)
    # Nothing may be deserialized from a checkpoint that fails verification.
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(safetensors.torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(path)
    assert str(path / name) in str(e.value) and reason in str(e.value)
    assert "--resume latest" in str(e.value)
    assert calls == []


def test_missing_manifest_is_refused(tmp_path):
    path, _, _ = _save(tmp_path, 3)
    (path / ck.MANIFEST_FILE).unlink()
    with pytest.raises(ck.CheckpointError, match="missing manifest") as e:
        ck.verify_checkpoint(path)
    assert str(path / ck.MANIFEST_FILE) in str(e.value)


def test_latest_skips_corrupt_newer_and_names_it(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    newest, _, _ = _save(tmp_path, 30)
    _flip(newest / ck.TENSORS_FILE)
    (tmp_path / ".tmp-step_40-host-1-deadbeef").mkdir()  # an interrupted save: hidden, ignored
    path, skipped = ck.latest_checkpoint(tmp_path)
    assert path == tmp_path / "step_20"
    assert [p for p, _ in skipped] == [newest]
    assert str(newest / ck.TENSORS_FILE) in skipped[0][1]
    assert ck.latest_checkpoint(tmp_path / "nothing") == (None, [])


def test_save_replaces_same_step(tmp_path):
    _save(tmp_path, 4, seed=0)
    _, tensors, _ = _save(tmp_path, 4, seed=1)
    _assert_tree_equal(tensors, ck.load_checkpoint(tmp_path / "step_4").tensors)
    assert sorted(os.listdir(tmp_path)) == ["step_4"]


def test_retention_keeps_last_n_plus_best(tmp_path):
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.8}
    for step, loss in losses.items():
        _save(tmp_path, step, val_loss=loss)
    deleted = ck.apply_retention(tmp_path, keep_last=2)
    assert deleted == [tmp_path / "step_3", tmp_path / "step_1"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5, 4, 2]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with pytest.raises(ValueError, match="keep_last"):
        ck.apply_retention(tmp_path, keep_last=0)


def test_retention_never_trades_the_last_good_checkpoint_for_a_corrupt_one(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    _flip(tmp_path / "step_3" / ck.STATE_FILE)
    _flip(tmp_path / "step_1" / ck.STATE_FILE)
    # step_3 is corrupt and newer: kept for inspection; step_2 is the newest good one; step_1 goes.
    assert ck.apply_retention(tmp_path, keep_last=1) == [tmp_path / "step_1"]
    assert ck.latest_checkpoint(tmp_path)[0] == tmp_path / "step_2"


def test_retention_without_val_loss_keeps_last_n(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert ck.apply_retention(tmp_path, keep_last=1) == [tmp_path / "step_2", tmp_path / "step_1"]


def test_rng_capture_restore_reproduces_draws():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian, part of Python's state
    state = ck.capture_rng_state()

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(4).tolist())

    first = draws()
    assert draws() != first  # the generators moved on...
    # ...and the restored state, after a weights_only round trip, replays them exactly.
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    ck.restore_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert draws() == first


_KILL_CHILD = textwrap.dedent("""
    import sys, time, torch
    from fluxlab import checkpoints as ck
    root = sys.argv[1]
    big = {"w": torch.randn(1024, 1024)}  # 4 MiB per file write
    ck.save_checkpoint(root, 1, tensors=big, state={"step": 1}, meta={})
    real_write = ck._write_file
    def slow_write(path, data):
        real_write(path, data)
        print("wrote", path.name, flush=True)
        time.sleep(60)  # the parent kills us here, mid-save
    ck._write_file = slow_write
    ck.save_checkpoint(root, MODE_STEP, tensors={"w": torch.zeros(1024, 1024)}, state={"step": 2}, meta={})
""")


@pytest.mark.parametrize("next_step", [2, 1], ids=["new-step", "replacing-same-step"])
def test_kill_9_during_save_leaves_previous_checkpoint(tmp_path, next_step):
    script = _KILL_CHILD.replace("MODE_STEP", str(next_step))
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stdout.readline()  # blocks until the second save has written its first file
        assert line.startswith("wrote"), f"child did not reach the second save: {line!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    path, skipped = ck.latest_checkpoint(tmp_path)
    assert path == tmp_path / "step_1" and skipped == []
    got = ck.load_checkpoint(path)
    assert got.state == {"step": 1} and got.tensors["w"].abs().sum() > 0  # the old content, not zeros
    # The half-written save is a hidden temp folder; every visible step folder verifies.
    for _, p in ck.list_checkpoints(tmp_path):
        ck.verify_checkpoint(p)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert len(leftovers) == 1
    # The next save by a live process cleans the dead writer's temp folder.
    _save(tmp_path, 3)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
