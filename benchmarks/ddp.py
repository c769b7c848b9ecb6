"""DDP weak scaling of fluxlab's training step: N GPUs against one, in one call (GPU only).

    python -m benchmarks.ddp --preset flux1-dev --res 1024 --gpus 2 --out DIR

The single-GPU step runs in one process, then the same step under `torchrun --nproc_per_node=N`,
each rank with its own batch of 1 (weak scaling: the work per GPU stays fixed). Scaling is
N x (single-GPU step time / N-GPU step time); 2.0 would be perfect on two GPUs. The step is
Trainer.step in its eager cuDNN configuration (fluxlab_eager): compile would add a minute of
warm-up per process without changing what DDP adds (one all-reduce of the LoRA gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(a) -> None:
    import torch

    from benchmarks.train import train_config
    from fluxlab.trainer import Trainer

    tr = Trainer(train_config("fluxlab_eager", a)).setup(with_data=False)
    mb = tr.random_batch(a.batch, a.res, 512)
    times = []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = float(tr.step([mb])["loss"])   # float(): the step, all-reduce included, has finished
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    if int(os.environ.get("RANK", 0)) == 0:
        world = int(os.environ.get("WORLD_SIZE", 1))
        # The parent never touches CUDA, so the device facts for provenance come from here.
        print("RESULT " + json.dumps({"world": world, "samples_ms": times, "loss": loss,
                                      "device": {"device": "cuda", "device_name": torch.cuda.get_device_name(),
                                                 "cuda": torch.version.cuda}}), flush=True)


def _run(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    res = next((json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res is None:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed (rc {p.returncode}): {p.stderr[-1500:]}")
    return res


def main(argv=None) -> int:
    from benchmarks.train import add_step_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(ap)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_ddp")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    from fluxlab import bench, store

    opts = [f"--{k}={getattr(a, k)}" for k in ("preset", "res", "batch", "rank", "steps", "warmup")]
    single = _run([sys.executable, "-m", "benchmarks.ddp", "--worker", *opts])
    multi = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.gpus}",
                  "-m", "benchmarks.ddp", "--worker", *opts])
    c = bench.compare(single["samples_ms"], multi["samples_ms"])   # ratio: 1-GPU step / N-GPU step
    scaling = a.gpus * c.ratio
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "bench.db"
    store.record(f"ddp_weak_scaling/{a.gpus}gpu", verdict=c.verdict, ratio=c.ratio, ci_low=c.ci_low, ci_high=c.ci_high,
                 samples={"baseline": single["samples_ms"], "candidate": multi["samples_ms"]},
                 params={"preset": a.preset, "res": a.res, "batch_per_gpu": a.batch, "rank": a.rank, "gpus": a.gpus,
                         "step": "fluxlab_eager"},
                 metrics={"scaling": scaling, "scaling_ci": [a.gpus * c.ci_low, a.gpus * c.ci_high],
                          "single_median_ms": statistics.median(single["samples_ms"]),
                          "ddp_median_ms": statistics.median(multi["samples_ms"])}, store=db, display=False,
                 provenance_overrides=multi["device"])
    (out / "records.jsonl").write_text(store.export_records("json", store=db))
    print(f"1 GPU {statistics.median(single['samples_ms']):.1f} ms/step, {a.gpus} GPUs "
          f"{statistics.median(multi['samples_ms']):.1f} ms/step: weak scaling {scaling:.3f}x "
          f"(95% CI {a.gpus * c.ci_low:.3f}-{a.gpus * c.ci_high:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
