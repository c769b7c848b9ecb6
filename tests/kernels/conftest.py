"""Kernel tests run the Triton kernels themselves: compiled on CUDA tensors where a GPU is visible
(`make test-gpu`), else on the CPU through Triton's interpreter (kt_helpers.DEVICE picks the device).

TRITON_INTERPRET must be set before `@triton.jit` runs (when fluxlab.kernels.* is imported), so it
is set here, at conftest import, before any test module loads.
"""

import os

import torch  # noqa: E402  (importing torch does not import fluxlab.kernels)

if not torch.cuda.is_available():  # on a GPU the same tests run the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_evidence(monkeypatch):
    """Each test starts with zero counters, no fallback reasons and no FLUXLAB_DISABLE."""
    from fluxlab import kernels

    monkeypatch.delenv("FLUXLAB_DISABLE", raising=False)
    kernels.reset_counters()
    yield


@pytest.fixture(scope="session", autouse=True)
def _interpreter_active():
    from fluxlab.kernels import _common

    if not _common.interpreting() and not __import__("torch").cuda.is_available():
        pytest.exit("fluxlab.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels cannot "
                    "run on the CPU: run `TRITON_INTERPRET=1 pytest ...`", returncode=2)
