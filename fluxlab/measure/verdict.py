"""Verdicts on speed claims from raw samples (lower is better).

`compare(baseline, candidate)` reports the median ratio (baseline / candidate: > 1 means the
candidate is faster) with a percentile-bootstrap 95% CI, one-sided Mann-Whitney U p-values, and
one verdict. The rules, in order (each record states its thresholds and the reason):

  1. did-not-run    the evidence shows the fast path never executed; wins over any timing.
  2. not-supported  a claimed ratio lies above the CI's upper bound (decided before any gate).
  3. inconclusive   n is too small for the Mann-Whitney p to ever reach P_THRESHOLD: the reason
                    says so (4 vs 4 samples can at best give p = 1/70).
  4. faster/slower  one-sided p < P_THRESHOLD / 2 (the two directions share P_THRESHOLD, so
                    identical code is flagged at most 1% of the time), the median ratio past
                    1 +- MAGNITUDE, and the CI excluding 1. Without an evidence check the
                    verdict is `unverified` instead.
  5. no-difference  the whole CI lies inside the equivalence band [1/(1+MAGNITUDE), 1+MAGNITUDE].
  6. a tight CI     (half-width <= TIGHT of the ratio) decides by its point estimate: inside the
                    band no-difference, beyond it (with the one-sided p) faster/slower.
  7. inconclusive   otherwise: the CI is too wide for the data to decide; the reason gives it.

The noise gate is the CI itself: a bootstrap CI of medians narrows as n grows and shrugs off an
isolated outlier, where the raw coefficient of variation does neither.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from fluxlab.measure.evidence import Evidence

VERDICTS = ("faster", "slower", "no-difference", "inconclusive", "not-supported", "did-not-run", "unverified")
P_THRESHOLD = 0.01  # for "faster or slower" as a whole: each one-sided test runs at P_THRESHOLD / 2
MAGNITUDE = 0.05  # a change smaller than 5% is not worth calling faster or slower
CI_LEVEL = 0.95
TIGHT = 0.02  # a CI this narrow (half-width relative to the ratio) always decides


def min_p_value(n_a: int, n_b: int) -> float:
    """The smallest one-sided exact Mann-Whitney p-value n_a vs n_b samples can give."""
    log_comb = math.lgamma(n_a + n_b + 1) - math.lgamma(n_a + 1) - math.lgamma(n_b + 1)  # log C(n_a+n_b, n_a)
    return math.exp(-log_comb)


@dataclass
class Comparison:
    verdict: str
    ratio: float  # median(baseline) / median(candidate): > 1 means the candidate is faster
    ci_low: float
    ci_high: float
    p_faster: float
    p_slower: float
    cv: float  # the larger of the two samples' coefficients of variation (reported, not a gate)
    median_baseline: float
    median_candidate: float
    n: int
    threshold: float = MAGNITUDE
    claimed: float | None = None
    reason: str = ""
    evidence: dict | None = None
    timing_verdict: str = ""  # what the timing alone says (differs from `verdict` for did-not-run/unverified)
    thresholds: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def record_fields(self) -> dict:
        """Keyword arguments for `store.record(name, samples=..., **cmp.record_fields())`."""
        d = self.to_dict()
        head = {k: d.pop(k) for k in ("verdict", "ratio", "ci_low", "ci_high")}
        return {**head, "metrics": d}


def bootstrap_ratio_ci(baseline, candidate, *, n_boot: int = 2000, seed: int = 0,
                       level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap CI of median(baseline)/median(candidate), resampling each independently."""
    lo, hi = _bootstrap_batch(np.asarray(baseline, float)[None], np.asarray(candidate, float)[None],
                              n_boot=n_boot, rng=np.random.default_rng(seed), level=level)
    return float(lo[0]), float(hi[0])


