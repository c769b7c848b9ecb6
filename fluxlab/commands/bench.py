"""`fluxlab bench train|infer|kernels|caches|pipeline`: the benchmark scripts in benchmarks/."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from fluxlab.commands import UserError


def add(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks (train step, inference, kernels, caches, the whole pipeline)")
    p.add_argument("what", choices=["train", "infer", "kernels", "caches", "pipeline"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark script")
    p.set_defaults(func=run)


def run(a) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{a.what}.py"
    if not script.exists():
        raise UserError(f"{script} not found: `fluxlab bench` runs from a source checkout")
    sys.argv = [str(script), *a.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0
