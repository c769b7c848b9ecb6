"""Fault injection, checkpoints: files that pass the manifest (re-hashed after tampering) but
cannot be loaded, meta/folder step disagreement, retention next to files fluxlab did not write, a
kill during retention, and the leftovers of killed saves."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fluxlab import checkpoints as ck

ROOT = Path(__file__).resolve().parents[2]


def _save(root, step, val_loss=None):
    torch.manual_seed(step)
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    state = {"optimizer": {"state": {}, "param_groups": []}, "step": step}
    meta = {"config": {"rank": 4}} | ({"val_loss": val_loss} if val_loss is not None else {})
    return ck.save_checkpoint(root, step, tensors=tensors, state=state, meta=meta)


def rehash(path: Path) -> None:
    """Re-write manifest.json so every file's size and SHA-256 match again (a forged checkpoint)."""
    mpath = path / ck.MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    for name in ck.CHECKPOINT_FILES:
        data = (path / name).read_bytes() if (path / name).is_file() else b""
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    mpath.write_text(json.dumps(manifest))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def _tamper_state_pickle(p: Path):
    (p / ck.STATE_FILE).write_bytes(_torch_bytes({"x": _Evil()}))


def _tamper_state_garbage(p: Path):
    (p / ck.STATE_FILE).write_bytes(b"PK\x03\x04 not really a zip")


def _tamper_state_not_a_dict(p: Path):
    (p / ck.STATE_FILE).write_bytes(_torch_bytes([1, 2, 3]))


def _tamper_adapter(p: Path):
    (p / ck.TENSORS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")


def _tamper_meta_list(p: Path):
    (p / ck.META_FILE).write_text("[1, 2, 3]")


def _tamper_meta_step(p: Path):
    meta = json.loads((p / ck.META_FILE).read_text())
    (p / ck.META_FILE).write_text(json.dumps({**meta, "step": 2}))


def _tamper_meta_step_string(p: Path):
    meta = json.loads((p / ck.META_FILE).read_text())
    (p / ck.META_FILE).write_text(json.dumps({**meta, "step": "5"}))


def _folder_for_file(p: Path):
    (p / ck.STATE_FILE).unlink()
    (p / ck.STATE_FILE).mkdir()


@pytest.mark.parametrize("tamper,bad_file,words", [
    (_tamper_state_pickle, ck.STATE_FILE, "weights_only"),
    (_tamper_state_garbage, ck.STATE_FILE, "torch.load"),
    (_tamper_state_not_a_dict, ck.STATE_FILE, "not a mapping"),
    (_tamper_adapter, ck.TENSORS_FILE, "safetensors"),
    (_tamper_meta_list, ck.META_FILE, "JSON object"),
    (_tamper_meta_step, ck.META_FILE, "step 2"),
    (_tamper_meta_step_string, ck.META_FILE, "integer"),
    (_folder_for_file, ck.STATE_FILE, "folder"),
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_hashed_but_unloadable_files_are_named_checkpoint_errors(tmp_path, monkeypatch, tamper, bad_file, words):
    monkeypatch.chdir(tmp_path)
    good = _save(tmp_path / "ckpts", 3)
    bad = _save(tmp_path / "ckpts", 5)
    tamper(bad)
    rehash(bad)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(bad)
    assert str(bad / bad_file) in str(e.value) and words in str(e.value), str(e.value)
    with pytest.raises(ck.CheckpointError):
        ck.verify_checkpoint(bad)  # verification and loading are one step
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    # `latest` falls back to the previous good checkpoint and says why.
    path, skipped = ck.latest_checkpoint(tmp_path / "ckpts")
    assert path == good and [p for p, _ in skipped] == [bad] and bad_file in skipped[0][1]


def test_meta_step_must_agree_with_the_folder_name(tmp_path):
    src = _save(tmp_path / "a", 3)
    moved = tmp_path / "b" / "step_7"
    moved.parent.mkdir()
    shutil.copytree(src, moved)  # a renamed folder: every hash still matches
    with pytest.raises(ck.CheckpointError, match=r"says step 3.*folder name says 7"):
        ck.load_checkpoint(moved)


def test_retention_never_deletes_what_it_did_not_write(tmp_path):
    root = tmp_path / "checkpoints"
    foreign = root / "step_1"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")             # no manifest: not a fluxlab checkpoint
    old = _save(root, 2)
    (old / "README").write_text("a user's file inside a real checkpoint")
    for step in (3, 4, 5):
        _save(root, step)
    deleted = ck.apply_retention(root, keep_last=1)
    assert deleted == [root / "step_4", root / "step_3"]
    assert (foreign / "notes.txt").read_text() == "mine" and (old / "README").exists()


def test_retention_keeps_the_checkpoint_just_written_even_when_older_steps_outrank_it(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (40, 60):
        _save(root, step)
    new = _save(root, 6)
    deleted = ck.apply_retention(root, keep_last=1, protect=[new])
    assert new.exists() and root / "step_60" in [p for _, p in ck.list_checkpoints(root)]
    assert deleted == [root / "step_40"]


def test_leftovers_of_killed_saves_and_retention_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    (root / ".del-step_1-0123abcd").mkdir()
    (root / ".del-step_1-0123abcd" / ck.STATE_FILE).write_bytes(b"half deleted")
    (root / ".old-step_2-0123abcd").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket

    (root / f".tmp-step_3-{socket.gethostname()}-{dead}-deadbeef").mkdir()
    live = root / f".tmp-step_4-{socket.gethostname()}-{os.getpid()}-cafef00d"  # a live writer's: kept
    live.mkdir()
    removed = ck.clean_leftovers(root)
    assert len(removed) == 3
    assert sorted(p.name for p in root.iterdir()) == [live.name, "step_2"]


_RETENTION_CHILD = textwrap.dedent("""
    import shutil, sys, time
    from fluxlab import checkpoints as ck
    real = shutil.rmtree
    def slow_rmtree(path, *a, **k):
        print("hidden", path, flush=True)
        time.sleep(60)  # the parent kills us here: the doomed folder is hidden, not yet deleted
    ck.shutil.rmtree = slow_rmtree
    ck.apply_retention(sys.argv[1], keep_last=1)
""")


def test_kill_9_during_retention_leaves_no_visible_half_checkpoint_and_the_next_start_cleans(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step)
    proc = subprocess.Popen([sys.executable, "-c", _RETENTION_CHILD, str(root)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("hidden"), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [n for n in os.listdir(root) if n.startswith(".del-")]  # what the kill left
    for _, p in ck.list_checkpoints(root):
        ck.verify_checkpoint(p)  # every visible checkpoint still loads
    ck.clean_leftovers(root)  # what the trainer runs at the next start
    assert not [n for n in os.listdir(root) if n.startswith(".")]