def _bootstrap_batch(a: np.ndarray, b: np.ndarray, *, n_boot: int, rng: np.random.Generator,
                     level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap CIs for T comparisons at once: a [T, n], b [T, m] -> (lo [T], hi [T])."""
    T, n = a.shape
    m = b.shape[1]
    med_a = np.median(np.take_along_axis(a[:, None, :], rng.integers(0, n, (T, n_boot, n)), axis=2), axis=2)
    med_b = np.median(np.take_along_axis(b[:, None, :], rng.integers(0, m, (T, n_boot, m)), axis=2), axis=2)
    lo, hi = np.quantile(med_a / med_b, [(1 - level) / 2, (1 + level) / 2], axis=1)  # [T] each
    return lo, hi


def decide(*, ratio: float, ci_low: float, ci_high: float, p_faster: float, p_slower: float,
           n_a: int, n_b: int, claimed: float | None = None, evidence: Evidence | None = None,
           magnitude: float = MAGNITUDE) -> tuple[str, str, str]:
    """The verdict rule on precomputed statistics -> (verdict, timing_verdict, reason).
    The one place the rule lives: `compare` and the simulations both call it."""
    band = (1 / (1 + magnitude), 1 + magnitude)
    ci = f"CI [{ci_low:.3f}, {ci_high:.3f}]"
    alpha = P_THRESHOLD / 2  # per direction: identical code is flagged either way at most P_THRESHOLD of the time
    min_p = min_p_value(n_a, n_b)
    half = (ci_high - ci_low) / 2 / ratio
    tight = half <= TIGHT
    if min_p >= alpha:
        need = next(k for k in range(2, 50) if min_p_value(k, k) < alpha)
        timing, why = "inconclusive", (f"n={n_a} vs {n_b} is too small: the smallest possible p is {min_p:.3f} "
                                       f">= {alpha}; take at least {need} samples per side")
    elif p_faster < alpha and ratio >= band[1] and ci_low > 1:
        timing, why = "faster", f"p={p_faster:.2g} < {alpha}, ratio {ratio:.3f} >= {band[1]:.2f}, {ci} above 1"
    elif p_slower < alpha and ratio <= band[0] and ci_high < 1:
        timing, why = "slower", f"p={p_slower:.2g} < {alpha}, ratio {ratio:.3f} <= {band[0]:.3f}, {ci} below 1"
    elif band[0] <= ci_low and ci_high <= band[1]:
        timing, why = "no-difference", f"{ci} inside the equivalence band [{band[0]:.3f}, {band[1]:.3f}]"
    elif tight and band[0] <= ratio <= band[1]:
        timing, why = "no-difference", (f"{ci} is tight (half-width {half:.1%} <= {TIGHT:.0%}) and the ratio "
                                        f"{ratio:.3f} lies inside the +-{magnitude:.0%} band")
    elif tight and min(p_faster, p_slower) < alpha:  # beyond the band, significant, yet the CI touches 1
        timing = "faster" if p_faster < alpha else "slower"
        why = (f"{ci} is tight (half-width {half:.1%} <= {TIGHT:.0%}), p={min(p_faster, p_slower):.2g} < {alpha}, "
               f"ratio {ratio:.3f} beyond the band")
    else:
        width = (ci_high - ci_low) / ratio
        timing, why = "inconclusive", (f"{ci} (width {width:.1%} of the ratio) is neither inside the "
                                       f"+-{magnitude:.0%} band nor clear of it; take more repeats")
    if evidence is not None and not evidence.ran:
        return "did-not-run", timing, f"evidence: {evidence.reason}"
    if claimed is not None and claimed > ci_high:
        return "not-supported", timing, f"claimed {claimed:.3f}x > CI upper bound {ci_high:.3f}x"
    if timing in ("faster", "slower") and evidence is None:
        return "unverified", timing, f"{timing} by timing ({why}), but no evidence check that the fast path ran"
    return timing, timing, why


def compare(baseline: Sequence[float], candidate: Sequence[float], *, claimed: float | None = None,
            evidence: Evidence | None = None, seed: int = 0, n_boot: int = 2000,
            magnitude: float = MAGNITUDE) -> Comparison:
    """Judge candidate against baseline from raw times (lower is better); see the module docstring.
    `claimed` is a claimed speed-up ratio (1.3 for "30% faster"); `evidence` comes from
    `timing.run()` (checked in the timed loop). Without evidence, faster/slower read `unverified`."""
    a, b = np.asarray(baseline, float), np.asarray(candidate, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"compare() needs at least 2 samples per side, got {len(a)} and {len(b)}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or a.min() <= 0 or b.min() <= 0:
        raise ValueError("compare() needs finite, positive times")
    med_a, med_b = float(np.median(a)), float(np.median(b))
    ratio = med_a / med_b
    ci_low, ci_high = bootstrap_ratio_ci(a, b, n_boot=n_boot, seed=seed)
    p_faster = float(stats.mannwhitneyu(b, a, alternative="less").pvalue)
    p_slower = float(stats.mannwhitneyu(b, a, alternative="greater").pvalue)
    cv = max(float(np.std(x, ddof=1) / np.mean(x)) for x in (a, b))
    verdict, timing, reason = decide(ratio=ratio, ci_low=ci_low, ci_high=ci_high, p_faster=p_faster,
                                     p_slower=p_slower, n_a=len(a), n_b=len(b), claimed=claimed,
                                     evidence=evidence, magnitude=magnitude)
    return Comparison(verdict=verdict, ratio=ratio, ci_low=ci_low, ci_high=ci_high, p_faster=p_faster,
                      p_slower=p_slower, cv=cv, median_baseline=med_a, median_candidate=med_b,
                      n=min(len(a), len(b)), threshold=magnitude, claimed=claimed, reason=reason,
                      evidence=evidence.to_dict() if evidence is not None else None, timing_verdict=timing,
                      thresholds={"p": P_THRESHOLD, "magnitude": magnitude, "ci_level": CI_LEVEL,
                                  "tight_half_width": TIGHT, "n_boot": n_boot})


# --- calibration of the rule (tests, the regression notebook, the closing numbers) -------------
_RAN = Evidence(ran=True, reason="simulation")


def lognormal_samples(rng: np.random.Generator, n, *, cv: float, mean: float = 1.0) -> np.ndarray:
    """Timing-like noise: lognormal with the given mean and coefficient of variation."""
    sigma = np.sqrt(np.log1p(cv**2))
    return mean * rng.lognormal(-sigma**2 / 2, sigma, n)


def heavy_tailed_samples(rng: np.random.Generator, n, *, cv: float = 0.02, outliers: float = 0.05,
                         outlier_scale: float = 1.6, mean: float = 1.0) -> np.ndarray:
    """Lognormal noise where a fraction `outliers` of samples are 1x-`outlier_scale`x slower
    (a preempted run, a page fault): the tail real timings have."""
    x = lognormal_samples(rng, n, cv=cv, mean=mean)
    hit = rng.random(np.shape(x)) < outliers
    return np.where(hit, x * rng.uniform(1.0, outlier_scale, np.shape(x)), x)


def verdict_counts(a: np.ndarray, b: np.ndarray, *, n_boot: int = 400, seed: int = 0,
                   chunk: int = 250) -> Counter:
    """Verdicts of T comparisons a[t] vs b[t] (a, b: [T, n]), each judged by `decide` as `compare`
    would (bootstrap CI included), with evidence that the path ran."""
    rng = np.random.default_rng(seed)
    p_faster = stats.mannwhitneyu(b, a, alternative="less", axis=1).pvalue
    p_slower = stats.mannwhitneyu(b, a, alternative="greater", axis=1).pvalue
    ratio = np.median(a, axis=1) / np.median(b, axis=1)
    lo, hi = np.empty(len(a)), np.empty(len(a))
    for s in range(0, len(a), chunk):
        lo[s:s + chunk], hi[s:s + chunk] = _bootstrap_batch(a[s:s + chunk], b[s:s + chunk], n_boot=n_boot, rng=rng)
    return Counter(decide(ratio=r, ci_low=l, ci_high=h, p_faster=pf, p_slower=ps, n_a=a.shape[1],
                          n_b=b.shape[1], evidence=_RAN)[0]
                   for r, l, h, pf, ps in zip(ratio, lo, hi, p_faster, p_slower))


def simulate_verdicts(*, slowdown: float, n: int = 20, cv: float = 0.02, trials: int = 1000, seed: int = 0,
                      pool: Sequence[float] | None = None, outliers: float = 0.0) -> Counter:
    """Verdict counts over `trials` comparisons whose candidate is (1+slowdown)x slower.

    Noise is drawn from `pool` (real timings, resampled with replacement) when given, else
    lognormal with the given CV, plus a fraction `outliers` of slow outliers."""
    rng = np.random.default_rng(seed)
    if pool is not None:
        pool = np.asarray(pool, float)
        a = rng.choice(pool, (trials, n))
        b = rng.choice(pool, (trials, n)) * (1 + slowdown)
    else:
        a = heavy_tailed_samples(rng, (trials, n), cv=cv, outliers=outliers)
        b = heavy_tailed_samples(rng, (trials, n), cv=cv, outliers=outliers, mean=1 + slowdown)
    return verdict_counts(a, b, seed=seed + 1)


def aa_false_positive_rate(*, n: int = 20, cv: float = 0.02, trials: int = 1000, seed: int = 0,
                           pool: Sequence[float] | None = None, outliers: float = 0.0) -> float:
    """Fraction of A/A comparisons flagged faster or slower (should be <= 1%)."""
    counts = simulate_verdicts(slowdown=0.0, n=n, cv=cv, trials=trials, seed=seed, pool=pool, outliers=outliers)
    return (counts["faster"] + counts["slower"]) / trials


def power(*, slowdown: float = 0.10, n: int = 20, cv: float = 0.02, trials: int = 1000, seed: int = 0,
          pool: Sequence[float] | None = None, outliers: float = 0.0) -> float:
    """Fraction of comparisons with a real `slowdown` that are flagged `slower`."""
    counts = simulate_verdicts(slowdown=slowdown, n=n, cv=cv, trials=trials, seed=seed, pool=pool, outliers=outliers)
    return counts["slower"] / trials
