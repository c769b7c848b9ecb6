"""Memory: per-step traces, stage profiles with budgets, leak verdicts, CUDA snapshots, a leak zoo.

What is measured (docs/ARCHITECTURE.md, "Measuring"):
* CUDA: allocated, reserved and peak per step (`reset_peak_memory_stats` after each reading).
* CPU: RSS (psutil), bytes in use on the C heap (glibc `mallinfo2`, which sees every tensor buffer,
  including the activations an autograd graph holds and Python cannot reach), and live tensor
  bytes (a gc scan of Python-visible tensors, storages counted once). The heap figure is the
  primary CPU metric: it moves by exactly what leaks, so a leak test on small tensors cannot flake
  on RSS noise. Where mallinfo2 does not exist (macOS, musl) the gc scan stands in.
* A leak is a post-warm-up slope whose 99% CI excludes 0 AND whose projected growth over the
  horizon exceeds a budget (so a few bytes per step of bookkeeping are not a "leak").
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import stats


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


# --- CPU probes -------------------------------------------------------------------------------
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # the process's own symbols: glibc >= 2.33 has it
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_bytes() -> int | None:
    """Bytes in use from malloc, all arenas plus mmapped chunks; None where glibc's mallinfo2 is missing."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def live_tensor_bytes() -> int:
    """Bytes of CPU tensor storages reachable from Python (each storage once). Graph-saved
    activations are invisible to it; it costs one pass over gc.get_objects()."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            # type() rather than isinstance(): isinstance reads __class__, which wakes lazy/deprecated proxies
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu" or obj.is_sparse:
                continue
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()  # FakeTensors left by torch.compile have none
        except (RuntimeError, ReferenceError, NotImplementedError):  # exotic tensor subclasses, dead proxies
            continue
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total


def _rss() -> int:
    """Resident set size in bytes; /proc first, since a bare GPU box may lack psutil."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- the one sampler ----------------------------------------------------------------------------
def sample(device) -> dict:
    """One memory reading. CUDA: allocated, reserved and peak (since the last reset) bytes, plus
    the process RSS; CPU: RSS and C-heap bytes in use (peak None: the CPU has no peak counter)."""
    if _is_cuda(device):
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
                "peak": torch.cuda.max_memory_allocated(device), "rss": _rss()}
    return {"allocated": None, "reserved": None, "peak": None, "rss": _rss(), "heap": heap_bytes()}


# --- per-step traces --------------------------------------------------------------------------
class MemoryTracer:
    """Appends one memory sample per `step(i)`.

    CUDA sample: allocated, reserved, peak (since the previous step; the peak is reset each step).
    CPU sample: rss, heap (malloc in use), tensors (live tensor bytes; `scan_tensors=False` skips
    the gc scan in big processes). `collect=True` first collects the young gc generations, so fresh
    reference cycles do not look like leaks (a full collection costs ~0.2 s in a process with torch
    loaded; the young ones cost almost nothing).
    """

    def __init__(self, device="cpu", *, scan_tensors: bool = True, collect: bool = True):
        self.device = str(device)
        self.cuda = _is_cuda(device)
        self.scan_tensors = scan_tensors
        self.collect = collect
        self.samples: list[dict] = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def metric(self) -> str:
        """The key `values()` returns by default: what a leak verdict should look at."""
        if self.cuda:
            return "allocated"
        return "heap" if _MALLINFO2 is not None else "tensors"

    def step(self, i: int | None = None) -> dict:
        if self.collect:
            gc.collect(1)
        row: dict = {"step": len(self.samples) if i is None else i}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            now = sample(self.device)
            row.update(allocated=now["allocated"], reserved=now["reserved"], peak=now["peak"])
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            now = sample(self.device)
            row.update(rss=now["rss"], heap=now["heap"],
                           tensors=live_tensor_bytes() if self.scan_tensors or _MALLINFO2 is None else None)
        self.samples.append(row)
        return row

    def values(self, key: str | None = None) -> list[float]:
        key = key or self.metric
        return [float(s[key]) for s in self.samples]

    def to_dict(self) -> dict:
        return {"device": self.device, "metric": self.metric, "samples": list(self.samples)}


