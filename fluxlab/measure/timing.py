"""The one timer: variants run interleaved (ABAB...) in one process, raw samples kept.

Each sample comes from the right clock for its scale:
  * "events"   CUDA events around one call (long steps; the queue is drained first);
  * "wall"     `time.perf_counter` around one call (the CPU);
  * "blocked"  one of those clocks around a block of k calls, divided by k: a microsecond kernel
               is not mostly launch overhead and timer resolution (the idea of
               `torch.utils.benchmark`'s blocked_autorange and `triton.testing.do_bench`).
"auto" picks "blocked" when one call takes less than `min_block_ms`, else the per-call clock.

`run()` also checks each variant's `Expect` in the loop it times: counters are read around every
timed sample, and a few extra iterations of the same loop are profiled for kernel names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from fluxlab.measure.evidence import Evidence, Expect, counter_delta


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class Timer:
    """Times `fn(i)` for i in a block, in milliseconds per call: CUDA events on a CUDA device,
    perf_counter otherwise. On CUDA the queue is drained before the start event so earlier work
    is not billed here; `flush_l2=True` overwrites a 256 MiB buffer first so small kernels do not
    run from a warm L2 cache."""

    def __init__(self, device="cpu", flush_l2: bool = False):
        self.device = device
        self.cuda = is_cuda(device)
        self._flush = None
        if self.cuda:
            import torch

            self._torch = torch
            if flush_l2:
                self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def block(self, fn: Callable[[int], object], start: int = 0, k: int = 1) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            for i in range(start, start + k):
                fn(i)
            return (time.perf_counter() - t0) * 1e3 / k
        torch = self._torch
        if self._flush is not None:
            self._flush.zero_()
        torch.cuda.synchronize(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(start, start + k):
            fn(i)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / k

    def __call__(self, fn: Callable, *args) -> float:
        return self.block(lambda i: fn(*args))


def _caller(fn: Callable, inputs: Sequence | None) -> Callable[[int], object]:
    # Rotating through several inputs keeps caches from flattering small kernels.
    return (lambda i: fn()) if inputs is None else (lambda i: fn(inputs[i % len(inputs)]))


@dataclass
class Measurement:
    """Raw samples (ms per call) per variant, the clock used, and the evidence checked in the loop."""

    samples: dict[str, list[float]]
    clock: str
    calls_per_sample: dict[str, int]
    evidence: dict[str, Evidence] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"clock": self.clock, "calls_per_sample": self.calls_per_sample,
                "evidence": {k: e.to_dict() for k, e in self.evidence.items()}}


def _profiled_names(call: Callable[[], object], cuda: bool) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    return sorted({e.name for e in prof.events()})


def _block_size(call: Callable[[int], object], timer: Timer, min_block_ms: float, max_block: int) -> int:
    """Calls per sample so one sample lasts at least `min_block_ms` (1 when one call already does)."""
    one = timer.block(call, 0, 1)
    if one >= min_block_ms:
        return 1
    return int(min(max_block, max(2, min_block_ms / max(one, 1e-4))))


def run(variants: Mapping[str, Callable], *, repeats: int = 20, warmup: int = 3, device="cpu",
        inputs: Sequence | None = None, flush_l2: bool = False, clock: str = "auto",
        expect: Mapping[str, Expect] | None = None, profile_iters: int = 1,
        min_block_ms: float = 1.0, max_block: int = 1000) -> Measurement:
    """Time `variants` interleaved and check each one's `Expect` in the same loop.

    Loop: `warmup` untimed rounds, then `repeats` timed rounds (variant order A, B, A, B...; each
    sample is one call or one block of calls), then `profile_iters` profiled rounds for variants
    that declare kernel patterns (profiling perturbs timing, so those rounds are not samples).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if clock not in ("auto", "blocked", "events", "wall"):
        raise ValueError(f"clock must be auto, blocked, events or wall, got {clock!r}")
    expect = dict(expect or {})
    unknown = set(expect) - set(variants)
    if unknown:
        raise ValueError(f"expectations for unknown variant(s) {sorted(unknown)}; variants: {list(variants)}")
    timer = Timer(device, flush_l2=flush_l2)
    calls = {name: _caller(fn, inputs) for name, fn in variants.items()}
    for i in range(warmup):
        for call in calls.values():
            call(i)
    per_call_clock = "events" if timer.cuda else "wall"
    k = {n: 1 for n in calls}
    if clock in ("auto", "blocked"):
        k = {n: _block_size(c, timer, min_block_ms, max_block) for n, c in calls.items()}
    if clock == "blocked":  # always a block, even for calls that already last min_block_ms
        k = {n: max(2, v) for n, v in k.items()}
    used = f"blocked-{per_call_clock}" if any(v > 1 for v in k.values()) else per_call_clock
    samples: dict[str, list[float]] = {n: [] for n in calls}
    deltas: dict[str, dict[str, int]] = {n: {} for n in calls}
    for r in range(repeats):
        for name, call in calls.items():
            ex = expect.get(name)
            before = ex.snapshot() if ex else {}
            samples[name].append(timer.block(call, r * k[name], k[name]))
            if ex and (ex.counters or ex.still):
                after = ex.snapshot()
                for key in (*ex.counters, *ex.still):
                    deltas[name][key] = deltas[name].get(key, 0) + counter_delta(before, after, key)
    names: dict[str, list[str]] = {n: [] for n in calls}
    for r in range(profile_iters):
        for name, call in calls.items():
            ex = expect.get(name)
            if ex and ex.needs_profile:
                names[name] += _profiled_names(lambda: call(repeats * k[name] + r), timer.cuda)
    evidence = {}
    for name, ex in expect.items():
        fallbacks = ex.fallbacks() if ex.fallbacks else None
        evidence[name] = Evidence.check(ex, deltas=deltas[name], calls=repeats * k[name], names=names[name],
                                        profiled=ex.needs_profile and profile_iters > 0, fallbacks=fallbacks)
    return Measurement(samples=samples, clock=used, calls_per_sample=k, evidence=evidence)


def time_interleaved(fns: dict[str, Callable], *, repeats: int = 20, warmup: int = 3, device="cpu",
                     inputs: Sequence | None = None, flush_l2: bool = False
                     ) -> dict[str, list[float]]:
    """Raw per-call times (ms) of several functions run ABAB... in one process, one call per
    sample (use `run()` for blocked samples and evidence)."""
    return run(fns, repeats=repeats, warmup=warmup, device=device, inputs=inputs, flush_l2=flush_l2,
               clock="events" if is_cuda(device) else "wall").samples


def time_fn(fn: Callable, *, repeats: int = 20, warmup: int = 3, device="cpu",
            inputs: Sequence | None = None, flush_l2: bool = False) -> list[float]:
    """Raw per-call times (ms) of `fn()` (or `fn(inputs[i % len])`) after `warmup` untimed calls."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device,
                            inputs=inputs, flush_l2=flush_l2)["fn"]
