"""Fixtures shared by the trainer test files: one tiny pipeline home, one shapes dataset."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # kernels run interpreted on the CPU (set before fluxlab.kernels loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    # One tiny pipeline + cache for the whole session (shared by the trainer test files).
    path = os.environ.get("FLUXLAB_HOME") or str(tmp_path_factory.getbasetemp() / "fluxlab_home")
    old = os.environ.get("FLUXLAB_HOME")
    os.environ["FLUXLAB_HOME"] = path
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield Path(path)
    if old is None:
        os.environ.pop("FLUXLAB_HOME", None)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, home):
    from fluxlab.data import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.getbasetemp() / "shapes16", n=16, seed=0, size=64)


@pytest.fixture(scope="module")
def pipe(home):
    from fluxlab import models

    return models.load_pipeline("tiny", "cpu", torch.float32)
