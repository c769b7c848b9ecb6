"""patch()/unpatch() on the tiny FLUX transformer: same output and gradients as stock, evidence that
the fused paths ran, FLUXLAB_DISABLE honoured, exact restoration."""

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from tiny_model import batch, forward_backward, tiny

from fluxlab import kernels


def _max_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def test_patched_tiny_model_matches_stock_fp32():
    model, inputs = tiny(), batch()
    out0, grads0 = forward_backward(model, inputs)
    report = kernels.patch(model)
    assert report.patched == {"rope": 0, "qk_norm_rope": 4, "adaln": 9, "sparse_delta": 0}, str(report)
    out1, grads1 = forward_backward(model, inputs)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    assert _max_err(grads1, grads0) < 1e-5
    totals = kernels.family_totals()
    # per forward: one qk_norm_rope launch per stream (2 double blocks x 2 + 2 single), adaln 11
    assert kernels.counters() == {"qk_norm_rope.fwd": 6, "qk_norm_rope.bwd": 6, "adaln.fwd": 11, "adaln.bwd": 11}
    assert totals["rope"] == 0 and kernels.fallbacks() == {}


def test_patched_bf16_error_within_twice_stock_error():
    """bf16 judged against the stock model in float64: the patched model's error is at most 2x stock's."""
    inputs = batch()
    cast = lambda d: {k: (v.to(d) if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids") else v)  # noqa: E731
                      for k, v in inputs.items()}
    truth, truth_g = forward_backward(tiny(torch.float64), cast(torch.float64))
    model = tiny(torch.bfloat16)
    stock, stock_g = forward_backward(model, cast(torch.bfloat16))
    kernels.patch(model)
    fused, fused_g = forward_backward(model, cast(torch.bfloat16))
    e_stock, e_fused = (stock.double() - truth).abs().max().item(), (fused.double() - truth).abs().max().item()
    assert e_fused <= 2 * e_stock, (e_fused, e_stock)
    g_stock, g_fused = _max_err(stock_g, truth_g), _max_err(fused_g, truth_g)
    assert g_fused <= 2 * g_stock, (g_fused, g_stock)
    assert kernels.family_totals()["qk_norm_rope"] > 0 and kernels.family_totals()["adaln"] > 0


def test_unpatch_restores_exact_modules():
    model, inputs = tiny(), batch()
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    classes = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        want = model(**inputs)[0]
    kernels.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        kernels.patch(model)
    kernels.unpatch(model)
    assert all(m.processor is procs[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert {n: type(m) for n, m in model.named_modules()} == classes
    kernels.reset_counters()
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], want)
    assert kernels.counters() == {}


def test_disabled_paths_stay_still_and_say_why(monkeypatch):
    model, inputs = tiny(), batch()
    report = kernels.patch(model)
    monkeypatch.setenv("FLUXLAB_DISABLE", "qk_norm_rope,adaln")
    out_off, _ = forward_backward(model, inputs)
    counts = kernels.counters()
    # the processor falls back to stock norms + the standalone RoPE kernel (joint q and k per layer)
    assert counts == {"rope.fwd": 8, "rope.bwd": 8}, counts
    assert kernels.fallbacks() == {"qk_norm_rope": ["disabled by FLUXLAB_DISABLE"],
                                   "adaln": ["disabled by FLUXLAB_DISABLE"]}
    monkeypatch.setenv("FLUXLAB_DISABLE", "all")
    kernels.reset_counters()
    out_all, _ = forward_backward(model, inputs)
    assert kernels.counters() == {}
    torch.testing.assert_close(out_off, out_all, rtol=1e-5, atol=1e-5)
    assert report.patched["qk_norm_rope"] == 4


def test_patch_time_disable_and_unsupported_processors_are_reported(monkeypatch):
    monkeypatch.setenv("FLUXLAB_DISABLE", "adaln")
    model = tiny()
    model.single_transformer_blocks[0].attn.set_processor(type("CustomProcessor", (FluxAttnProcessor,), {})())
    report = kernels.patch(model)
    assert report.patched["adaln"] == 0 and report.skipped["adaln"] == "9 module(s): disabled by FLUXLAB_DISABLE"
    assert report.patched["qk_norm_rope"] == 3
    assert "CustomProcessor" in report.skipped["qk_norm_rope"]
    assert "qk_norm_rope" in str(report) and report.to_dict()["patched"] == report.patched
