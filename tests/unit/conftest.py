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


def tiny_lora_config(shapes, out, **overrides):
    """The tiny config for a short CPU run into `out` at rank 4 / alpha 8 (LoRA scale 2), with
    `overrides` (values as on the command line)."""
    from fluxlab.config import load_config

    base = {"data": str(shapes), "output_dir": str(out), "num_workers": "0", "progress": "false",
            "max_sequence_length": "16", "batch_size": "2", "steps": "3", "rank": "4", "lora_alpha": "8",
            "device": "cpu", "lr_warmup_steps": "0", "learning_rate": "1e-2", "validation_every": "0",
            "checkpoint_every": "0"}
    return load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
                       {**base, **{k: str(v) for k, v in overrides.items()}})
