"""What an inference verification reports: latency percentiles (with the sample count each one
needs), stage splits, memory at each stage against budgets, leak growth, determinism.

Plain data and statistics: the measuring is done by `fluxlab.inference.InferenceSession`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}


def min_samples(q: float) -> int:
    """Samples a q-th percentile needs to say more than "the largest sample": n >= 1 / (1 - q/100),
    so that on average one sample lies above it (p90: 10, p99: 100, p99.9: 1000)."""
    return math.ceil(1.0 / (1.0 - q / 100.0) - 1e-9)


STAGES = ("encode", "denoise", "decode")
MiB = 2**20


@dataclass
class StageTimes:
    """Wall seconds of one generation's stages (device synchronized at each boundary)."""
    encode_s: float
    denoise_s: float
    decode_s: float
    steps: int

    @property
    def total_s(self) -> float:
        return self.encode_s + self.denoise_s + self.decode_s

    @property
    def per_step_s(self) -> float:
        return self.denoise_s / self.steps


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 * MAD: sigma of a normal, but a single huge outlier cannot inflate it and hide itself
    (with the plain std, a lone outlier among n samples can never exceed (n-1)/sqrt(n) sigma)."""
    mad = float(np.median(np.abs(x - np.median(x))))
    return 1.4826 * mad if mad > 0 else float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


@dataclass
class LatencyReport:
    """Per-generation latency after warm-up: raw samples, percentiles, 3-sigma outliers, stages."""
    samples_s: list[float]
    stages_s: dict[str, list[float]]
    warmup_s: list[float]
    percentiles_s: dict[str, float]
    mean_s: float
    std_s: float
    outliers: list[int]  # indices into samples_s
    outlier_rule: str = "|x - median| > 3 * 1.4826 * MAD"

    @property
    def n(self) -> int:
        return len(self.samples_s)

    def supported_percentiles_s(self) -> dict[str, float]:
        """The percentiles these n samples support (`min_samples`); the others are interpolations
        between the top samples and are left out of tables, plots and metrics."""
        return {k: v for k, v in self.percentiles_s.items() if self.n >= min_samples(PERCENTILES[k])}

    def percentile_note(self) -> str:
        """What n supports, e.g. "n=6 supports p50; p90 needs n >= 10"."""
        have = list(self.supported_percentiles_s())
        missing = [k for k in self.percentiles_s if k not in have]
        note = f"n={self.n} supports {', '.join(have) or 'no percentile'}"
        if missing:
            note += f"; {missing[0]} needs n >= {min_samples(PERCENTILES[missing[0]])}"
        return note

    def stage_split(self) -> dict[str, dict[str, float]]:
        """Median seconds and share of the median total per stage."""
        total = float(np.median(self.samples_s))
        return {k: {"median_s": float(np.median(v)), "share": float(np.median(v)) / total if total else math.nan}
                for k, v in self.stages_s.items()}

    def metrics(self) -> dict:
        return {"n": self.n, **{f"{k}_s": v for k, v in self.supported_percentiles_s().items()},
                "percentiles_note": self.percentile_note(), "mean_s": self.mean_s,
                "std_s": self.std_s, "outliers": self.outliers, "outlier_rule": self.outlier_rule,
                "warmup_s": self.warmup_s, "stages": self.stage_split()}

    def plot(self, ax=None):
        """Histogram of the samples with the supported percentiles and outliers marked; returns the axes."""
        import matplotlib.pyplot as plt

        from fluxlab.plots import plain_numbers

        ax = ax or plt.subplots(figsize=(7, 3.5), layout="constrained")[1]
        ms = np.asarray(self.samples_s) * 1e3
        ax.hist(ms, bins=min(30, max(5, self.n // 2)), color="#7a9cc6", edgecolor="white")
        for (name, v), style in zip(self.supported_percentiles_s().items(), ("-", "--", "-.", ":", ":")):
            ax.axvline(v * 1e3, color="k", linestyle=style, linewidth=1, label=f"{name} {v * 1e3:.1f} ms")
        if self.outliers:
            ax.plot(ms[self.outliers], np.zeros(len(self.outliers)), "rv", label="outlier (3σ)")
        ax.set_xlabel("generation wall time (ms)")
        ax.set_ylabel("generations")
        ax.set_title(f"latency over {self.n} generations (warm-up excluded)\n{self.percentile_note()}", fontsize=10)
        ax.yaxis.get_major_locator().set_params(integer=True)
        plain_numbers(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        return ax


def summarize_latency(samples_s, stages_s: dict | None = None, warmup_s=None) -> LatencyReport:
    """Aggregate raw per-generation seconds into a LatencyReport (numpy 'linear' percentiles)."""
    x = np.asarray(samples_s, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty 1-D list of latency samples, got shape {x.shape}")
    med, sigma = float(np.median(x)), robust_sigma(x)
    outliers = [int(i) for i in np.nonzero(np.abs(x - med) > 3 * sigma)[0]] if sigma > 0 else []
    return LatencyReport(
        samples_s=x.tolist(), stages_s={k: list(map(float, v)) for k, v in (stages_s or {}).items()},
        warmup_s=list(map(float, warmup_s or [])),
        percentiles_s={k: float(np.percentile(x, q)) for k, q in PERCENTILES.items()},
        mean_s=float(x.mean()), std_s=float(x.std(ddof=1)) if len(x) > 1 else 0.0, outliers=outliers)


@dataclass
class VramStages:
    """Memory at the session's stages, and each budget check (bytes)."""
    metric: str  # "allocated" on CUDA, "rss" on the CPU
    stages: dict[str, dict]
    budgets: dict[str, float]
    checks: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else "fail"

    def value(self, stage: str) -> int | None:
        s = self.stages.get(stage)
        return None if s is None else s["value"]

    def table(self) -> str:
        rows = [f"{'stage':<14}{self.metric + ' MiB':>16}"]
        for k, v in self.stages.items():
            shown = "-" if v["value"] is None else f"{v['value'] / MiB:,.1f}"
            rows.append(f"{k:<14}{shown:>16}")
        rows += [f"budget {c['name']}: {c['value'] / MiB:,.1f} MiB <= {c['budget'] / MiB:,.1f} MiB: "
                 f"{'ok' if c['ok'] else 'OVER'}" for c in self.checks]
        return "\n".join(rows)


@dataclass
class LeakReport:
    """Memory after each of N generations (after warm-up) and the growth verdict."""
    metric: str
    values: list[int]
    growth_bytes: int
    budget_bytes: float
    verdict: str  # "pass" or "leak", by fluxlab.memory.leak_verdict (slope CI and budget)
    peaks: list[int] = field(default_factory=list)  # CUDA: peak allocated during each generation
    slope: dict | None = None  # the leak_verdict behind `verdict` (trend, 99% CI, projection)

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"


@dataclass
class DeterminismReport:
    seed: int
    other_seed: int
    identical: bool  # same seed twice -> bit-identical image
    differs: bool  # a different seed -> a different image
    max_abs_diff_same_seed: float
    nondeterministic_ops: list[str]
    message: str

    @property
    def ok(self) -> bool:
        return self.identical and self.differs


def report_dict(obj) -> dict:
    """A report dataclass as a plain dict (for records)."""
    return asdict(obj)