# --- stage profiles ---------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    start: int  # CUDA: allocated bytes; CPU: RSS bytes
    end: int
    peak: int
    peak_exact: bool  # False when the CPU peak could only be bounded by max(start, end)
    reserved: int | None = None  # CUDA only


@dataclass
class StageProfile:
    """Memory at named stages (typically baseline, loaded, peak, cleanup), checked against budgets."""

    device: str = "cpu"
    stages: list[Stage] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str):
        cuda = _is_cuda(self.device)
        gc.collect()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            exact = True
        else:
            exact = _reset_peak_rss()
            start = _rss()
        yield self
        gc.collect()
        if cuda:
            torch.cuda.synchronize(self.device)
            end, peak = torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
        else:
            end, reserved = _rss(), None
            hwm = _peak_rss() if exact else None
            peak = max(start, end, hwm or 0)
            exact = hwm is not None
        self.stages.append(Stage(name, start, end, peak, exact, reserved))

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def check(self, budgets: dict[str, float]) -> list[str]:
        """Violations of `budgets` in bytes. A key "loaded" limits that stage's peak; "cleanup.end"
        limits another field (start, end, peak, reserved). Unknown stages are violations too."""
        problems = []
        for key, budget in budgets.items():
            name, _, attr = key.partition(".")
            attr = attr or "peak"
            try:
                value = getattr(self[name], attr)
            except KeyError as e:
                problems.append(f"budget {key!r}: {e.args[0]}")
                continue
            except AttributeError:
                problems.append(f"budget {key!r}: a stage has no field {attr!r} (start, end, peak, reserved)")
                continue
            if value is not None and value > budget:
                problems.append(f"stage {name!r} {attr} {value / 2**20:.1f} MiB exceeds budget {budget / 2**20:.1f} MiB")
        return problems

    def to_dict(self) -> dict:
        return {"device": self.device, "stages": [asdict(s) for s in self.stages]}


def stage_profile(stages: dict[str, Callable] | None = None, *, device="cpu") -> StageProfile:
    """Run each callable of `stages` in order as a named stage; or, without `stages`, return an
    empty profile to fill with `with profile.stage("loaded"): ...`."""
    profile = StageProfile(device=str(device))
    for name, fn in (stages or {}).items():
        with profile.stage(name):
            fn()
    return profile


# --- leak verdicts ----------------------------------------------------------------------------
@dataclass
class LeakVerdict:
    leak: bool
    slope: float  # bytes per step after warm-up
    ci_low: float
    ci_high: float
    projected: float  # slope * horizon, bytes
    budget: float
    n: int
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def leak_verdict(values, *, warmup: int, horizon: int, budget_bytes: float, level: float = 0.99) -> LeakVerdict:
    """Leak when the post-warm-up slope's `level` CI excludes 0 (growth) AND slope * horizon > budget."""
    y = np.asarray(values, float)[warmup:]
    if len(y) < 3:
        raise ValueError(f"leak_verdict needs >= 3 samples after warm-up {warmup}, got {len(y)}")
    fit = stats.linregress(np.arange(len(y)), y)
    stderr = 0.0 if np.ptp(y) == 0 else fit.stderr  # a perfectly flat series: linregress gives NaN
    half = stats.t.ppf(0.5 + level / 2, len(y) - 2) * stderr
    lo, hi = fit.slope - half, fit.slope + half
    projected = fit.slope * horizon
    leak = bool(lo > 0 and projected > budget_bytes)
    reason = (f"slope {fit.slope:.4g} B/step, {level:.0%} CI [{lo:.4g}, {hi:.4g}], "
              f"projected {projected / 2**20:.3f} MiB over {horizon} steps vs budget {budget_bytes / 2**20:.3f} MiB")
    return LeakVerdict(leak, float(fit.slope), float(lo), float(hi), float(projected), float(budget_bytes), len(y), reason)


