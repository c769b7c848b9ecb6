"""The public face of fluxlab's measurement core (`fluxlab.measure`): timing, evidence, verdicts,
rates and change points. Users and tests call these names; the machinery lives in `measure/`.

    m = bench.run({"stock": f, "fast": g}, expect={"fast": bench.Expect.families("rope")})
    c = bench.compare(m.samples["stock"], m.samples["fast"], claimed=1.3, evidence=m.evidence["fast"])
    c.verdict   # faster | slower | no-difference | inconclusive | not-supported | did-not-run | unverified
"""

from __future__ import annotations

from fluxlab.measure.evidence import (ATTENTION_KERNELS, Evidence, Expect, attention_backends,  # noqa: F401
                                      family_pattern, matches)
from fluxlab.measure.history import change_points  # noqa: F401
from fluxlab.measure.rates import achieved, measure_ceilings  # noqa: F401
from fluxlab.measure.timing import Measurement, Timer, is_cuda, run, time_fn, time_interleaved  # noqa: F401
from fluxlab.measure.verdict import (MAGNITUDE, P_THRESHOLD, VERDICTS, Comparison,  # noqa: F401
                                     aa_false_positive_rate, bootstrap_ratio_ci, compare, decide,
                                     heavy_tailed_samples, lognormal_samples, min_p_value, power,
                                     simulate_verdicts, verdict_counts)

__all__ = ["ATTENTION_KERNELS", "Comparison", "Evidence", "Expect", "MAGNITUDE", "Measurement", "P_THRESHOLD",
           "Timer", "VERDICTS", "aa_false_positive_rate", "achieved", "attention_backends", "bootstrap_ratio_ci",
           "change_points", "compare", "decide", "family_pattern", "heavy_tailed_samples", "is_cuda",
           "lognormal_samples", "matches", "measure_ceilings", "min_p_value", "power", "run", "simulate_verdicts",
           "time_fn", "time_interleaved", "verdict_counts"]
