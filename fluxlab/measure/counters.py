"""The evidence counters fast paths bump, and the reasons they fell back.

They live in the measurement layer so that evidence checks read them directly, while the kernels
(model layer) write them: `fluxlab.kernels` counts "<family>.<pass>" per launch and records each
distinct fallback reason per family. Nothing here is thread-safe beyond the GIL; the counters
are evidence, not accounting.
"""

from __future__ import annotations

from collections import Counter

_COUNTS: Counter[str] = Counter()
_FALLBACKS: dict[str, list[str]] = {}


def counters() -> dict[str, int]:
    """Fast-path launches so far, keyed "<family>.<pass>"."""
    return dict(_COUNTS)


def fallbacks() -> dict[str, list[str]]:
    """family -> the distinct reasons a call took the reference path, in first-seen order."""
    return {k: list(v) for k, v in _FALLBACKS.items()}


def reset() -> None:
    """Zero the counters and forget the fallback reasons."""
    _COUNTS.clear()
    _FALLBACKS.clear()


def bump(key: str) -> None:
    _COUNTS[key] += 1


def record_fallback(family: str, reason: str) -> None:
    reasons = _FALLBACKS.setdefault(family, [])
    if reason not in reasons:
        reasons.append(reason)
