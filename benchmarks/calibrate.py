"""Calibrate the verdict rule on real timing noise of this machine.

    python -m benchmarks.calibrate --samples 400 --out tests/data/timing_pool_cpu.json

Times a fixed op (a 96x96 matmul on one thread, ~1 ms blocks) `--samples` times, then resamples
that pool: A/A comparisons (both sides drawn from the pool) give the false-positive rate, and
comparisons with the candidate scaled by 1.10 give the power to flag a 10% slowdown at n = 20.
The same is repeated with 5% heavy-tailed outliers mixed into the pool. Writes the pool (so the
tests resample real noise deterministically) and prints the rates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fluxlab import bench, env


def gather(samples: int) -> list[float]:
    a = torch.randn(96, 96)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores time the scheduler, not the op
    try:
        return bench.run({"mm": lambda: a @ a}, repeats=samples, warmup=5, clock="blocked").samples["mm"]
    finally:
        torch.set_num_threads(threads)


def rates(pool, *, trials: int, seed: int = 0) -> dict:
    pool = np.asarray(pool, float)
    rng = np.random.default_rng(seed)
    heavy = np.where(rng.random(len(pool)) < 0.05, pool * rng.uniform(1.0, 1.6, len(pool)), pool)
    out = {}
    for name, p in (("real", pool), ("real+5%outliers", heavy)):
        out[name] = {"aa_false_positive_rate": bench.aa_false_positive_rate(n=20, trials=trials, seed=seed + 1, pool=p),
                     "power_10pct_n20": bench.power(slowdown=0.10, n=20, trials=trials, seed=seed + 2, pool=p),
                     "mad_over_median": float(np.median(np.abs(p - np.median(p))) / np.median(p))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--trials", type=int, default=5000)
    ap.add_argument("--out", default=None, help="write the pool (JSON) here")
    a = ap.parse_args(argv)
    pool = gather(a.samples)
    result = rates(pool, trials=a.trials)
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"op": "96x96 matmul, 1 thread, blocked ~1 ms", "unit": "ms per call",
                                           "host": env.environment().get("host"), "samples": pool}) + "\n")
        print(f"pool of {len(pool)} samples written to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
