import pytest
import torch
from kt_helpers import DEVICE

from fluxlab import kernels
from fluxlab.kernels import adaln, rope


def test_fallback_on_unsupported_device_is_recorded_and_counters_stay_still():
    # "meta" is a device Triton cannot serve: the reference runs (shape only) and the reason is kept.
    x = torch.empty(1, 4, 2, 6, device="meta")
    cos = sin = torch.empty(4, 6, device="meta")
    assert rope.apply_rope(x, cos, sin).shape == x.shape
    assert rope.apply_rope(x, cos, sin).device.type == "meta"
    assert kernels.counters() == {}
    assert kernels.fallbacks() == {"rope": ["device meta unsupported (Triton kernels need a CUDA device)"]}


def test_fallback_on_unsupported_dtype():
    x = torch.zeros(1, 3, 4, dtype=torch.float8_e4m3fn, device=DEVICE)
    s = torch.zeros(1, 4, dtype=torch.float8_e4m3fn, device=DEVICE)
    with pytest.raises(Exception):  # the reference itself cannot do fp8 arithmetic; the reason is kept anyway
        adaln.modulate(x, s, s)
    assert "dtype torch.float8_e4m3fn unsupported" in kernels.fallbacks()["adaln"][0]


def test_disabled_parses_env_and_rejects_typos(monkeypatch):
    monkeypatch.setenv("FLUXLAB_DISABLE", " rope, adaln ,")
    assert kernels.disabled() == {"rope", "adaln"}
    monkeypatch.setenv("FLUXLAB_DISABLE", "all")
    assert kernels.disabled() == set(kernels.FAMILIES)
    monkeypatch.setenv("FLUXLAB_DISABLE", "rope,adalm")
    with pytest.raises(ValueError, match="adalm"):
        kernels.disabled()


def test_counters_sum_per_family_and_reset():
    cos = sin = torch.ones(3, 4, device=DEVICE)
    rope.apply_rope(torch.zeros(1, 3, 1, 4, device=DEVICE), cos, sin)
    rope.apply_rope(torch.zeros(1, 3, 1, 4, device=DEVICE), cos, sin)
    assert kernels.counters() == {"rope.fwd": 2}
    assert kernels.family_totals() == {"rope": 2, "qk_norm_rope": 0, "adaln": 0, "sparse_delta": 0}
    kernels.reset_counters()
    assert kernels.counters() == {} and kernels.fallbacks() == {}
