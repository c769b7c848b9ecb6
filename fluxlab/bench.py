"""Timing, statistics and verdicts for speed claims (DESIGN.md §5, "Measuring honestly").

* Timing: CUDA events after warm-up on the GPU, `time.perf_counter` on the CPU; A and B interleaved
  (ABAB) in one process; raw samples (milliseconds) are always returned, never only a summary.
* Statistics (`compare`): medians, a bootstrap 95% CI of the ratio median(A)/median(B), one-sided
  Mann-Whitney U tests, and one verdict. The order of the rules matters:
    1. did-not-run    the evidence shows the fast path never executed (wins over any timing);
    2. inconclusive   CV > 5%: the noise is too high to call anything;
    3. not-supported  a claimed ratio lies above the CI's upper bound;
    4. faster/slower  one-sided MWU p < 0.01 AND the median ratio passes the threshold
                      (5% when CV <= 3%, else 10%);
    5. no-difference  otherwise.
* Evidence: `fluxlab.kernels.counters()` / `fallbacks()` snapshots and, on the GPU, profiler kernel names.
* Rates: achieved TFLOP/s and TB/s against the roofline floor from measured device ceilings.
* History: `change_points` (E-Divisive-style energy split, confirmed by a Welch t-test).

torch is imported lazily so the statistics can be used (regression notebook, tests) without it.
"""

from __future__ import annotations

import importlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats

VERDICTS = ("faster", "slower", "no-difference", "inconclusive", "not-supported", "did-not-run")
P_THRESHOLD = 0.01
CV_INCONCLUSIVE = 0.05
CV_TIGHT = 0.03  # at or below this CV the ratio threshold is 5%, above it 10%


# --- timing -----------------------------------------------------------------------------------
def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class Timer:
    """Times one call in milliseconds: CUDA events on a CUDA device, perf_counter otherwise.

    On CUDA the queue is drained before the start event, so earlier work is not billed to this
    call; `flush_l2=True` overwrites a 256 MiB buffer first so small kernels do not run from a
    warm L2 cache.
    """

    def __init__(self, device="cpu", flush_l2: bool = False):
        self.device = device
        self.cuda = _is_cuda(device)
        self._flush = None
        if self.cuda:
            import torch

            self._torch = torch
            if flush_l2:
                self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable, *args) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn(*args)
            return (time.perf_counter() - t0) * 1e3
        torch = self._torch
        if self._flush is not None:
            self._flush.zero_()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def _caller(fn: Callable, inputs: Sequence | None) -> Callable[[int], object]:
    # Rotating through several inputs keeps caches from flattering small kernels (DESIGN.md §5).
    return (lambda i: fn()) if inputs is None else (lambda i: fn(inputs[i % len(inputs)]))


def time_fn(fn: Callable, *, repeats: int = 20, warmup: int = 3, device="cpu",
            inputs: Sequence | None = None, flush_l2: bool = False) -> list[float]:
    """Raw per-call times (ms) of `fn()` (or `fn(inputs[i % len])`) after `warmup` untimed calls."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device,
                            inputs=inputs, flush_l2=flush_l2)["fn"]


def time_interleaved(fns: dict[str, Callable], *, repeats: int = 20, warmup: int = 3, device="cpu",
                     inputs: Sequence | None = None, flush_l2: bool = False) -> dict[str, list[float]]:
    """Raw times (ms) of several functions run ABAB... in one process, so drift (clocks, thermals,
    other load) hits every variant alike instead of whichever ran last."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    timer = Timer(device, flush_l2=flush_l2)
    calls = {name: _caller(fn, inputs) for name, fn in fns.items()}
    for i in range(warmup):
        for call in calls.values():
            call(i)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, call in calls.items():
            samples[name].append(timer(call, i))
    return samples


# --- evidence ---------------------------------------------------------------------------------
def kernel_prefix(family: str) -> str:
    """fluxlab's Triton kernels are named `_fl_<family>_...`, so a profiler name names its family
    exactly (a bare "rope" would also match the qk_norm_rope kernels)."""
    return f"_fl_{family}_"


def _in_family(key: str, family: str) -> bool:
    return key == family or key.startswith(family + ".") or key.startswith(family + ":")


