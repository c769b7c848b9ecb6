"""Every validation target at real FLUX shapes, in one process, through the claim engine.

    python -m benchmarks.validate --preset full --out DIR [--targets rope,attention] [--repeats 50]

The batch twin of `notebooks/validation_session.ipynb` (for machines without Jupyter): for each
target and shape it checks correctness against the float64 reference, times baseline and
candidate interleaved with the candidate's evidence checked in that loop, and writes one record
`validation/<target>` per shape to DIR/records.jsonl (the store's export format).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fluxlab import store, targets

# FLUX.1-dev at 1024^2: 4096 image + 512 text tokens, 24 heads of 128, width 3072.
FULL = {
    "rope": [(1, 4608, 24, 128), (1, 4096 + 1, 24, 128)],
    "qk_norm_rope": [(1, 4608, 24, 128)],
    "adaln": [(1, 4608, 3072), (1, 4096, 3072)],
    "adaln.gated": [(1, 4608, 3072)],
    "sparse_delta": [(3072, 3072, 94_372)],          # ~1% of a 3072x3072 projection
    "attention": [(1, 4608, 24, 128), (1, 1280, 24, 128)],
    "position_ids": [(128, 128, 512)],
    "text_embeddings": [(512,)],
    "latents": [(256, 256)],                        # the tiny VAE: real-scale encodes are the caches benchmark's
    "compile": [(1, 4096, 512)],
}
CLAIMS = {"rope": 1.3}  # the claim the first GPU session made for the fused RoPE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["full", "ci"], default="full")
    ap.add_argument("--targets", default=",".join(FULL))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    dev = targets.resolve_device(a.device)
    dt = targets.resolve_dtype(a.dtype, dev)
    a.out.mkdir(parents=True, exist_ok=True)
    db = a.out / "validate.db"
    for name in a.targets.split(","):
        T = targets.get(name)
        ok, why = T.available(dev)
        if not ok:
            print(f"[{name}] skipped: {why}", flush=True)
            continue
        for shape in FULL[name] if a.preset == "full" else T.default_shapes:
            t0 = time.perf_counter()
            check = T.check(shape, dev, dt)
            args = T.inputs(shape, dev, dt)
            m, c = T.measure(args, repeats=a.repeats, warmup=a.warmup, device=dev, claimed=CLAIMS.get(name))
            fields = c.record_fields()
            store.record(f"validation/{T.name}", samples=m.samples, store=db, display=False, device=dev,
                         params={"target": T.name, "shape": list(shape), "dtype": str(dt).replace("torch.", ""),
                                 "baseline": next(iter(T.baselines)), "repeats": a.repeats, "preset": a.preset,
                                 **({"disabled": os.environ["FLUXLAB_DISABLE"]} if os.environ.get("FLUXLAB_DISABLE") else {})},
                         notebook="benchmarks.validate",
                         **{**fields, "metrics": {**fields["metrics"], "correctness": check, "timing": m.to_dict()}})
            print(f"[{name}] {list(shape)} correct={check['ok']} ({check['max_abs_err']:.2e} <= {check['bound']:.2e})"
                  f"  {c.verdict} ratio {c.ratio:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}]  clock {m.clock} "
                  f"{m.calls_per_sample}  evidence: {m.evidence['candidate'].reason[:100]}  "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
            del args
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    (a.out / "records.jsonl").write_text(store.export_records("json", store=db))
    return 0


if __name__ == "__main__":
    sys.exit(main())
