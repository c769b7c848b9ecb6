"""What building and saving pipelines needs, for fluxlab.models (FLUX.1) and fluxlab.flux2
(FLUX.2): the default-dtype context, the shipped caption corpus, and the atomic save."""

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