@dataclass
class Evidence:
    """Whether the claimed fast paths executed. `counters` holds each family's counter increase."""

    ran: bool
    counters: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    kernel_names: list = field(default_factory=list)
    reason: str = ""

    @classmethod
    def from_counters(cls, before: dict, after: dict, families: Sequence[str], *,
                      fallbacks: dict | None = None, kernel_names: Sequence[str] = ()) -> "Evidence":
        """A family ran when its counter (key `family` or `family.<sub>`) moved, or a profiled
        kernel name contains the family name (a kernel may announce itself either way)."""
        delta = {f: sum(v - before.get(k, 0) for k, v in after.items() if _in_family(k, f)) for f in families}
        names = sorted(set(kernel_names))
        fb = {k: v for k, v in (fallbacks or {}).items() if any(_in_family(k, f) for f in families)}
        missing = [f for f in families
                   if delta[f] <= 0 and not any(kernel_prefix(f) in n for n in names)]
        reason = "; ".join(
            f"{f}: counter did not move and no kernel named like it"
            + (f" (fallback: {fb[f]})" if f in fb else "") for f in missing)
        return cls(ran=not missing, counters=delta, fallbacks=fb, kernel_names=names,
                   reason=reason or f"ran: {', '.join(f'{f} x{delta[f]}' for f in families)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _kernel_snapshots() -> tuple[dict, dict]:
    """(counters, fallbacks) of fluxlab.kernels; empty while that package does not provide them."""
    try:
        kernels = importlib.import_module("fluxlab.kernels")
    except ImportError:
        return {}, {}
    counters = getattr(kernels, "counters", lambda: {})
    fallbacks = getattr(kernels, "fallbacks", lambda: {})
    return dict(counters()), dict(fallbacks())


def collect_evidence(fn: Callable, families: Sequence[str], profile: bool = False, device=None) -> Evidence:
    """Run `fn()` once and report whether each kernel family in `families` executed.

    On CUDA with `profile=True`, the names of the GPU kernels that ran (torch.profiler) are kept.
    """
    before, fb_before = _kernel_snapshots()
    names: list[str] = []
    if profile and (device is None or _is_cuda(device)):
        import torch

        if torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile as _profile

            with _profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
        else:
            fn()
    else:
        fn()
    after, fb_after = _kernel_snapshots()
    new_fallbacks = {k: v for k, v in fb_after.items() if fb_before.get(k) != v}
    return Evidence.from_counters(before, after, families, fallbacks=new_fallbacks, kernel_names=names)


# --- statistics -------------------------------------------------------------------------------
@dataclass
class Comparison:
    verdict: str
    ratio: float  # median(baseline) / median(candidate): > 1 means the candidate is faster
    ci_low: float
    ci_high: float
    p_faster: float
    p_slower: float
    cv: float  # the larger of the two samples' coefficients of variation
    median_baseline: float
    median_candidate: float
    n: int
    threshold: float = 0.0
    claimed: float | None = None
    reason: str = ""
    evidence: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def record_fields(self) -> dict:
        """Keyword arguments for `store.record(name, samples=..., **cmp.record_fields())`."""
        d = self.to_dict()
        head = {k: d.pop(k) for k in ("verdict", "ratio", "ci_low", "ci_high")}
        return {**head, "metrics": d}


def _cv(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.mean(x))


def bootstrap_ratio_ci(baseline, candidate, *, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of median(baseline)/median(candidate), resampling each independently."""
    a, b = np.asarray(baseline, float), np.asarray(candidate, float)
    rng = np.random.default_rng(seed)
    med_a = np.median(a[rng.integers(0, len(a), (n_boot, len(a)))], axis=1)
    med_b = np.median(b[rng.integers(0, len(b), (n_boot, len(b)))], axis=1)
    lo, hi = np.quantile(med_a / med_b, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def compare(baseline: Sequence[float], candidate: Sequence[float], *, claimed: float | None = None,
            evidence: Evidence | None = None, seed: int = 0, n_boot: int = 2000) -> Comparison:
    """Judge candidate against baseline from raw times (lower is better). See the module docstring
    for the verdict rules; `claimed` is a claimed speed-up ratio (e.g. 1.3 for "30% faster")."""
    a, b = np.asarray(baseline, float), np.asarray(candidate, float)
    if len(a) < 3 or len(b) < 3:
        raise ValueError(f"compare() needs at least 3 samples per side, got {len(a)} and {len(b)}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or a.min() <= 0 or b.min() <= 0:
        raise ValueError("compare() needs finite, positive times")
    med_a, med_b = float(np.median(a)), float(np.median(b))
    ratio = med_a / med_b
    ci_low, ci_high = bootstrap_ratio_ci(a, b, n_boot=n_boot, seed=seed)
    p_faster = float(stats.mannwhitneyu(b, a, alternative="less").pvalue)
    p_slower = float(stats.mannwhitneyu(b, a, alternative="greater").pvalue)
    cv = max(_cv(a), _cv(b))
    verdict, reason, threshold = decide(ratio=ratio, cv=cv, p_faster=p_faster, p_slower=p_slower,
                                        ci_high=ci_high, claimed=claimed, evidence=evidence)
    return Comparison(verdict=verdict, ratio=ratio, ci_low=ci_low, ci_high=ci_high, p_faster=p_faster,
                      p_slower=p_slower, cv=cv, median_baseline=med_a, median_candidate=med_b,
                      n=min(len(a), len(b)), threshold=threshold, claimed=claimed, reason=reason,
                      evidence=evidence.to_dict() if evidence is not None else None)


def decide(*, ratio: float, cv: float, p_faster: float, p_slower: float, ci_high: float | None = None,
           claimed: float | None = None, evidence: Evidence | None = None) -> tuple[str, str, float]:
    """The verdict rule of DESIGN.md §5 on precomputed statistics -> (verdict, reason, threshold).
    The one place the rule lives: `compare` and the simulations both call it."""
    threshold = 0.05 if cv <= CV_TIGHT else 0.10
    if evidence is not None and not evidence.ran:
        return "did-not-run", evidence.reason, threshold
    if cv > CV_INCONCLUSIVE:
        return "inconclusive", f"CV {cv:.1%} > {CV_INCONCLUSIVE:.0%}", threshold
    if claimed is not None and ci_high is not None and claimed > ci_high:
        return "not-supported", f"claimed {claimed:.3f}x > CI upper bound {ci_high:.3f}x", threshold
    if p_faster < P_THRESHOLD and ratio >= 1 + threshold:
        return "faster", f"p={p_faster:.2g}, ratio {ratio:.3f} >= {1 + threshold:.2f}", threshold
    if p_slower < P_THRESHOLD and 1 / ratio >= 1 + threshold:
        return "slower", f"p={p_slower:.2g}, ratio {ratio:.3f} <= 1/{1 + threshold:.2f}", threshold
    return ("no-difference",
            f"p_faster={p_faster:.2g}, p_slower={p_slower:.2g}, ratio {ratio:.3f} within {threshold:.0%}", threshold)


# --- simulations of the decision rule (tests and the regression notebook) ----------------------
def lognormal_samples(rng: np.random.Generator, n, *, cv: float, mean: float = 1.0) -> np.ndarray:
    """Timing-like noise: lognormal with the given mean and coefficient of variation."""
    sigma = np.sqrt(np.log1p(cv**2))
    return mean * rng.lognormal(-sigma**2 / 2, sigma, n)


def simulate_verdicts(*, slowdown: float, n: int = 20, cv: float = 0.02, trials: int = 1000,
                      seed: int = 0) -> Counter:
    """Verdict counts over `trials` simulated comparisons whose candidate is (1+slowdown)x slower.

    Vectorized over trials (one batched Mann-Whitney call) and judged by `decide`, the same rule
    `compare` applies; no claim is made, so the bootstrap CI is not needed.
    """
    rng = np.random.default_rng(seed)
    a = lognormal_samples(rng, (trials, n), cv=cv)
    b = lognormal_samples(rng, (trials, n), cv=cv, mean=1 + slowdown)
    ratio = np.median(a, axis=1) / np.median(b, axis=1)
    cv_both = np.maximum(np.std(a, axis=1, ddof=1) / a.mean(1), np.std(b, axis=1, ddof=1) / b.mean(1))
    p_faster = stats.mannwhitneyu(b, a, alternative="less", axis=1).pvalue
    p_slower = stats.mannwhitneyu(b, a, alternative="greater", axis=1).pvalue
    return Counter(decide(ratio=r, cv=c, p_faster=pf, p_slower=ps)[0]
                   for r, c, pf, ps in zip(ratio, cv_both, p_faster, p_slower))


def aa_false_positive_rate(*, n: int = 20, cv: float = 0.02, trials: int = 1000, seed: int = 0) -> float:
    """Fraction of A/A comparisons flagged faster or slower (should be <= 1%)."""
    counts = simulate_verdicts(slowdown=0.0, n=n, cv=cv, trials=trials, seed=seed)
    return (counts["faster"] + counts["slower"]) / trials


def power(*, slowdown: float = 0.10, n: int = 20, cv: float = 0.02, trials: int = 1000, seed: int = 0) -> float:
    """Fraction of comparisons with a real `slowdown` that are flagged `slower`."""
    return simulate_verdicts(slowdown=slowdown, n=n, cv=cv, trials=trials, seed=seed)["slower"] / trials


# --- achieved rates ---------------------------------------------------------------------------
def achieved(seconds: float, flops: float | None = None, bytes: float | None = None,  # noqa: A002
             ceilings: dict | None = None) -> dict:
    """TFLOP/s and TB/s achieved, and the fraction of the roofline floor (floor time / measured
    time, 1.0 = at the ceiling). `ceilings` is `measure_ceilings()`'s {"tflops", "tbps"}."""
    out = {"seconds": seconds,
           "tflops": flops / seconds / 1e12 if flops else None,
           "tbps": bytes / seconds / 1e12 if bytes else None,
           "floor_s": None, "fraction_of_floor": None, "bound": None}
    floors = {}
    if ceilings and flops and ceilings.get("tflops"):
        floors["compute"] = flops / (ceilings["tflops"] * 1e12)
    if ceilings and bytes and ceilings.get("tbps"):
        floors["memory"] = bytes / (ceilings["tbps"] * 1e12)
    if floors:
        out["bound"] = max(floors, key=floors.get)
        out["floor_s"] = floors[out["bound"]]
        out["fraction_of_floor"] = out["floor_s"] / seconds
    return out


def measure_ceilings(device, *, gemm_n: int = 8192, copy_bytes: int = 2**30, repeats: int = 20) -> dict | None:
    """Measured bf16 GEMM TFLOP/s and device-to-device copy TB/s on a CUDA device; None on the CPU
    (CPU numbers are never used for GPU claims)."""
    if not _is_cuda(device):
        return None
    import torch

    a = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    gemm_ms = float(np.median(time_fn(lambda: torch.mm(a, b), repeats=repeats, warmup=5, device=device)))
    del a, b
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = float(np.median(time_fn(lambda: dst.copy_(src), repeats=repeats, warmup=5, device=device)))
    del src, dst
    return {"tflops": 2 * gemm_n**3 / (gemm_ms / 1e3) / 1e12,
            "tbps": 2 * copy_bytes / (copy_ms / 1e3) / 1e12,  # a copy reads and writes every byte
            "device_name": torch.cuda.get_device_name(torch.device(device))}


# --- change points ----------------------------------------------------------------------------
def _best_energy_split(x: np.ndarray, min_size: int) -> int | None:
    """The split maximizing the E-Divisive energy statistic (Matteson & James 2014, alpha=1)."""
    n = len(x)
    if n < 2 * min_size:
        return None
    d = np.abs(x[:, None] - x[None, :])
    p = np.zeros((n + 1, n + 1))
    p[1:, 1:] = d.cumsum(0).cumsum(1)  # 2-D prefix sums: any block sum in O(1)

    def block(r0, r1, c0, c1):
        return p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0]

    t = np.arange(min_size, n - min_size + 1)
    m, k = t, n - t
    between = block(0, t, t, n)
    within_left, within_right = block(0, t, 0, t), block(t, n, t, n)
    q = m * k / n * (2 * between / (m * k) - within_left / (m * (m - 1)) - within_right / (k * (k - 1)))
    return int(t[np.argmax(q)])


def change_points(values: Sequence[float], p: float = 0.001, min_magnitude: float = 0.05,
                  min_size: int = 3) -> list[int]:
    """Indices where a series shifts: binary segmentation on the energy statistic, each split kept
    only when a Welch t-test gives p < `p` and the means differ by >= `min_magnitude` (relative).
    Index i means values[i] is the first point of the new regime. Use one series per
    (benchmark, device, parameters): `store.series` groups them."""
    x = np.asarray(values, float)
    found: list[int] = []
    segments = [(0, len(x))]
    while segments:
        lo, hi = segments.pop()
        split = _best_energy_split(x[lo:hi], max(min_size, 2))
        if split is None:
            continue
        left, right = x[lo:lo + split], x[lo + split:hi]
        magnitude = abs(right.mean() / left.mean() - 1)
        pvalue = stats.ttest_ind(left, right, equal_var=False).pvalue
        if magnitude < min_magnitude or not pvalue < p:  # `not <` also rejects a NaN p-value
            continue
        found.append(lo + split)
        segments += [(lo, lo + split), (lo + split, hi)]
    return sorted(found)
