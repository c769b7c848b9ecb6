"""The measurement core: every speed, memory or correctness number in fluxlab goes through here.

    timing    one interleaved (ABAB) timer; each sample from the right clock for its scale
    evidence  what must be seen for a fast path to count as executed, checked in the timed loop
    counters  the counters fast paths bump and the reasons they fell back (the kernels write them)
    verdict   `compare()`: bootstrap CI, Mann-Whitney U, and one decisive verdict with its reason
    history   change points in a series of records, corrected for choosing the split
    rates     achieved TFLOP/s and TB/s against measured device ceilings
    regression  the regression analysis of stored series: latest vs baseline, change points, controls
    reports   latency percentiles and the reports of an inference verification

Memory (one sampler, one stage profiler, one leak rule) lives in `fluxlab.memory`.
`fluxlab.bench` re-exports the public names, which users and tests rely on.
"""
