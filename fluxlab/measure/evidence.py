"""Evidence that a fast path executed: declared per variant, checked in the loop that was timed.

An `Expect` says what must be seen while a variant runs:
  * counter increases per call (fluxlab's kernels bump "<family>.<pass>" at every launch; a cache
    bumps "hits"), read before and after every timed sample, so each timed call is covered;
  * counters that must stay still (a cache miss means the fast path was not taken);
  * anchored regular expressions on profiler event names (CUDA kernels, CPU ops, `record_function`
    labels), matched with `re.fullmatch` against a profiled window of the same loop. A substring
    test would let inductor's `triton_poi_fused__scaled_dot_product_cudnn_attention_backward_7`
    "prove" that cuDNN attention ran;
  * patterns that must not be seen (the old path).
`timing.run()` applies it and returns one `Evidence` per variant; `verdict.compare()` turns a
failed check into `did-not-run`, whatever the timing says.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from fluxlab.measure import counters as _counters

# Anchored names of the SDPA backends' kernels and CPU ops (fullmatch). cuDNN's fused kernels are
# generated per shape ("..._knob_7_64x128x128_..."), flash's are C++ templates.
ATTENTION_KERNELS: dict[str, tuple[str, ...]] = {
    "cudnn": (r"cudnn_generated_fort_native_sdpa_sm\d+_flash_[fb]prop(_\w+)?",
              r"void cudnn::fusion::\w+<.*>\(.*\)",
              r"aten::_scaled_dot_product_cudnn_attention(_backward)?"),
    "flash": (r"void pytorch_flash::flash_\w+<.*>(\(.*\))?",
              r"void flash::\w+<.*>\(.*\)",
              r"aten::_scaled_dot_product_flash_attention(_backward)?"),
    "efficient": (r"fmha_cutlass[FB]_\w+(\(.*\))?",
                  r"void (attention_kernel_batched_impl|attention_backward_kernel)<.*>\(.*\)",
                  r"aten::_scaled_dot_product_efficient_attention(_backward)?"),
    "math": (r"aten::_scaled_dot_product_attention_math",),
}


def family_pattern(family: str) -> str:
    """fluxlab's Triton kernels are named `_fl_<family>[_<part>]_kernel`; a family's pattern cannot
    match another family's kernel (`_fl_rope_...` never matches `_fl_qk_norm_rope_...`)."""
    return rf"_fl_{re.escape(family)}(_[a-z0-9]+)*_kernel"


def matches(patterns: Iterable[str], names: Iterable[str]) -> dict[str, list[str]]:
    """For each pattern, the names it fully matches."""
    names = sorted(set(names))
    return {p: [n for n in names if re.fullmatch(p, n)] for p in patterns}


def attention_backends(names: Iterable[str]) -> set[str]:
    """Which SDPA backends ran, judged by anchored patterns on profiler names."""
    return {b for b, pats in ATTENTION_KERNELS.items() if any(matches(pats, names).values())}


def _kernel_counters() -> dict:
    # The kernels (model layer) write these counters; measure reads them from below.
    return _counters.counters()


def _kernel_fallbacks() -> dict:
    return _counters.fallbacks()


@dataclass
class Expect:
    """What must be observed for a variant to count as having run its claimed path.

    counters  {key: minimum increase per call}. A key also covers "<key>.<sub>" and "<key>:<sub>",
              so {"rope": 1} accepts "rope.fwd"; "*" is the sum of all counters. Read from `read()` (default: fluxlab's kernel
              counters) before and after each timed sample.
    still     counter keys that must not move (e.g. a cache's "misses").
    kernels   regexes; each must fullmatch at least one profiled event name.
    forbid    regexes that must match no profiled event name.
    """

    counters: Mapping[str, int] = field(default_factory=dict)
    still: Sequence[str] = ()
    kernels: Sequence[str] = ()
    forbid: Sequence[str] = ()
    read: Callable[[], Mapping[str, int]] | None = None
    fallbacks: Callable[[], Mapping] | None = None

    @classmethod
    def families(cls, *families: str, profile: bool = False) -> "Expect":
        """fluxlab kernel families: each counter must move once per call; with `profile`, each
        family's `_fl_<family>_..._kernel` must also appear among the profiled names (GPU)."""
        return cls(counters={f: 1 for f in families},
                   kernels=tuple(family_pattern(f) for f in families) if profile else (),
                   fallbacks=_kernel_fallbacks)

    @property
    def needs_profile(self) -> bool:
        return bool(self.kernels or self.forbid)

    def snapshot(self) -> dict:
        if not (self.counters or self.still):
            return {}
        return dict((self.read or _kernel_counters)())

    def to_dict(self) -> dict:
        return {"counters": dict(self.counters), "still": list(self.still), "kernels": list(self.kernels),
                "forbid": list(self.forbid)}


def _under(key: str, name: str) -> bool:
    return key == name or key.startswith(name + ".") or key.startswith(name + ":")


def counter_delta(before: Mapping, after: Mapping, name: str) -> int:
    """Increase of counter `name` (with its sub-keys); "*" sums every counter."""
    return sum(v - before.get(k, 0) for k, v in after.items() if name == "*" or _under(k, name))


@dataclass
class Evidence:
    """Whether a claimed fast path executed, and what showed it.

    `counters` holds each expected key's increase, `kernel_names` the profiled names that matched
    a pattern, `checked` where the check was made ("timed-loop" for `timing.run`)."""

    ran: bool
    counters: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    kernel_names: list = field(default_factory=list)
    reason: str = ""
    checked: str = ""
    calls: int = 0
    expect: dict | None = None

    @classmethod
    def check(cls, expect: Expect, *, deltas: Mapping[str, int], calls: int, names: Iterable[str] = (),
              profiled: bool = False, fallbacks: Mapping | None = None, checked: str = "timed-loop") -> "Evidence":
        """Judge accumulated counter deltas (over `calls` calls) and profiled names against `expect`."""
        problems = []
        for key, per_call in expect.counters.items():
            got, need = deltas.get(key, 0), per_call * calls
            if got < need:
                problems.append(f"counter {key} moved {got}x in {calls} timed call(s), expected >= {need}")
        for key in expect.still:
            if deltas.get(key, 0) != 0:
                problems.append(f"counter {key} moved {deltas[key]}x, expected 0")
        names = sorted(set(names))
        seen = matches(expect.kernels, names)
        if expect.kernels and not profiled:
            problems.append("kernel patterns declared but no profiled window was taken")
        for pat, hits in seen.items():
            if profiled and not hits:
                problems.append(f"no profiled event fully matches {pat!r}")
        for pat, hits in matches(expect.forbid, names).items():
            if hits:
                problems.append(f"forbidden {pat!r} ran: {hits[0][:80]}")
        fb = dict(fallbacks or {})
        if problems and fb:
            problems.append("fallbacks: " + "; ".join(f"{k}: {v}" for k, v in fb.items()))
        matched = sorted({n for hits in seen.values() for n in hits})
        ok_reason = ", ".join([f"{k} +{deltas.get(k, 0)}" for k in expect.counters]
                              + [f"{len(matched)} profiled name(s) matched" if expect.kernels else ""]).strip(", ")
        return cls(ran=not problems, counters={k: deltas.get(k, 0) for k in (*expect.counters, *expect.still)},
                   fallbacks=fb, kernel_names=matched, reason="; ".join(problems) or f"ran in {calls} call(s): {ok_reason}",
                   checked=checked, calls=calls, expect=expect.to_dict())

    def to_dict(self) -> dict:
        return asdict(self)
