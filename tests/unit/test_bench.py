"""Statistics and verdicts of fluxlab.bench on simulated samples (seeded); timing is checked for
structure (order, counts), never for speed."""

from __future__ import annotations

import types

import numpy as np
import pytest

from fluxlab import bench


def _samples(seed: int, n: int = 20, *, cv: float = 0.02, mean: float = 1.0) -> np.ndarray:
    return bench.lognormal_samples(np.random.default_rng(seed), n, cv=cv, mean=mean)


def test_aa_false_positive_rate_at_most_one_percent():
    assert bench.aa_false_positive_rate(n=20, cv=0.02, trials=1000, seed=0) <= 0.01


def test_power_for_ten_percent_slowdown_at_n20():
    assert bench.power(slowdown=0.10, n=20, cv=0.02, trials=1000, seed=1) >= 0.9


def test_slowdown_below_threshold_is_not_flagged():
    # A real 2% slowdown is below the 5% threshold: the rule must not call it, or the A/A
    # bound above would only hold by luck of the gate being wide.
    assert bench.power(slowdown=0.02, n=20, cv=0.02, trials=1000, seed=2) <= 0.05


def test_compare_statistics_on_a_clear_speedup():
    base, cand = _samples(3, mean=1.3), _samples(4)
    c = bench.compare(base, cand)
    assert c.verdict == "faster"
    assert c.ratio == pytest.approx(np.median(base) / np.median(cand))
    assert c.ci_low < c.ratio < c.ci_high
    assert c.p_faster < 0.01 < c.p_slower
    assert c.threshold == 0.05 and c.n == 20
    assert bench.compare(cand, base).verdict == "slower"
    assert set(c.to_dict()) >= {"verdict", "ratio", "ci_low", "ci_high", "p_faster", "p_slower", "cv"}


def test_threshold_widens_to_ten_percent_above_three_percent_cv():
    # 7% faster with CV ~4%: significant, but under the 10% threshold that CV calls for.
    base, cand = _samples(5, n=60, cv=0.04, mean=1.07), _samples(6, n=60, cv=0.04)
    c = bench.compare(base, cand)
    assert 0.03 < c.cv <= 0.05 and c.threshold == 0.10 and c.p_faster < 0.01
    assert c.verdict == "no-difference"


def test_high_cv_is_inconclusive_even_for_a_large_speedup():
    c = bench.compare(_samples(7, cv=0.10, mean=1.5), _samples(8, cv=0.10))
    assert c.cv > 0.05 and c.p_faster < 0.01
    assert c.verdict == "inconclusive"


def test_claim_above_ci_upper_bound_is_not_supported():
    base, cand = _samples(9, mean=1.1), _samples(10)  # really ~10% faster
    assert bench.compare(base, cand, claimed=1.5).verdict == "not-supported"
    assert bench.compare(base, cand, claimed=1.05).verdict == "faster"


def test_did_not_run_wins_over_a_faster_timing():
    base, cand = _samples(11, mean=2.0), _samples(12)
    idle = bench.Evidence.from_counters({"rope": 5}, {"rope": 5}, ["rope"], fallbacks={"rope": "TRITON off"})
    assert not idle.ran and "TRITON off" in idle.reason
    assert bench.compare(base, cand, evidence=idle).verdict == "did-not-run"
    busy = bench.Evidence.from_counters({"rope.fwd": 5}, {"rope.fwd": 9, "adaln": 1}, ["rope"])
    assert busy.ran and busy.counters == {"rope": 4}
    assert bench.compare(base, cand, evidence=busy).verdict == "faster"


def test_evidence_accepts_profiler_kernel_names():
    ev = bench.Evidence.from_counters({}, {}, ["rope", "adaln"], kernel_names=["_fl_rope_kernel"])
    assert not ev.ran and "adaln" in ev.reason and "rope:" not in ev.reason
    # A qk_norm_rope kernel is not evidence that the standalone rope family ran.
    ev = bench.Evidence.from_counters({}, {}, ["rope"], kernel_names=["_fl_qk_norm_rope_fwd_kernel"])
    assert not ev.ran and "rope" in ev.reason


def test_collect_evidence_sees_a_disabled_path(monkeypatch):
    # A stand-in for fluxlab.kernels: the fast path counts its calls unless FLUXLAB_DISABLE names it.
    counts: dict[str, int] = {}
    fake = types.SimpleNamespace(counters=lambda: dict(counts), fallbacks=lambda: {})

    def rope():
        import os

        if "rope" not in os.environ.get("FLUXLAB_DISABLE", ""):
            counts["rope"] = counts.get("rope", 0) + 1

    monkeypatch.setitem(__import__("sys").modules, "fluxlab.kernels", fake)
    assert bench.collect_evidence(rope, ["rope"]).ran
    monkeypatch.setenv("FLUXLAB_DISABLE", "rope")
    ev = bench.collect_evidence(rope, ["rope"])
    assert not ev.ran
    assert bench.compare(_samples(13, mean=1.5), _samples(14), evidence=ev).verdict == "did-not-run"


def test_time_interleaved_runs_abab_and_keeps_raw_samples():
    calls = []
    s = bench.time_interleaved({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")},
                               repeats=4, warmup=2, device="cpu")
    assert calls == ["A", "B"] * 6
    assert [len(s["A"]), len(s["B"])] == [4, 4] and all(t >= 0 for t in s["A"] + s["B"])


def test_time_fn_rotates_inputs():
    seen = []
    assert len(bench.time_fn(seen.append, repeats=5, warmup=1, inputs=["x", "y"])) == 5
    assert seen == ["x", "x", "y", "x", "y", "x"]


def test_change_points_finds_a_planted_step_and_none_in_flat_noise():
    rng = np.random.default_rng(0)
    series = np.r_[bench.lognormal_samples(rng, 30, cv=0.02), bench.lognormal_samples(rng, 30, cv=0.02, mean=1.1)]
    (cp,) = bench.change_points(series)
    assert abs(cp - 30) <= 1
    assert all(bench.change_points(_samples(s, n=60)) == [] for s in range(20))
    # A 3% step is real but below the 5% minimum magnitude.
    small = np.r_[_samples(21, n=30), _samples(22, n=30, mean=1.03)]
    assert bench.change_points(small) == []


def test_achieved_rate_against_the_floor():
    a = bench.achieved(2.0, flops=4e12, bytes=3e12, ceilings={"tflops": 4.0, "tbps": 2.0})
    assert a["tflops"] == pytest.approx(2.0) and a["tbps"] == pytest.approx(1.5)
    assert a["bound"] == "memory" and a["floor_s"] == pytest.approx(1.5)
    assert a["fraction_of_floor"] == pytest.approx(0.75)
    assert bench.achieved(1.0, flops=1e12)["fraction_of_floor"] is None
    assert bench.measure_ceilings("cpu") is None
