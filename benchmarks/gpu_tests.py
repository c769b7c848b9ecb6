"""The GPU test suite and its store record `tests/gpu` (`make test-gpu`).

Runs the kernel and attention tests (tests/kernels, tests/unit/test_attention.py) under pytest on a CUDA
machine, where they launch the compiled Triton kernels and cuDNN/flash attention, and writes one store
record, `tests/gpu`: verdict "pass" or "fail", metrics passed / failed / errors / skipped / exit_code and
the ids of the failed tests, with the store's provenance (commit, device, versions). It lands in
<out>/records.jsonl (store export format: commit it under benchmarks/results/; tests/unit/test_gpu_record.py
reads it there), beside pytest's per-test report <out>/junit.xml.

    python -m benchmarks.gpu_tests --out DIR [pytest args ...]

On a copy without .git, say what it is: FLUXLAB_GIT_COMMIT=<sha> and FLUXLAB_GIT_DIRTY=0 for a clean tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ["tests/kernels", "tests/unit/test_attention.py"]
BENCHMARK = "tests/gpu"


class Outcomes:
    """pytest plugin: the outcome of every test, as pytest's own summary counts them."""

    def __init__(self):
        self.passed = self.failed = self.errors = self.skipped = 0
        self.failures: list[str] = []

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            self.skipped += 1
        elif report.failed:
            if report.when == "call":
                self.failed += 1
            else:  # setup or teardown: pytest reports it as an error
                self.errors += 1
            self.failures.append(f"{report.nodeid} ({report.when})")
        elif report.when == "call":
            self.passed += 1

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors += 1
            self.failures.append(f"{report.nodeid} (collection)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for records.jsonl and junit.xml")
    args, extra = ap.parse_known_args(argv)  # the rest goes to pytest
    # The suite must run the compiled kernels: an interpreter switch inherited from a CPU shell (the
    # Makefile exports one where nvidia-smi is missing) would make this a CPU run recorded as a GPU one.
    os.environ.pop("TRITON_INTERPRET", None)

    import pytest
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu_tests: no CUDA device visible; run it on a GPU machine", file=sys.stderr)
        return 2
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)  # the suite's paths and the pytest settings in pyproject.toml are the checkout's
    parallel = []
    with contextlib.suppress(ImportError):
        import xdist  # noqa: F401  - several workers compile the Triton kernels in parallel

        if not any(a == "-n" or a.startswith("-n") or a.startswith("--numprocesses") for a in extra):
            parallel = ["-n", "4"]
    outcomes = Outcomes()
    t0 = time.perf_counter()
    code = int(pytest.main([*SUITE, "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={args.out / 'junit.xml'}",
                            *parallel, *extra], plugins=[outcomes]))
    seconds = time.perf_counter() - t0

    from fluxlab import store

    torch.cuda.init()  # the record's device name from torch, also when xdist workers ran the tests
    ok = code == 0 and outcomes.failed == outcomes.errors == 0 and outcomes.passed > 0
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "gpu_tests.db"  # a store of this one record, exported below
        rec = store.record(BENCHMARK, verdict="pass" if ok else "fail", device=torch.device("cuda", 0),
                           params={"suite": SUITE, "pytest_args": [*parallel, *extra]},
                           metrics={"passed": outcomes.passed, "failed": outcomes.failed, "errors": outcomes.errors,
                                    "skipped": outcomes.skipped, "exit_code": code, "seconds": round(seconds, 1),
                                    "failures": outcomes.failures},
                           store=db, display=False)
        (args.out / "records.jsonl").write_text(store.export_records("json", store=db))
    print(f"{BENCHMARK}: {rec['verdict']} ({outcomes.passed} passed, {outcomes.failed} failed, {outcomes.errors} "
          f"errors, {outcomes.skipped} skipped) on {rec.get('device_name')} at commit {rec.get('git_commit')} "
          f"(dirty: {rec.get('git_dirty')}) -> {args.out / 'records.jsonl'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
