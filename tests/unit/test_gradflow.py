"""Gradient-flow tracking, frozen/trainable audits, non-finite hooks, and the gradcheck runner."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from fluxlab import gradflow


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _backward(model, x=None):
    x = torch.randn(5, 4) if x is None else x
    model(x).pow(2).sum().backward()


def test_clean_model_passes_both_audits():
    model = _model()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    _backward(model)
    opt.step()
    assert gradflow.audit_frozen(model, opt) == []
    assert gradflow.audit_trainable(model) == []


def test_audit_frozen_catches_optimizer_state_group_and_grad():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    _backward(model)
    opt.step()  # state for every parameter, then layer 0 is frozen too late
    model[0].requires_grad_(False)
    problems = gradflow.audit_frozen(model, opt)
    assert any("0.weight" in p and "optimizer state" in p for p in problems)
    assert any("0.weight" in p and "param group" in p for p in problems)
    assert any("0.bias: frozen but has a .grad" == p for p in problems)


def test_audit_trainable_catches_missing_nan_and_zero_grads():
    model = _model()
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    _backward(model)
    problems = gradflow.audit_trainable(model)
    assert problems == ["unused: trainable but has no .grad (not reached by the loss?)"]

    model[2].weight.grad[0, 0] = float("nan")
    model[0].bias.grad.zero_()
    problems = gradflow.audit_trainable(model)
    assert any(p.startswith("2.weight: 1 non-finite") for p in problems)
    assert "0.bias: gradient is all zeros" in problems


def test_nonfinite_hooks_name_the_first_parameter():
    model = _model()
    x = torch.randn(5, 4)
    x[0, 0] = float("nan")
    with gradflow.install_nonfinite_hooks(model) as hooks:
        with pytest.raises(FloatingPointError, match=r"'2\.(weight|bias)'"):
            _backward(model, x)
    model.zero_grad(set_to_none=True)
    hooks = gradflow.install_nonfinite_hooks(model, raise_error=False)
    hooks.step = 7
    _backward(model, x)
    assert hooks.first["param"].startswith("2.") and hooks.first["step"] == 7  # nearest the loss
    assert {e["param"] for e in hooks.events} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    hooks.remove()
    model.zero_grad(set_to_none=True)
    _backward(model, x)
    assert len(hooks.events) == 4  # removed hooks stay silent


def test_gradflow_tracker_matrix_matches_norms():
    model = _model()
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    tracker = gradflow.GradFlowTracker(model)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        _backward(model)
        tracker.record(step)
    m, names = tracker.matrix()
    assert names == ["unused", "0", "2"] and m.shape == (3, 3)  # model order: own parameters first
    w, b = model[2].weight.grad, model[2].bias.grad
    assert m[2, 2] == pytest.approx(math.sqrt(w.norm() ** 2 + b.norm() ** 2), rel=1e-5)
    assert np.isnan(m[0]).all() and np.isfinite(m[1:]).all()


def test_heatmap_draws_one_row_per_layer():
    import matplotlib

    matplotlib.use("Agg")
    model = _model()
    tracker = gradflow.GradFlowTracker(model, by="param")
    _backward(model)
    tracker.record(0)
    ax = tracker.heatmap()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    matplotlib.pyplot.close("all")


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


class _WrongCube(_Cube):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x**2


def test_gradcheck_runner_reports_each_case():
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rows = gradflow.run_gradchecks([("cube", _Cube.apply, (x,)), ("wrong", _WrongCube.apply, (x,)),
                                    ("f32", _Cube.apply, (x.float().detach().requires_grad_(),))])
    assert [r["ok"] for r in rows] == [True, False, False]
    assert "Jacobian mismatch" in rows[1]["error"] and "float64" in rows[2]["error"]


def test_gradcheck_kernels_uses_the_kernels_registry(monkeypatch):
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fake = types.SimpleNamespace(gradcheck_cases=lambda: [("cube", _Cube.apply, (x,))])
    monkeypatch.setitem(__import__("sys").modules, "fluxlab.kernels", fake)
    assert gradflow.gradcheck_kernels() == [{"name": "cube", "ok": True, "error": None}]
    monkeypatch.setitem(__import__("sys").modules, "fluxlab.kernels", types.SimpleNamespace())
    with pytest.raises(ImportError, match="gradcheck_cases"):
        gradflow.gradcheck_kernels()
