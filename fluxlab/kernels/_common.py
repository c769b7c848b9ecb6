"""Shared plumbing for the kernel families: evidence counters, fallback reasons, the
FLUXLAB_DISABLE switch, and the one place that decides whether Triton can serve a tensor.

Evidence rules (docs/ARCHITECTURE.md, "Kernels"): every fast-path launch bumps a counter named
"<family>.<pass>" (e.g. "rope.fwd"); every time a call takes the plain-PyTorch path instead,
the reason is recorded under its family. Nothing here is thread-safe beyond the GIL; the
counters are evidence, not accounting.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

# The counters themselves live in the measurement layer, which reads them as evidence.
from fluxlab.measure import counters as _evidence

FAMILIES = ("rope", "qk_norm_rope", "adaln", "sparse_delta")
DISABLE_ENV = "FLUXLAB_DISABLE"

# Triton may be missing (or broken) on some hosts; the package must still import there.
try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    _TRITON_IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - exercised only on hosts without triton
    triton = None
    tl = None
    HAVE_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Dtypes the kernels are written for. Math runs in fp32 (fp64 for fp64 inputs, so gradcheck
# exercises the Triton path itself).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def counters() -> dict[str, int]:
    """Fast-path launches so far, keyed "<family>.<pass>"; `family_totals()` sums per family."""
    return _evidence.counters()


def family_totals(counts: dict[str, int] | None = None) -> dict[str, int]:
    """Per-family sums of `counters()` (or of a given snapshot); every family is present."""
    counts = counters() if counts is None else counts
    totals = {f: 0 for f in FAMILIES}
    for key, n in counts.items():
        totals[key.split(".", 1)[0]] = totals.get(key.split(".", 1)[0], 0) + n
    return totals


def reset_counters() -> None:
    """Zero the counters and forget the fallback reasons."""
    _evidence.reset()


def fallbacks() -> dict[str, list[str]]:
    """family -> the distinct reasons a call took the reference path, in first-seen order."""
    return _evidence.fallbacks()


def count(key: str) -> None:
    family = key.split(".", 1)[0]
    assert family in FAMILIES, key  # internal invariant: keys are "<family>.<pass>"
    _evidence.bump(key)


def record_fallback(family: str, reason: str) -> None:
    _evidence.record_fallback(family, reason)


# Other fast paths FLUXLAB_DISABLE can switch off (validation targets honour them); one parser
# for all, so a typo in any name is an error rather than a path silently left on.
SWITCHES = ("attention", "compile", "latents", "text_embeddings", "position_ids")


def requested_off() -> set[str]:
    """Every name in $FLUXLAB_DISABLE (comma separated; "all" means every family and switch).

    Read at call time so a test or notebook can change it without re-importing. An unknown
    name is an error: a typo would otherwise leave the path silently enabled.
    """
    raw = os.environ.get(DISABLE_ENV, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    if "all" in names:
        return set(FAMILIES) | set(SWITCHES)
    unknown = names - set(FAMILIES) - set(SWITCHES)
    if unknown:
        raise ValueError(f"{DISABLE_ENV}={raw!r} names unknown fast paths {sorted(unknown)}; "
                         f"choose from {list(FAMILIES) + list(SWITCHES)} or 'all'")
    return names


def disabled() -> set[str]:
    """Kernel families named in $FLUXLAB_DISABLE (see `requested_off`)."""
    return requested_off() & set(FAMILIES)


def interpreting() -> bool:
    """True when Triton kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAVE_TRITON and type(_probe).__name__ == "InterpretedFunction"


def triton_can_serve(family: str, *tensors: torch.Tensor) -> bool:
    """Decide between the Triton path and the reference; record the reason when it is the latter.

    Triton runs CUDA tensors, or CPU tensors when the kernels are interpreted. Anything else
    (MPS, XPU, integer or fp8 dtypes, a missing Triton) takes the reference path.
    """
    if family in disabled():
        record_fallback(family, f"disabled by {DISABLE_ENV}")
        return False
    if not HAVE_TRITON:
        record_fallback(family, f"triton unavailable ({_TRITON_IMPORT_ERROR})")
        return False
    interp = interpreting()
    for t in tensors:
        if t is None:
            continue
        dev = t.device.type
        if not (dev == "cuda" or (dev == "cpu" and interp)):
            why = "set TRITON_INTERPRET=1 before importing triton to run on the CPU" if dev == "cpu" else \
                "Triton kernels need a CUDA device"
            record_fallback(family, f"device {dev} unsupported ({why})")
            return False
        if t.dtype not in SUPPORTED_DTYPES:
            record_fallback(family, f"dtype {t.dtype} unsupported (kernels take fp16/bf16/fp32/fp64)")
            return False
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        record_fallback(family, f"tensors on several devices {sorted(map(str, devices))}")
        return False
    return True


# When set (tests), every buffer a launcher allocates starts as NaN, so an element a kernel
# forgets to write shows up in the result instead of passing as leftover memory.
_POISON = False


@contextmanager
def poisoned_outputs(on: bool = True):
    global _POISON
    old, _POISON = _POISON, on
    try:
        yield
    finally:
        _POISON = old


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _POISON and t.is_floating_point() else t


def new_empty_like(t: torch.Tensor) -> torch.Tensor:
    return new_empty(t.shape, t.dtype, t.device)


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: fp64 for fp64 tensors (gradcheck), fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def rows_per_program(n_rows: int, row_block: int) -> int:
    """Rows one program takes (a power of 2). On a GPU about 4096 elements per program keeps
    registers in bounds; the CPU interpreter runs programs one after another with a fixed cost each,
    so there it takes as many rows as fit 64 Ki elements. Same kernel code either way."""
    budget = (1 << 16) if interpreting() else 4096
    return max(1, min(next_pow2(n_rows), budget // row_block))


def num_warps(block_elems: int) -> int:
    """Warps for a program holding `block_elems` elements: ~16 elements per thread, 4..16 warps."""
    return max(4, min(16, next_pow2(block_elems) // 512))


if HAVE_TRITON:
    @triton.jit
    def _probe():  # only its type matters: tells whether @triton.jit built interpreted kernels
        pass
else:  # pragma: no cover
    _probe = None
