"""The regression analysis of stored records (regression_analysis.ipynb): a record's timed
samples, the latest record of each series against its baseline, change points along a series, and
the controls that show the rule can fail: a synthetic planted shift, and a measured A/A and
planted slowdown on this machine.
"""

from __future__ import annotations

import numpy as np

from fluxlab.measure.evidence import Evidence
from fluxlab.measure.history import change_points
from fluxlab.measure.timing import run
from fluxlab.measure.verdict import compare, lognormal_samples

# Names benchmarks give the measured side of {candidate, baseline} samples (older records included).
CANDIDATE_KEYS = ("candidate", "variant", "impl", "ddp")


def series_samples(rec: dict) -> list[float] | None:
    """The times a record's series tracks: the candidate's samples of a comparison record, or a
    flat list of samples; None when the record holds fewer than 3 numbers, or when its evidence
    shows the fast path did not run (those times are not the fast path's: e.g. a planted control)."""
    evidence = (rec.get("metrics") or {}).get("evidence")
    if isinstance(evidence, dict) and evidence.get("ran") is False:
        return None
    s = rec.get("samples")
    if isinstance(s, dict):
        # The measured side of a comparison record. Never guess from key order: the store sorts
        # keys, so the first one is as likely the baseline ("baseline", "compiled", "single").
        s = next((s[k] for k in CANDIDATE_KEYS if k in s), None)
    if isinstance(s, list) and len(s) >= 3 and all(isinstance(x, (int, float)) and x > 0 for x in s):
        return [float(x) for x in s]
    return None


def _key_fields(key: tuple) -> dict:
    benchmark, device, params = key
    return {"benchmark": benchmark, "device": device, "params": params}


def latest_vs_baseline(groups: dict, baseline: str = "first") -> list[dict]:
    """Per series (one benchmark, device and parameter set; `store.series` groups them): the
    latest record's samples against the first (or previous) record's, by `compare`.
    ratio > 1 means the latest run is faster."""
    if baseline not in ("first", "previous"):
        raise ValueError(f"baseline must be 'first' or 'previous', got {baseline!r}")
    rows = []
    for key, recs in groups.items():
        timed = [r for r in recs if series_samples(r)]
        if len(timed) < 2:
            continue
        base, latest = (timed[0] if baseline == "first" else timed[-2]), timed[-1]
        devices = {str(r.get("device_name") or r.get("device")) for r in (base, latest)}
        assert len(devices) == 1, f"series {key} mixes devices {devices}"  # internal invariant
        # The latest record's own evidence (checked when it was measured), when it has any.
        ev = (latest.get("metrics") or {}).get("evidence")
        evidence = Evidence(ran=bool(ev.get("ran")), reason=str(ev.get("reason", ""))) \
            if isinstance(ev, dict) and "ran" in ev else None
        c = compare(series_samples(base), series_samples(latest), evidence=evidence)
        change = {"slower": "regression", "faster": "improvement"}.get(c.timing_verdict, "-")
        rows.append({**_key_fields(key), "n_records": len(timed), "baseline_id": base["id"][:8],
                     "latest_id": latest["id"][:8], "ratio": c.ratio, "ci_low": c.ci_low, "ci_high": c.ci_high,
                     "verdict": c.verdict, "timing": c.timing_verdict, "change": change, "reason": c.reason})
    return rows


def change_point_scan(groups: dict, min_points: int = 6) -> list[dict]:
    """`change_points` over each series' per-record medians (series with >= min_points)."""
    rows = []
    for key, recs in groups.items():
        med = [float(np.median(series_samples(r))) for r in recs if series_samples(r)]
        if len(med) < min_points:
            continue
        cps = change_points(med)
        bounds = [0, *cps, len(med)]
        for j, cp in enumerate(cps):
            before = float(np.mean(med[bounds[j]:cp]))
            after = float(np.mean(med[cp:bounds[j + 2]]))
            rows.append({**_key_fields(key), "index": cp, "before_ms": before, "after_ms": after,
                         "change": "regression" if after > before else "improvement"})
        if not cps:
            rows.append({**_key_fields(key), "index": None, "before_ms": None, "after_ms": None, "change": "-"})
    return rows


def synthetic_history(n: int = 12, shift_at: int | None = 8, shift: float = 0.15, cv: float = 0.02,
                      samples: int = 15, seed: int = 0, benchmark: str = "control/planted") -> list[dict]:
    """A made-up series (device "synthetic") whose times rise by `shift` from record `shift_at`
    on (None: no shift): the positive and negative controls of the regression analysis."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mean = 1.0 + (shift if shift_at is not None and i >= shift_at else 0.0)
        out.append({"id": f"{benchmark}-{i:04d}".ljust(12, "0"), "benchmark": benchmark, "device": "synthetic",
                    "device_name": "synthetic", "params": {"shift_at": shift_at, "shift": shift},
                    "utc": f"2000-01-01T00:00:{i:02d}Z", "verdict": None,
                    "samples": {"candidate": lognormal_samples(rng, samples, cv=cv, mean=mean).tolist()}})
    return out


def measured_controls(trials: int = 30, repeats: int = 15, warmup: int = 2, device="cpu", seed: int = 0,
                      planted: float = 0.5) -> dict:
    """Real A/A and planted comparisons on this machine, each timed interleaved `trials` times.

    A/A: a 96x96 matmul against itself. Planted: against a 121x121 matmul, whose (121/96)^3 = 2.0x
    the work is a known slowdown. Torch runs on one thread here, as two threads on two shared
    cores would time the scheduler, not the op. Returns verdict counts per control and rates."""
    from collections import Counter

    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(96, 96, generator=g).to(device)
    b = torch.randn(121, 121, generator=g).to(device)
    same = Evidence(ran=True, reason="control: both sides run the code under test")
    counts = {"aa": Counter(), "planted": Counter()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(trials):
            m = run({"A": lambda: a @ a, "A'": lambda: a @ a, "B": lambda: b @ b}, repeats=repeats,
                          warmup=warmup, device=device)
            counts["aa"][compare(m.samples["A"], m.samples["A'"], evidence=same).verdict] += 1
            counts["planted"][compare(m.samples["A"], m.samples["B"], evidence=same).verdict] += 1
    finally:
        torch.set_num_threads(threads)
    aa, pl = counts["aa"], counts["planted"]
    return {"trials": trials, "aa_verdicts": dict(aa), "planted_verdicts": dict(pl),
            "aa_false_positive_rate": (aa["faster"] + aa["slower"]) / trials,
            "aa_decisive_rate": aa["no-difference"] / trials,
            "planted_detection_rate": pl["slower"] / trials, "planted_work_ratio": (121 / 96) ** 3}


def false_positive_bound(trials: int, rate: float = 0.01, level: float = 0.999) -> int:
    """The most false positives `trials` A/A comparisons may show when the true rate is `rate`
    (the binomial `level` quantile): more than this and the rule is miscalibrated here."""
    from scipy import stats

    return int(stats.binom.ppf(level, trials, rate))