# --- CUDA snapshots (pytorch.org/memory_viz) --------------------------------------------------
def _cuda_missing(what: str) -> dict | None:
    if torch.cuda.is_available():
        return None
    return {"written": False, "path": None, "reason": f"{what} needs CUDA; this machine has none"}


def record_history(enabled: bool = True, max_entries: int = 100_000) -> None:
    """Start (or stop) recording CUDA allocation history so snapshots carry stack traces."""
    if torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(enabled="all" if enabled else None, max_entries=max_entries)


def cuda_snapshot(path) -> dict:
    """Pickle `torch.cuda.memory._snapshot()` for https://pytorch.org/memory_viz (drag the file in).
    A no-op with a reason on the CPU."""
    missing = _cuda_missing("a CUDA memory snapshot")
    if missing:
        return missing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(torch.cuda.memory._snapshot(), f)
    return {"written": True, "path": str(path), "reason": "open at https://pytorch.org/memory_viz"}


def html_timeline(path, snapshot: dict | None = None) -> dict:
    """A self-contained HTML allocation timeline (torch.cuda._memory_viz.trace_plot). Needs
    `record_history()` to have been on. A no-op with a reason on the CPU."""
    missing = _cuda_missing("an HTML memory timeline")
    if missing:
        return missing
    from torch.cuda import _memory_viz

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_memory_viz.trace_plot(snapshot if snapshot is not None else torch.cuda.memory._snapshot()))
    return {"written": True, "path": str(path), "reason": "open in a browser"}


# --- the leak zoo: planted leaks (positive controls) beside their fixes (negative controls) ----
# Each function runs `steps` small CPU training/eval steps and returns the per-step memory series
# of MemoryTracer's primary metric. Sizes are chosen so a leak adds >= 64 KiB per step.
def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))


