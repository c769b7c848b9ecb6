"""Verified, atomic training checkpoints.

A checkpoint is a folder `root/step_<N>/`:

    adapter.safetensors   the trainable (LoRA) tensors
    state.pt              optimizer + LR-scheduler state, RNG states, sampler position
                          (torch.save; must load with torch.load(weights_only=True))
    meta.json             step, resolved config, optional val_loss
    manifest.json         SHA-256 and size of each file above; written last

Saving writes into a hidden temp folder beside it (`.tmp-step_<N>-...`), fsyncs every file and
the folder, then renames it into place, so `step_<N>` is either absent or complete. Loading
verifies the manifest first and deserializes from the very bytes it hashed, in one step: a
truncated, corrupted, missing or undeserializable file, or a meta step that disagrees with the
folder name, is a CheckpointError naming the file, and nothing is loaded. "Verifies" always
means "loads": `verify_checkpoint`, `latest_checkpoint` and retention all load.
Hidden folders are never checkpoints: `latest_checkpoint` and `apply_retention` ignore them, and
`clean_leftovers` removes those a killed save or retention left (`.tmp-`, `.del-`, `.old-`).
Retention deletes only folders that hold nothing but checkpoint files: it never removes a file
fluxlab did not write.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TENSORS_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (TENSORS_FILE, STATE_FILE, META_FILE)
_STEP_DIR = re.compile(r"^step_(\d+)$")
STALE_TEMP_S = 3600

from fluxlab.errors import UserError  # noqa: E402


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be trusted; the message names the bad file and what to do."""


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# --- writing ------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    if sys.platform == "win32" and path.is_dir():
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _serialize_state(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    # Refuse now what could not be resumed later: resume loads with weights_only=True.
    try:
        torch.save(state, buf)
        data = buf.getvalue()
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise TypeError(f"checkpoint state holds an object torch.load(weights_only=True) refuses ({e}); "
                        f"store tensors, numbers, strings, lists and dicts only") from e
    return data


def save_checkpoint(root: str | os.PathLike, step: int, *, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], meta: dict) -> Path:
    """Write `root/step_<step>/` atomically and return its path (replacing one of the same step)."""
    from safetensors.torch import save

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{int(step)}"
    blobs = {
        TENSORS_FILE: save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}),
        STATE_FILE: _serialize_state(state),
        META_FILE: json.dumps({**meta, "step": int(step)}, indent=1, sort_keys=True, default=str).encode(),
    }
    tmp = root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, data in blobs.items():
            _write_file(tmp / name, data)
        manifest = {"format": 1, "step": int(step), "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in blobs.items()}}
        # The manifest goes last: its presence means every file before it is on disk.
        _write_file(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        _fsync_path(tmp)
        if final.exists():
            # Directories cannot be os.replace'd over a non-empty one: move the old one aside
            # (hidden, so never mistaken for a checkpoint), put the new one in place, drop the old.
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _clean_stale_temps(root)
    return final


def _only_checkpoint_files(path: Path) -> bool:
    """True when `path` is a real folder holding only files a checkpoint save writes."""
    if path.is_symlink() or not path.is_dir():
        return False
    return all(p.name in (*CHECKPOINT_FILES, MANIFEST_FILE) and p.is_file() and not p.is_symlink()
               for p in path.iterdir())


def clean_leftovers(root: str | os.PathLike) -> list[Path]:
    """Remove what a killed save or retention left under `root`: `.del-` and `.old-` folders (already
    doomed when hidden) and `.tmp-` folders of dead writers. Returns the removed paths."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = [d for d in (*root.glob(".del-step_*"), *root.glob(".old-step_*")) if d.is_dir() and not d.is_symlink()]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone + _clean_stale_temps(root)


def _clean_stale_temps(root: Path) -> list[Path]:
    """Remove hidden temp folders left by saves that were killed (this host's dead pids, or old)."""
    removed = []
    host = socket.gethostname()
    for d in root.glob(".tmp-step_*"):
        m = re.match(r"^\.tmp-step_\d+-(.+)-(\d+)-[0-9a-f]{8}$", d.name)
        dead = False
        if m and m.group(1) == host:
            try:
                os.kill(int(m.group(2)), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass
        try:
            old = time.time() - d.stat().st_mtime > STALE_TEMP_S
        except FileNotFoundError:
            continue
        if dead or old:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# --- verifying and reading ----------------------------------------------------------------------
RESUME_HINT = _RESUME_HINT = ("resume from an earlier checkpoint (`--resume latest` picks the newest one that "
                "verifies) or delete this folder")


def _read_verified(path: Path) -> dict[str, bytes]:
    """Bytes of every checkpoint file, each checked against the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    mpath = path / MANIFEST_FILE
    if not mpath.exists():
        raise CheckpointError(f"{mpath}: missing manifest, so the save never finished or this is not a "
                              f"fluxlab checkpoint; {_RESUME_HINT}")
    try:
        manifest = json.loads(_read_file(mpath))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, shape
        raise CheckpointError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e}); {_RESUME_HINT}") from e
    out = {}
    for name in CHECKPOINT_FILES:
        fpath = path / name
        if name not in files:
            raise CheckpointError(f"{mpath}: does not list {name}; {_RESUME_HINT}")
        if not fpath.exists():
            raise CheckpointError(f"{fpath}: missing (listed in the manifest); {_RESUME_HINT}")
        data = _read_file(fpath)
        want = files[name]
        if not isinstance(want, dict) or not {"size", "sha256"} <= want.keys():
            raise CheckpointError(f"{mpath}: malformed entry for {name}; {_RESUME_HINT}")
        if len(data) != want["size"]:
            raise CheckpointError(f"{fpath}: truncated or resized ({len(data)} bytes, manifest says "
                                  f"{want['size']}); {_RESUME_HINT}")
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise CheckpointError(f"{fpath}: SHA-256 does not match the manifest (corrupted); {_RESUME_HINT}")
        out[name] = data
    out[MANIFEST_FILE] = manifest
    return out


def _read_file(fpath: Path) -> bytes:
    """A checkpoint file's bytes; anything but a readable regular file is a CheckpointError."""
    if fpath.is_symlink() or not fpath.is_file():
        kind = "a symlink" if fpath.is_symlink() else "a folder" if fpath.is_dir() else "not a regular file"
        raise CheckpointError(f"{fpath}: is {kind}, not a checkpoint file; {_RESUME_HINT}")
    try:
        return fpath.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{fpath}: cannot be read ({e.strerror or e}); {_RESUME_HINT}") from e


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first bad file; return None when the checkpoint verifies
    and loads (verification and loading are one step)."""
    load_checkpoint(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Verify, then load. Tensors via safetensors, state via torch.load(weights_only=True).

    Any failure, before or after the hashes check out, is a CheckpointError naming the file.
    """
    from safetensors.torch import load

    path = Path(path)
    blobs = _read_verified(path)  # raises before anything is deserialized
    try:
        tensors = load(blobs[TENSORS_FILE])
    except Exception as e:  # safetensors reports a damaged header in several ways
        raise CheckpointError(f"{path / TENSORS_FILE}: not loadable safetensors ({type(e).__name__}: {e}); "
                              f"{_RESUME_HINT}") from e
    try:
        state = torch.load(io.BytesIO(blobs[STATE_FILE]), weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError (a refused or broken pickle), RuntimeError (zip), EOFError...
        raise CheckpointError(f"{path / STATE_FILE}: not loadable with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"{_RESUME_HINT}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: holds a {type(state).__name__}, not a mapping; {_RESUME_HINT}")
    try:
        meta = json.loads(blobs[META_FILE])
    except ValueError as e:
        raise CheckpointError(f"{path / META_FILE}: not JSON ({e}); {_RESUME_HINT}") from e
    if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path / META_FILE}: must be a JSON object with an integer 'step'; {_RESUME_HINT}")
    # The step must agree everywhere: a mismatch would silently resume at the wrong step.
    m = _STEP_DIR.match(path.name)
    listed = blobs[MANIFEST_FILE].get("step")
    if (m and int(m.group(1)) != meta["step"]) or (listed is not None and listed != meta["step"]):
        raise CheckpointError(f"{path / META_FILE}: says step {meta['step']}, but the folder name"
                              f"{'' if m is None else f' says {int(m.group(1))}'} and the manifest says "
                              f"{listed}; {_RESUME_HINT}")
    return Checkpoint(path=path, tensors=tensors, state=state, meta=meta)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step_<N>` folder, newest first; hidden temp folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _STEP_DIR.match(d.name))]
    return sorted(found, reverse=True)


def latest_checkpoint(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies and loads, and the newer ones skipped (with reasons)."""
    skipped = []
    for _, path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        return path, skipped
    return None, skipped


def apply_retention(root: str | os.PathLike, keep_last: int, protect=()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints that verify and the best by meta["val_loss"].

    Returns the deleted paths. `protect` paths are always kept (the checkpoint just written: an
    older run's higher steps must never outrank it). A folder holding anything but checkpoint
    files is never deleted (fluxlab did not write it). Only checkpoints that verify count towards `keep_last`, so a corrupt
    newest one never pushes out the last good one. Corrupt ones newer than the oldest kept stay
    (for inspection; `latest_checkpoint` names them); older corrupt ones go. Cost: every remaining
    checkpoint is read, hashed and deserialized once per call.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    clean_leftovers(root)
    good, bad = [], []
    for _, p in list_checkpoints(root):  # newest first
        try:
            verify_checkpoint(p)
            good.append(p)
        except CheckpointError:
            bad.append(p)
    keep = set(good[:keep_last]) | {Path(p) for p in protect}
    losses = {p: json.loads((p / META_FILE).read_bytes()).get("val_loss") for p in good}
    scored = [(float(loss), p) for p, loss in losses.items() if isinstance(loss, (int, float))]
    if scored:
        keep.add(min(scored, key=lambda x: x[0])[1])
    oldest_kept = min((int(p.name.split("_")[1]) for p in keep), default=None)
    doomed = [p for p in good if p not in keep]
    doomed += [p for p in bad if oldest_kept is not None and int(p.name.split("_")[1]) < oldest_kept]
    doomed = [p for p in doomed if _only_checkpoint_files(p)]
    for p in doomed:
        # Hide it first so a kill mid-delete never leaves a half folder that looks like a checkpoint.
        hidden = p.parent / f".del-{p.name}-{uuid.uuid4().hex[:8]}"
        os.replace(p, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return sorted(doomed, key=lambda p: int(p.name.split("_")[1]), reverse=True)


# --- RNG state ----------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Python, numpy (global), torch CPU and every CUDA device's RNG state, in a form that
    torch.load(weights_only=True) accepts (tensors, ints, floats, lists; nothing pickled)."""
    version, py_state, gauss = random.getstate()
    key, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss},
        "numpy": {"key": str(key), "keys": torch.from_numpy(np_keys.astype(np.int64)),  # [624]
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            import warnings

            warnings.warn(f"checkpoint holds RNG state for {len(cuda)} CUDA devices, this machine has "
                          f"{torch.cuda.device_count()}; restoring the first {min(len(cuda), torch.cuda.device_count())}")
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
