"""What building and saving pipelines needs, for fluxlab.models (FLUX.1) and fluxlab.flux2
(FLUX.2): the default-dtype context, the shipped caption corpus, the atomic save, and the
built-once home of the tiny pipelines."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from fluxlab.errors import UserError


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _corpus() -> list[str]:
    text = resources.files("fluxlab").joinpath("assets/tokenizer_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _save_atomic(pipe, path: Path) -> Path:
    """save_pretrained beside the target, then rename: an interrupted build never leaves a half
    pipeline. An earlier pipeline folder at `path` is replaced; anything else there is refused."""
    if path.exists() and any(path.iterdir()) and not (path / "model_index.json").exists():
        raise UserError(f"{path}: exists and is not a pipeline folder; choose an empty or new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def built_once(name: str, build) -> Path:
    """$FLUXLAB_HOME/<name> (default ~/.cache/fluxlab): built by `build(path)` the first time, then
    always loaded from disk, as a user's downloaded pipeline is."""
    path = Path(os.environ.get("FLUXLAB_HOME", Path.home() / ".cache" / "fluxlab")) / name
    if not (path / "model_index.json").exists():
        build(path)
    return path