def _gradient_penalty(steps: int, leaky: bool) -> list[float]:
    """WGAN-GP-style double backward. The leak: backward(retain_graph=True) keeps the graph's saved
    activations, and an EMA of the penalty kept as a tensor links every step's graph to the next,
    so none is ever freed. Fix: no retain_graph, and the EMA takes a detached value."""
    model, tracer = _tiny_model(), MemoryTracer("cpu", scan_tensors=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ema = torch.zeros(())
    for i in range(steps):
        x = torch.randn(256, 64, requires_grad=True)  # [B, D]
        score = model(x).sum()
        (grad_x,) = torch.autograd.grad(score, x, create_graph=True)  # [B, D], differentiable
        penalty = ((grad_x.norm(dim=1) - 1) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        (0.01 * score + penalty).backward(retain_graph=leaky)
        opt.step()
        ema = 0.9 * ema + 0.1 * (penalty if leaky else penalty.detach())
        tracer.step(i)
    return tracer.values()


def _loss_list(steps: int, leaky: bool) -> list[float]:
    """Validation losses appended as tensors outside no_grad: each keeps its whole forward graph
    (activations included). Fix: no_grad and `.item()`."""
    model, tracer = _tiny_model(), MemoryTracer("cpu", scan_tensors=False)
    losses: list = []
    for i in range(steps):
        x, y = torch.randn(256, 64), torch.randn(256, 1)
        with contextlib.nullcontext() if leaky else torch.no_grad():
            loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss if leaky else loss.item())
        tracer.step(i)
    return tracer.values()


def _metric_list(steps: int, leaky: bool) -> list[float]:
    """Per-step metrics kept as (detached) tensors in an ever-growing list. Fix: a bounded window
    of Python floats."""
    model, tracer = _tiny_model(), MemoryTracer("cpu", scan_tensors=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    metrics: dict = {"per_rowloss": [] if leaky else collections.deque(maxlen=100)}
    for i in range(steps):
        x, y = torch.randn(256, 64), torch.randn(256, 1)
        per_sample = (model(x) - y).pow(2).expand(256, 64)  # [B, 64]: a per-sample, per-feature metric
        opt.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        opt.step()
        metrics["per_rowloss"].append(per_sample.detach().clone() if leaky else per_sample.mean().item())
        tracer.step(i)
    return tracer.values()


def _cache(steps: int, leaky: bool) -> list[float]:
    """A memo cache keyed by something that changes every step (here a sequence length), never
    evicted. Fix: a small LRU (OrderedDict with a size bound)."""
    tracer, cache = MemoryTracer("cpu", scan_tensors=False), collections.OrderedDict()
    for i in range(steps):
        key = 4096 + i  # e.g. position ids per sequence length: every bucket is new
        if key not in cache:
            cache[key] = torch.arange(key * 4, dtype=torch.float32)  # 64 KiB and up
        cache.move_to_end(key)
        if not leaky and len(cache) > 4:
            cache.popitem(last=False)
        tracer.step(i)
    return tracer.values()


LEAK_ZOO: dict[str, tuple[Callable[[int], list[float]], Callable[[int], list[float]]]] = {
    name: (lambda steps, f=fn: f(steps, leaky=True), lambda steps, f=fn: f(steps, leaky=False))
    for name, fn in {"gradient_penalty_retain_graph": _gradient_penalty, "loss_tensors_in_list": _loss_list,
                     "unbounded_metric_list": _metric_list, "unbounded_cache": _cache}.items()
}


def run_leak_zoo(steps: int = 24, *, warmup: int = 6, horizon: int = 1000,
                 budget_bytes: float = 2**20) -> list[dict]:
    """Run every leaky/fixed pair; `ok` is whether the verdict matches what was planted."""
    rows = []
    for name, (leaky_fn, fixed_fn) in LEAK_ZOO.items():
        for variant, fn in (("leaky", leaky_fn), ("fixed", fixed_fn)):
            verdict = leak_verdict(fn(steps), warmup=warmup, horizon=horizon, budget_bytes=budget_bytes)
            expected = variant == "leaky"
            rows.append({"name": name, "variant": variant, "leak": verdict.leak, "expected": expected,
                         "ok": verdict.leak == expected, "slope": verdict.slope, "reason": verdict.reason})
    return rows


# --- plots ------------------------------------------------------------------------------------
PANEL_TITLES = {"allocated": "CUDA allocated", "reserved": "CUDA reserved", "peak": "CUDA peak within the step",
                "rss": "process RSS", "heap": "malloc heap in use", "tensors": "live tensor bytes"}


def plot_trace(samples: list[dict], *, warmup: int = 0, keys=None, title: str = "memory per step"):
    """One panel per metric of a MemoryTracer's samples, in MiB, warm-up shaded; returns the Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from fluxlab.plots import plain_numbers

    keys = keys or [k for k in samples[0] if k != "step" and any(s.get(k) is not None for s in samples)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 2.9), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], keys):
        pts = [(s["step"], s[key] / 2**20) for s in samples if s.get(key) is not None]
        ax.plot(*zip(*pts), "o-", ms=3)
        if warmup:
            ax.axvspan(samples[0]["step"] - 0.5, samples[min(warmup, len(samples)) - 1]["step"] + 0.5, color="0.9")
        ax.set_title(PANEL_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("MiB")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        plain_numbers(ax)
    fig.suptitle(title + (" (grey: warm-up, left out of the leak fit)" if warmup else ""), fontsize=10)
    return fig


def plot_stages(profile: StageProfile, title: str = "memory by stage"):
    """Start / peak / end of each stage of a StageProfile, in MiB; returns the Figure."""
    import matplotlib.pyplot as plt

    from fluxlab.plots import plain_numbers

    fig, ax = plt.subplots(figsize=(6, 2.9), layout="constrained")
    x = np.arange(len(profile.stages))
    for off, name in ((-0.25, "start"), (0, "peak"), (0.25, "end")):
        ax.bar(x + off, [getattr(s, name) / 2**20 for s in profile.stages], width=0.25, label=name)
    ax.set_xticks(x, [s.name for s in profile.stages])
    ax.set_xlabel("stage")
    ax.set_ylabel("MiB (CUDA allocated, CPU RSS)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    plain_numbers(ax)
    return fig
