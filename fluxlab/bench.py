"""The public face of fluxlab's measurement core (`fluxlab.measure`): timing, evidence, verdicts,
rates and change points. Users and tests call these names; the machinery lives in `measure/`.

    m = bench.run({"stock": f, "fast": g}, expect={"fast": bench.Expect.families("rope")})
    c = bench.compare(m.samples["stock"], m.samples["fast"], claimed=1.3, evidence=m.evidence["fast"])
    c.verdict   # faster | slower | no-difference | inconclusive | not-supported | did-not-run | unverified
"""

from __future__ import annotations

from typing import Callable, Sequence

from fluxlab.measure.evidence import (ATTENTION_KERNELS, Evidence, Expect, attention_backends,  # noqa: F401
                                      family_pattern, matches)
from fluxlab.measure.history import change_points  # noqa: F401
from fluxlab.measure.rates import achieved, measure_ceilings  # noqa: F401
from fluxlab.measure.timing import Measurement, Timer, is_cuda, run, time_fn, time_interleaved  # noqa: F401
from fluxlab.measure.verdict import (MAGNITUDE, P_THRESHOLD, VERDICTS, Comparison,  # noqa: F401
                                     aa_false_positive_rate, bootstrap_ratio_ci, compare, decide,
                                     heavy_tailed_samples, lognormal_samples, min_p_value, power,
                                     simulate_verdicts, verdict_counts)


def kernel_prefix(family: str) -> str:
    """The name prefix of a fluxlab Triton kernel family (`_fl_<family>_`); match names with
    `family_pattern(family)`, which is anchored."""
    return f"_fl_{family}_"


def collect_evidence(fn: Callable, families: Sequence[str], profile: bool = False, device=None) -> Evidence:
    """Run `fn()` once (as a one-round `run`) and report whether each kernel family executed;
    on CUDA with `profile=True` the family's kernel must also appear among the profiled names."""
    cuda = profile and is_cuda(device if device is not None else "cpu")
    m = run({"fn": fn}, repeats=1, warmup=0, clock="wall" if not cuda else "events",
            device=device if cuda else "cpu", expect={"fn": Expect.families(*families, profile=cuda)})
    return m.evidence["fn"]
