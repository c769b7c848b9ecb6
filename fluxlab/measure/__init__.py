"""The measurement core: every speed, memory or correctness number in fluxlab goes through here.

    timing    one interleaved (ABAB) timer; each sample from the right clock for its scale
    evidence  what must be seen for a fast path to count as executed, checked in the timed loop
    verdict   `compare()`: bootstrap CI, Mann-Whitney U, and one decisive verdict with its reason
    history   change points in a series of records, corrected for choosing the split
    rates     achieved TFLOP/s and TB/s against measured device ceilings

Memory (one sampler, one stage profiler, one leak rule) lives in `fluxlab.memory`.
`fluxlab.bench` re-exports the public names, which users and tests rely on.
"""
