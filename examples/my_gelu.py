"""A researcher's own optimization, validated without editing fluxlab.

`my_fast_gelu` is the claimed fast path: a GELU registered as a custom op, so the profiler names
it (`fluxlab_example::fast_gelu`) on every device and torch.compile can trace it. Like many real
fast paths, it only serves some inputs (float32 here) and silently falls back to the old path
otherwise. That silent fallback is how a claimed 1.7x measures 0.12x in the field, and it is
what the evidence check catches:

    fluxlab notebook run validation_session -p target=examples.my_gelu:T -p shapes='[[64, 1024]]'
    fluxlab notebook run validation_session -p target=examples.my_gelu:T -p shapes='[[64, 1024]]' -p dtype=bf16
        -> did-not-run: the fast path never executed, whatever the timing says
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fluxlab import targets


@torch.library.custom_op("fluxlab_example::fast_gelu", mutates_args=())
def fast_gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x), written as one expression."""
    return x * 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


@fast_gelu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def my_fast_gelu(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:     # the fast path serves fp32 only...
        return fast_gelu(x)
    return F.gelu(x)                 # ...and silently takes the old path for anything else


def make(shape, device, dtype, seed):
    """One input [*shape], drawn in float64 from `seed` and cast, so every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, dtype=torch.float64, generator=g).to(device, dtype),)


T = targets.define(
    "my_gelu",
    make_inputs=make,
    candidate=my_fast_gelu,
    baselines={"eager": F.gelu},
    reference=None,                       # the first baseline
    kernels=[r"fluxlab_example::fast_gelu"],
    counters=None,
    description="GELU as a custom op (fp32 only; other dtypes fall back)",
    shape_doc="any shape",
    default_shapes=((64, 1024),),
)
