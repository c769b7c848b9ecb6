"""DDP weak scaling of fluxlab's training step: N GPUs against one, in one call (GPU only).

    python -m benchmarks.ddp --preset flux1-dev --res 1024 --gpus 2 --out DIR

The single-GPU step runs in one process, then the same step under `torchrun --nproc_per_node=N`,
each rank with its own batch of 1 (weak scaling: the work per GPU stays fixed). Scaling is
N x (single-GPU step time / N-GPU step time); 2.0 would be perfect on two GPUs. The step is
Trainer.step in its eager cuDNN configuration (fluxlab_eager): compile would add a minute of
warm-up per process without changing what DDP adds (one all-reduce of the LoRA gradients).

Each process times its steps with `fluxlab.bench.run` (CUDA events) and checks in the same loop
that the eager cuDNN path ran (benchmarks.train.variant_expect) and, under DDP, that the
gradients were all-reduced (DDP's forward label and NCCL's all-reduce seen by the profiler).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Profiler names that show DDP ran: its forward's record_function label, and the gradient
# all-reduce (ProcessGroupNCCL's label, or NCCL's kernel, e.g. ncclDevKernel_AllReduce_Sum_f32_RING_LL).
DDP_PATTERNS = (r"DistributedDataParallel\.forward", r"nccl:all_reduce|nccl\w*AllReduce\w*(\(.*\))?")


def worker(a) -> None:
    import torch
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from benchmarks.train import train_config, variant_expect
    from fluxlab import bench
    from fluxlab.trainer import Trainer

    tr = Trainer(train_config("fluxlab_eager", a)).setup(with_data=False)
    mb = tr.random_batch(a.batch, a.res, 512)
    world = int(os.environ.get("WORLD_SIZE", 1))
    expect = variant_expect("fluxlab_eager", compiled=False,
                            n_attention=sum(isinstance(m, FluxAttention) for m in tr.transformer.modules()))
    if world > 1:
        expect = dataclasses.replace(expect, kernels=(*expect.kernels, *DDP_PATTERNS))
    # Every rank runs the same loop (same number of steps, profiled one included): collectives match.
    m = bench.run({"step": lambda: tr.step([mb])["loss"]}, repeats=a.steps, warmup=a.warmup, device=tr.device,
                  clock="events", expect={"step": expect}, profile_iters=1)
    timing = {"clock": m.clock, "calls_per_sample": m.calls_per_sample}
    if int(os.environ.get("RANK", 0)) == 0:
        # The parent never touches CUDA, so the device facts for provenance come from here.
        print("RESULT " + json.dumps({"world": world, "samples_ms": m.samples["step"],
                                      "evidence": m.evidence["step"].to_dict(), "timing": timing,
                                      "device": {"device": "cuda", "device_name": torch.cuda.get_device_name(),
                                                 "cuda": torch.version.cuda}}), flush=True)


def _run(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    res = next((json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res is None:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed (rc {p.returncode}): {p.stderr[-1500:]}")
    return res


def write_record(single: dict, multi: dict, gpus: int, params: dict, db) -> dict:
    """The weak-scaling record: ratio = 1-GPU step / N-GPU step, judged with the N-GPU run's evidence."""
    from fluxlab import bench, store

    evidence = bench.Evidence(**multi["evidence"]) if multi.get("evidence") else None
    c = bench.compare(single["samples_ms"], multi["samples_ms"], evidence=evidence)
    fields = c.record_fields()
    fields["metrics"] = {**fields["metrics"], "scaling": gpus * c.ratio, "scaling_ci": [gpus * c.ci_low, gpus * c.ci_high],
                         "single_median_ms": statistics.median(single["samples_ms"]),
                         "ddp_median_ms": statistics.median(multi["samples_ms"]),
                         "baseline_evidence": single.get("evidence"), "timing": multi.get("timing")}
    dev = multi["device"]
    return store.record(f"ddp_weak_scaling/{gpus}gpu", **fields, params=params, device=dev.get("device"),
                        samples={"baseline": single["samples_ms"], "candidate": multi["samples_ms"]},
                        store=db, display=False,
                        provenance_overrides={k: dev[k] for k in ("device_name", "cuda") if k in dev})


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
    if a.steps < 2 or a.gpus < 2:
        raise SystemExit(f"--steps must be >= 2 and --gpus >= 2 (got {a.steps}, {a.gpus})")
    from fluxlab import store

    opts = [f"--{k}={getattr(a, k)}" for k in ("preset", "res", "batch", "rank", "steps", "warmup")]
    single = _run([sys.executable, "-m", "benchmarks.ddp", "--worker", *opts])
    multi = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.gpus}",
                  "-m", "benchmarks.ddp", "--worker", *opts])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"preset": a.preset, "res": a.res, "batch_per_gpu": a.batch, "rank": a.rank, "gpus": a.gpus,
              "step": "fluxlab_eager"}
    rec = write_record(single, multi, a.gpus, params, out / "bench.db")
    (out / "records.jsonl").write_text(store.export_records("json", store=out / "bench.db"))
    m = rec["metrics"]
    print(f"1 GPU {m['single_median_ms']:.1f} ms/step, {a.gpus} GPUs {m['ddp_median_ms']:.1f} ms/step: "
          f"weak scaling {m['scaling']:.3f}x (95% CI {m['scaling_ci'][0]:.3f}-{m['scaling_ci'][1]:.3f}), "
          f"{rec['verdict']}; evidence: {(m.get('evidence') or {}).get('reason', 'none')[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
