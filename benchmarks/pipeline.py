"""The whole FLUX.1-dev pipeline at real scale: `fluxlab train` end to end, interrupted and resumed,
and aspect buckets in one run.

    python -m benchmarks.pipeline --model flux1-dev-full --res 1024 --steps 100 --interrupt-at 50 --out DIR
    python -m benchmarks.pipeline --model tiny --res 64 --steps 6 --interrupt-at 3 --device cpu --out DIR  (smoke)

Part `resume` runs the user's command, `fluxlab train configs/flux1-dev.yaml --set model=...
--set data=...`, as a subprocess on a synthetic dataset at `--res`:
  A  uninterrupted, `--steps` steps, into a fresh cache folder (the cold pass fills the caches);
  B  the same run into another folder, sent SIGTERM (to its whole process group, as a scheduler
     does) once step `--interrupt-at` is logged: it finishes the step in flight, checkpoints, exits 143;
  C  `--resume latest` on B's folder, to `--steps`.
  A2 a second uninterrupted run beside B (its own caches): the noise reference.
B and C find the caches warm. Every step logs (log_every=1), so metrics.jsonl holds every loss and
when it arrived. The check: C starts right after B's checkpoint, and B+C's loss curve equals A's
step by step: bitwise when A and A2 agree bitwise (the path is deterministic), otherwise no
further from A than A2 is (bf16 noise). A and C run alone: A times the cold set-up, C the warm
set-up and the data wait per step.

Part `buckets` runs in this process: a Trainer on a dataset whose images fall in three aspect
buckets (at 1024: 1024x1024, 832x1216, 1216x832) trains `--bucket-steps` steps in one run (per-
bucket position-id hit rates, compile's graph count), then times one step per bucket with
`fluxlab.bench.run`, interleaved, each step's evidence being its bucket's position-id hit and no
new compiled graph.

Records (one JSON line each, appended to DIR/records.jsonl): `pipeline/train` (run A: steps,
set-up time cold vs warm, memory around the encoders' release, data wait per step),
`pipeline/resume` (pass/fail with the loss differences), `pipeline/buckets` and
`pipeline/buckets/<HxW>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux1-dev-full", help="a preset or a FLUX pipeline folder")
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--interrupt-at", type=int, default=50)
    p.add_argument("--images", type=int, default=24, help="images in the synthetic dataset")
    p.add_argument("--bucket-steps", type=int, default=24)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per bucket")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default="resume,buckets")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every run")
    p.add_argument("--out", default="runs/bench_pipeline")
    return p.parse_args(argv)


def base_overrides(a, data: Path, cache: Path) -> dict[str, str]:
    """The runs' config on top of configs/flux1-dev.yaml: the fast path, every step logged."""
    cuda = a.device.startswith("cuda")
    o = {"model": a.model, "data": str(data), "cache_dir": str(cache), "resolution": str(a.res),
         "steps": str(a.steps), "gradient_accumulation": "1", "gradient_checkpointing": "false",
         "compile": "true" if cuda else "false", "log_every": "1", "checkpoint_every": str(max(1, a.steps // 4)),
         "validation_every": str(max(1, a.steps // 2)), "validation_size": "2", "num_workers": "2",
         "progress": "false", "device": a.device, "lr_warmup_steps": "0"}
    if not cuda:
        o.update(max_sequence_length="32", rank="4", mixed_precision="no")
    for kv in a.overrides:
        k, v = kv.split("=", 1)
        o[k] = v
    return o


def train(out: Path, overrides: dict, *, resume: bool = False, stop_after: int | None = None) -> dict:
    """One `fluxlab train` process; with `stop_after`, SIGTERM once that step is in metrics.jsonl."""
    cmd = [sys.executable, "-m", "fluxlab", "train", str(ROOT / "configs" / "flux1-dev.yaml")]
    for k, v in {**overrides, "output_dir": str(out)}.items():
        cmd += ["--set", f"{k}={v}"]
    if resume:
        cmd += ["--resume", "latest"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    log = open(out.parent / f"{out.name}{'_resumed' if resume else ''}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    signalled_at = None
    while proc.poll() is None:
        # Signalled once the step before is logged, the run is inside step `stop_after` (every step
        # syncs to log): it finishes that one, checkpoints it and exits. The step it stops at is
        # read from its summary, never assumed.
        if stop_after is not None and signalled_at is None and last_step(out) >= stop_after - 1:
            os.killpg(proc.pid, signal.SIGTERM)
            signalled_at = last_step(out)
        time.sleep(0.05)
    log.close()
    summary = out / "train_summary.json"
    return {"rc": proc.returncode, "wall_s": time.time() - t0, "signalled_after_step": signalled_at,
            "summary": json.loads(summary.read_text()) if summary.exists() else None,
            "rows": rows(out), "log_tail": (out.parent / log.name).read_text()[-2000:]}


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def last_step(out: Path) -> int:
    r = rows(out)
    return r[-1]["step"] if r else 0


def step_intervals(rows: list[dict]) -> list[float]:
    """Whole step times from one process's rows (log_every=1): differences of `logged_s`."""
    return [b["logged_s"] - a["logged_s"] for a, b in zip(rows, rows[1:])
            if b["step"] == a["step"] + 1 and b["logged_s"] > a["logged_s"]]


def part_resume(a, work: Path, record) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from fluxlab.data import make_shapes_dataset

    data = make_shapes_dataset(work / "data", n=a.images, seed=0, size=a.res)
    o = base_overrides(a, data, work / "cache")
    A = train(work / "A", o)                                      # alone: the cold set-up is timed clean
    with ThreadPoolExecutor(2) as pool:                           # the noise reference beside B (own caches)
        b_run = pool.submit(train, work / "B", o, stop_after=a.interrupt_at)
        a2_run = pool.submit(train, work / "A2", {**o, "cache_dir": str(work / "cache2")})
        B, A2 = b_run.result(), a2_run.result()
    C = train(work / "B", o, resume=True)                         # alone: warm set-up and data wait timed clean
    for name, r in (("A", A), ("A2", A2), ("C", C)):
        if r["rc"] != 0:
            raise SystemExit(f"run {name} failed (rc {r['rc']}):\n{r['log_tail']}")
    if B["rc"] != 128 + signal.SIGTERM:
        raise SystemExit(f"run B was not interrupted by SIGTERM (rc {B['rc']}):\n{B['log_tail']}")
    loss = {name: {r["step"]: r["loss"] for r in run["rows"]} for name, run in (("A", A), ("A2", A2), ("BC", C))}
    stopped = B["summary"]["steps_done"]
    resumed_from = C["summary"]["start_step"]
    n = a.steps

    def diffs(x, y, steps):
        return [abs(loss[x][s] - loss[y][s]) for s in steps]

    before, after = diffs("A", "BC", range(1, stopped + 1)), diffs("A", "BC", range(stopped + 1, n + 1))
    noise = diffs("A", "A2", range(stopped + 1, n + 1))
    deterministic = max(diffs("A", "A2", range(1, n + 1))) == 0.0
    # Bitwise when two uninterrupted runs agree bitwise; otherwise no further from A than A2 is.
    ok_curve = max(after) == 0.0 if deterministic else statistics.mean(after) <= 1.5 * statistics.mean(noise)
    steps_ok = (resumed_from == stopped and sorted(loss["BC"]) == list(range(1, n + 1))
                and C["summary"]["steps_done"] == n)
    metrics = {
        "steps": n, "interrupt_requested_at": a.interrupt_at, "signalled_after_step": B["signalled_after_step"],
        "stopped_at": stopped, "resumed_from": resumed_from, "rc": {"A": A["rc"], "B": B["rc"], "C": C["rc"]},
        "deterministic": deterministic, "max_abs_diff_before": max(before), "max_abs_diff_after": max(after),
        "mean_abs_diff_after": statistics.mean(after), "noise_mean_abs_diff_after": statistics.mean(noise),
        "noise_max_abs_diff_after": max(noise),
        "losses_uninterrupted": [loss["A"][s] for s in sorted(loss["A"])],
        "losses_resumed": [loss["BC"][s] for s in sorted(loss["BC"])],
        "losses_second_run": [loss["A2"][s] for s in sorted(loss["A2"])]}
    record("pipeline/resume", verdict="pass" if (ok_curve and steps_ok) else "fail", metrics=metrics)
    sa, sc = A["summary"], C["summary"]
    own = [r for r in C["rows"] if r["step"] > stopped]           # C's own steps (warm caches, alone)
    step_s, wait_s = step_intervals(own), [r["data_wait_s"] for r in own]
    train_metrics = {
        "steps": n, "wall_s": A["wall_s"], "train_wall_s": sa["wall_s"],
        "setup_cold_s": sa["setup_s"], "setup_warm_s": sc["setup_s"],
        "cache_stats_cold": sa["cache_stats"], "cache_stats_warm": sc["cache_stats"],
        "memory": sa["memory"], "memory_warm": sc["memory"], "compile": sa["compile"],
        "step_ms": statistics.median(step_s) * 1e3, "data_wait_ms": statistics.median(wait_s) * 1e3,
        "data_overhead_fraction": statistics.median(wait_s) / statistics.median(step_s),
        "loss_first": A["rows"][0]["loss"], "loss_last": A["rows"][-1]["loss"], "val_losses": sa["val_losses"]}
    record("pipeline/train", samples={"data_wait_s": wait_s, "step_s": step_s}, metrics=train_metrics)
    return {"resume": metrics, "train": train_metrics}


def part_buckets(a, work: Path, record) -> dict:
    import torch

    from fluxlab import bench
    from fluxlab.config import load_config
    from fluxlab.data import make_shapes_dataset
    from fluxlab.training import observe
    from fluxlab.trainer import Trainer

    data = make_shapes_dataset(work / "buckets", n=a.images, seed=1, size=a.res, aspect_every=3)
    o = {**base_overrides(a, data, work / "cache"), "steps": str(a.bucket_steps + 2 + a.repeats),
         "validation_every": "0", "checkpoint_every": "0", "output_dir": str(work / "D")}
    t = Trainer(load_config(ROOT / "configs" / "flux1-dev.yaml", o), new_run=True)
    try:
        t.setup()
        t.cfg.steps = a.bucket_steps
        res = t.train()                                              # one run over the mixed buckets
        graphs = res.compile
        # Then one step per bucket, timed and interleaved: each call must hit its bucket's position
        # ids and compile nothing new.
        by_bucket: dict[str, dict] = {}
        for item in t.data.batches.loader.dataset.items:
            mb = {k: v[None] if isinstance(v, torch.Tensor) else [v] for k, v in item.items()}
            by_bucket.setdefault(t.bucket_of(mb), mb)
        sf = t.vae_scale_factor

        def step_on(mb):
            return lambda: t.step([mb])["loss"]

        def counters(bucket):
            h, w = (int(x) // sf for x in bucket.split("x"))
            return lambda: {"position.hits": t.positions.by_size.get((h, w), {}).get("hits", 0),
                            "compile.graphs": observe.compile_counts()["unique_graphs"]}

        variants = {b: step_on(mb) for b, mb in sorted(by_bucket.items())}
        expect = {b: bench.Expect(counters={"position.hits": 1}, still=("compile.graphs",), read=counters(b))
                  for b in variants}
        cuda = t.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(t.device)
        m = bench.run(variants, repeats=a.repeats, warmup=1, device=t.device, clock="events" if cuda else "wall",
                      expect=expect)
        final = {f"{h * sf}x{w * sf}": dict(n) for (h, w), n in t.positions.by_size.items()}
    finally:
        t.close()
    pos = res.cache_stats["position_by_bucket"]
    summary = {"buckets": sorted(variants), "steps": a.bucket_steps, "compile": graphs,
               "graphs_per_bucket": graphs["unique_graphs"] / max(1, len(variants)),
               "position_by_bucket": {b: {**n, "hit_rate": n["hits"] / max(1, n["hits"] + n["misses"])}
                                      for b, n in pos.items()},
               "steps_per_bucket": {b: sum(r["bucket"] == b for r in rows(work / "D")) for b in variants},
               "median_ms": {b: statistics.median(s) for b, s in m.samples.items()},
               "peak_gib": torch.cuda.max_memory_allocated(t.device) / 2**30 if cuda else None,
               "evidence": {b: e.to_dict() for b, e in m.evidence.items()}}
    record("pipeline/buckets", metrics=summary)
    for b, s in m.samples.items():
        record(f"pipeline/buckets/{b}", samples={"candidate": s},
               metrics={"median_ms": statistics.median(s), "evidence": m.evidence[b].to_dict(),
                        "timing": {"clock": m.clock}, "position_after_timing": final.get(b)})
    return summary


def main(argv=None) -> int:
    a = parse_args(argv)
    parts = a.parts.split(",")
    if not set(parts) <= {"resume", "buckets"} or not 1 <= a.interrupt_at < a.steps:
        raise SystemExit(f"--parts takes resume,buckets and --interrupt-at must lie in [1, --steps) "
                         f"(got {a.parts!r}, {a.interrupt_at}, {a.steps})")
    from fluxlab import store

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fluxlab-pipeline-", dir=out))
    written: list[dict] = []
    params = {"model": a.model, "res": a.res, "steps": a.steps, "interrupt_at": a.interrupt_at, "images": a.images,
              "bucket_steps": a.bucket_steps, "overrides": a.overrides}

    def record(name, **fields):
        written.append(store.record(name, params=params, device=a.device, store=work / "bench.db", display=False,
                                    **fields))
        with open(out / "records.jsonl", "a") as f:
            f.write(json.dumps(written[-1]) + "\n")

    report = {}
    try:
        if "resume" in parts:
            report["resume"] = part_resume(a, work, record)
        if "buckets" in parts:
            report["buckets"] = part_buckets(a, work, record)
    finally:
        for run in ("A", "B", "A2", "D"):
            for log in (work / f"{run}.log", work / f"{run}_resumed.log"):
                if log.exists():
                    shutil.copy(log, out / log.name)
    for rec in written:
        print(f"{rec['benchmark']:32s} {rec['verdict'] or '':8s} "
              + json.dumps({k: v for k, v in rec["metrics"].items() if not isinstance(v, (list, dict))})[:400])
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
