"""lr-find's suggestion: minimum / 10 after a divergence; otherwise a warning and the steepest
descent, capped; a curve that never fell gives no suggestion. Planted curves, then a real sweep."""

from pathlib import Path

import numpy as np
import pytest

from fluxlab.trainer import LR_FIND_MAX_FACTOR, suggest_lr

ROOT = Path(__file__).resolve().parents[2]
LRS = np.logspace(-7, 0, 61)  # 10 points per decade: lr = 10 ** (-7 + i / 10)


def _falling(center: float) -> np.ndarray:
    """A smooth drop of the loss from 1.0 to 0.5, steepest at lr = 10 ** center."""
    return 1.0 - 0.5 / (1.0 + np.exp(-3.0 * (np.log10(LRS) - center)))


def test_diverged_sweep_suggests_the_minimum_over_ten():
    curve = _falling(-4.0)
    curve[45:] = 0.5 + 10 * (np.log10(LRS[45:]) + 2.5) ** 2  # blows up past 10^-2.5
    stop = 55
    lrs, sm = LRS[:stop], curve[:stop]
    suggested, steepest, warning = suggest_lr(lrs, sm, diverged_at=float(lrs[-1]), current_lr=1e-4)
    k = int(np.argmin(sm))
    assert warning is None
    assert suggested == pytest.approx(lrs[k] / 10)
    assert steepest == pytest.approx(1e-4, rel=0.3)


def test_never_diverged_warns_and_suggests_the_steepest_descent():
    # The case: a loss still falling at the sweep's end. min / 10 would say 0.1.
    suggested, steepest, warning = suggest_lr(LRS, _falling(-2.0), diverged_at=None, current_lr=3e-3)
    assert warning and "never diverged" in warning and "capped" not in warning
    assert steepest == pytest.approx(1e-2, rel=0.3)
    assert suggested == steepest


def test_never_diverged_suggestion_is_capped_relative_to_the_config():
    current = 1e-3
    suggested, steepest, warning = suggest_lr(LRS, _falling(-1.0), diverged_at=None, current_lr=current)
    assert steepest == pytest.approx(1e-1, rel=0.3)
    assert suggested == pytest.approx(LR_FIND_MAX_FACTOR * current)
    assert "capped" in warning


def test_a_loss_that_never_fell_gives_no_suggestion():
    flat = 1.0 + 1e-3 * np.random.default_rng(0).standard_normal(len(LRS))
    suggested, _, warning = suggest_lr(LRS, flat, diverged_at=None, current_lr=3e-3)
    assert suggested == 3e-3 and "never fell" in warning


def test_real_sweep_that_never_diverges_warns(shapes, home, tmp_path, capsys):
    """`fluxlab lr-find` on the tiny preset, with a top lr too small to diverge."""
    import json

    from fluxlab.cli import main

    sets = {"data": str(shapes), "output_dir": str(tmp_path), "num_workers": "0", "progress": "false",
            "max_sequence_length": "16", "batch_size": "2", "rank": "4", "device": "cpu", "validation_every": "0",
            "lr_find_min": "1e-6", "lr_find_max": "1e-2", "lr_find_steps": "12", "learning_rate": "1e-4"}
    argv = ["lr-find", str(ROOT / "configs" / "tiny.yaml")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    res = json.loads((tmp_path / "lr_find.json").read_text())
    assert res["diverged_at"] is None and len(res["lrs"]) == 12
    assert res["warning"] and f"fluxlab: warning: {res['warning']}" in err
    assert res["suggested_lr"] <= LR_FIND_MAX_FACTOR * 1e-4
    assert f"suggested learning_rate {res['suggested_lr']:.2e}" in out
    assert (tmp_path / "lr_find.png").stat().st_size > 0
