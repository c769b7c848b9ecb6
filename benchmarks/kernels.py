"""Time the fluxlab kernels at FLUX shapes against eager PyTorch and torch.compile of the same reference.

    python -m benchmarks.kernels --out DIR [--sizes 1024 512] [--families rope adaln ...] [--repeats 100]

GPU (a CPU run under TRITON_INTERPRET=1 works for tiny shapes, but says nothing about speed). For
each (family, shape, pass in {fwd, fwd+bwd}, impl in {eager, compiled, fluxlab}) one JSON line goes
to DIR/kernels.jsonl with: benchmark, device, params, median_us, samples (raw, µs per call), bytes,
tb_per_s, frac_of_copy_bw, ratio_vs_compiled (compiled median / this median), timing (clock and
calls per sample), evidence (fluxlab only). The device's copy bandwidth is measured in the same run.

Timing: `fluxlab.bench.run` with the blocked clock (CUDA events around a block of calls lasting
at least --block-ms, divided by the calls, so a sample is not mostly launch overhead), L2 flushed
before every block, inputs rotated over sets larger than L2, the three impls interleaved sample by
sample. Evidence is checked in that same loop: the family under test must bump its counters on
every timed call (forward, and backward in fwd+bwd) and, on the GPU, its own `_fl_<family>_..._kernel`
must appear in a profiled call; another family's kernel does not count.
Bytes are the minimum each op must move (inputs read once, outputs written once), so tb_per_s is
an achieved rate against that floor; the goal is >= 0.85 of copy bandwidth and >= 1.2x compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from fluxlab import bench  # noqa: E402
from fluxlab.kernels import adaln, qk_norm_rope, rope, sparse_delta  # noqa: E402

ROTATE_BYTES = 512 << 20  # keep at least this much distinct input in rotation (H100/H200 L2 is 50-60 MB)
CASES = ("rope", "qk_norm_rope", "adaln", "adaln.gated", "sparse_delta")


@dataclass(frozen=True)
class Dims:
    """Shapes and placement of the cases. Defaults: FLUX.1 (24 heads x 128, hidden 3072, 512 T5
    tokens) in bf16 on the GPU; tests use tiny ones on the CPU."""

    H: int = 24
    D: int = 128
    C: int = 3072
    S_TXT: int = 512
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"


FLUX = Dims()


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def tables(S: int, dims: Dims):
    """cos/sin [S, D] the way FluxPosEmbed builds them (fp32), with FLUX's axes split of D: 16, 56, 56
    at D=128 (D a multiple of 32)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes = [dims.D // 8, dims.D * 7 // 16, dims.D * 7 // 16]
    ids = torch.randint(0, 64, (S, 3), device=dims.device).float()
    return FluxPosEmbed(theta=10000, axes_dim=axes)(ids)


# --- cases: each builds inputs and names which are differentiable, plus minimal byte counts ----------
def case_rope(side: int, dims: Dims = FLUX):
    S = (side // 16) ** 2 + dims.S_TXT
    cos, sin = tables(S, dims)

    def make():
        return dict(x=torch.randn(1, S, dims.H, dims.D, device=dims.device, dtype=dims.dtype, requires_grad=True),
                    cos=cos, sin=sin)
    x = make()["x"]
    fwd = 2 * nbytes(x) + nbytes(cos, sin)  # read x, write y, read tables
    return dict(name="rope", params=dict(side=side, B=1, S=S, H=dims.H, D=dims.D), make=make, grad=("x",),
                fast=rope.apply_rope, ref=rope.reference, bytes={"fwd": fwd, "fwd+bwd": 2 * fwd})


def case_qk_norm_rope(side: int, dims: Dims = FLUX):
    S_img = (side // 16) ** 2
    cos, sin = tables(S_img + dims.S_TXT, dims)

    def make():
        t = lambda S: torch.randn(1, S, dims.H, dims.D, device=dims.device, dtype=dims.dtype, requires_grad=True)  # noqa: E731
        w = lambda: (1 + 0.1 * torch.randn(dims.D, device=dims.device, dtype=dims.dtype)).requires_grad_()  # noqa: E731
        return dict(q=t(S_img), k=t(S_img), q_weight=w(), k_weight=w(), cos=cos, sin=sin, eps=1e-6,
                    context=(t(dims.S_TXT), t(dims.S_TXT), w(), w()))
    ins = make()
    qk = nbytes(ins["q"], ins["k"], *ins["context"][:2])
    fwd = 2 * qk + nbytes(cos, sin)  # read q, k (both streams); write joint q, k
    bwd = 3 * qk + nbytes(cos, sin)  # read x and dy; write dx
    return dict(name="qk_norm_rope", params=dict(side=side, B=1, S_img=S_img, S_txt=dims.S_TXT, H=dims.H, D=dims.D),
                make=make, grad=("q", "k", "q_weight", "k_weight", "context"), fast=qk_norm_rope.qk_norm_rope,
                ref=qk_norm_rope.reference, bytes={"fwd": fwd, "fwd+bwd": fwd + bwd})


def case_adaln(side: int, gated: bool, dims: Dims = FLUX):
    S = (side // 16) ** 2 + dims.S_TXT  # single blocks run over the joint sequence

    def make():
        t = lambda *s: torch.randn(*s, device=dims.device, dtype=dims.dtype, requires_grad=True)  # noqa: E731
        d = dict(x=t(1, S, dims.C), scale=t(1, dims.C), shift=t(1, dims.C), eps=1e-6)
        if gated:
            d.update(residual=t(1, S, dims.C), gate=t(1, dims.C))
        return d
    x = make()["x"]
    n = nbytes(x)
    # plain: read x, write y | bwd: read x, dy, write dx.  gated: read x, residual; write h, y |
    # bwd: read x, residual, dy, dh; write dx, d_residual
    fwd, bwd = (4 * n, 6 * n) if gated else (2 * n, 3 * n)
    grad = ("x", "scale", "shift") + (("residual", "gate") if gated else ())
    if gated:
        fast, ref = adaln.gated_residual_modulate, adaln.reference_gated
    else:
        fast, ref = adaln.modulate, adaln.reference
    return dict(name="adaln.gated" if gated else "adaln", params=dict(side=side, B=1, S=S, C=dims.C), make=make,
                grad=grad, fast=fast, ref=ref, bytes={"fwd": fwd, "fwd+bwd": fwd + bwd})


def case_sparse_delta(density: float = 0.01, dims: Dims = FLUX):
    out_f, in_f = 4 * dims.C, dims.C  # the single blocks' proj_mlp weight, [12288, 3072] in FLUX
    index = sparse_delta.choose_indices(out_f * in_f, density, seed=0).to(dims.device)

    def make():
        return dict(weight=torch.randn(out_f, in_f, device=dims.device, dtype=dims.dtype),
                    theta=torch.randn(index.numel(), device=dims.device, requires_grad=True),  # never zeros: they hide unwritten outputs
                    index=index)
    ins = make()
    fwd = 2 * nbytes(ins["weight"]) + nbytes(ins["theta"], index)  # copy W, add θ at the indices
    bwd = nbytes(index, ins["theta"]) + index.numel() * 2  # gather K bf16 values, write dθ
    return dict(name="sparse_delta", params=dict(out=out_f, in_=in_f, density=density, K=index.numel()),
                make=make, grad=("theta",), fast=sparse_delta.sparse_delta, ref=sparse_delta.reference,
                bytes={"fwd": fwd, "fwd+bwd": fwd + bwd})


def build_cases(families, sizes, dims: Dims = FLUX) -> list[dict]:
    builders = {"rope": case_rope, "qk_norm_rope": case_qk_norm_rope,
                "adaln": lambda s, d: case_adaln(s, False, d), "adaln.gated": lambda s, d: case_adaln(s, True, d)}
    cases = [builders[f](s, dims) for f in families if f in builders for s in sizes]
    if "sparse_delta" in families:
        cases.append(case_sparse_delta(dims=dims))
    return cases


# --- timing -------------------------------------------------------------------------------------
def flat_grad_inputs(ins: dict, names) -> list[torch.Tensor]:
    out = []
    for n in names:
        v = ins[n]
        out += [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor) and t.requires_grad]
    return out


def _outputs(fn, ins: dict) -> tuple:
    outs = fn(**ins)
    return outs if isinstance(outs, tuple) else (outs,)


def caller(fn, grad_names, backward: bool):
    """fn on one (inputs, upstream gradients) item: forward only, or forward + autograd.grad."""
    def call(item):
        ins, upstream = item
        if not backward:
            with torch.no_grad():
                return fn(**ins)
        return torch.autograd.grad(_outputs(fn, ins), flat_grad_inputs(ins, grad_names), upstream)
    return call


def family_expect(case, backward: bool, cuda: bool) -> "bench.Expect":
    """The family under test (not any fluxlab kernel) must run on every timed call: its counters
    move (forward, and backward too in fwd+bwd) and, on the GPU, its own kernel is profiled."""
    family = case["name"].split(".")[0]  # adaln.gated runs the adaln kernels
    ex = bench.Expect.families(family, profile=cuda)
    if backward:
        ex = replace(ex, counters={f"{family}.fwd": 1, f"{family}.bwd": 1})
    return ex


def _upcast(v):
    if isinstance(v, torch.Tensor):
        return v.detach().double() if v.is_floating_point() else v
    return tuple(_upcast(t) for t in v) if isinstance(v, tuple) else v


def check(case) -> dict:
    """Forward error of fluxlab and of eager bf16 against the reference run in float64, fresh inputs.

    Passes when fluxlab's error is no worse than 2x eager bf16's own error (the bf16 rule in
    docs/ARCHITECTURE.md, "Kernels").
    """
    ins = case["make"]()
    flat = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    with torch.no_grad():
        truth = flat(case["ref"](**{k: _upcast(v) for k, v in ins.items()}))
        fast = flat(case["fast"](**ins))
        eager = flat(case["ref"](**ins))
    err_fast = max(rel(a, b) for a, b in zip(fast, truth))
    err_eager = max(rel(a, b) for a, b in zip(eager, truth))
    return {"err_fluxlab_vs_fp64": err_fast, "err_eager_bf16_vs_fp64": err_eager,
            "within_2x_eager": bool(err_fast <= 2 * err_eager + 1e-12)}


def run_case(case, copy_tbps: float | None, repeats: int, block_ms: float, device: str, meta: dict,
             compile_backend: str = "inductor") -> list[dict]:
    correctness = check(case)
    per_set = sum(nbytes(*(v if isinstance(v, tuple) else (v,))) for v in case["make"]().values()
                  if isinstance(v, (torch.Tensor, tuple)))
    sets = [case["make"]() for _ in range(max(2, min(16, triton.cdiv(ROTATE_BYTES, max(per_set, 1)))))]
    compiled = torch.compile(case["ref"], dynamic=False, backend=compile_backend)
    impls = {"eager": case["ref"], "compiled": compiled, "fluxlab": case["fast"]}
    dtype = str(next(v for v in sets[0].values() if isinstance(v, torch.Tensor) and v.is_floating_point()).dtype)
    records = []
    for pass_ in ("fwd", "fwd+bwd"):
        backward = pass_ == "fwd+bwd"
        # The same upstream gradient per input set for every impl (only output shapes matter).
        items = [(ins, [torch.randn_like(o) for o in _outputs(case["ref"], ins)] if backward else None) for ins in sets]
        m = bench.run({k: caller(fn, case["grad"], backward) for k, fn in impls.items()}, inputs=items,
                      repeats=repeats, warmup=3, device=device, clock="blocked", flush_l2=True,
                      min_block_ms=block_ms, expect={"fluxlab": family_expect(case, backward, bench.is_cuda(device))})
        samples = {k: [t * 1e3 for t in v] for k, v in m.samples.items()}  # ms -> µs per call
        med = {k: statistics.median(v) for k, v in samples.items()}
        for k, v in samples.items():
            tbps = case["bytes"][pass_] / (med[k] * 1e-6) / 1e12
            records.append(dict(
                benchmark=f"kernels.{case['name']}.{pass_}.{k}", family=case["name"], impl=k, **{"pass": pass_},
                device=device, params=case["params"], dtype=dtype, median_us=med[k], samples=v,
                bytes=case["bytes"][pass_], tb_per_s=tbps, copy_tb_per_s=copy_tbps,
                frac_of_copy_bw=tbps / copy_tbps if copy_tbps else None, ratio_vs_compiled=med["compiled"] / med[k],
                timing={"clock": m.clock, "calls_per_sample": m.calls_per_sample[k]},
                evidence=m.evidence[k].to_dict() if k in m.evidence else None, correctness=correctness, **meta))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory for kernels.jsonl")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 512], help="image side in pixels")
    ap.add_argument("--families", nargs="+", default=list(CASES), help=f"any of {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=100, help="timed samples per impl (each a block of calls)")
    ap.add_argument("--block-ms", type=float, default=1.0, help="a sample times calls for at least this long (ms)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = [f for f in args.families if f not in CASES]
    if unknown or args.repeats < 2:
        print(f"benchmarks/kernels.py: unknown families {unknown} (choose from {CASES}) or --repeats < 2",
              file=sys.stderr)
        return 2
    import diffusers
    from fluxlab import kernels

    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    meta = dict(torch=torch.__version__, triton=triton.__version__, diffusers=diffusers.__version__,
                utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    copy_tbps = bench.measure_ceilings(FLUX.device)["tbps"]
    print(f"{device_name}: measured copy bandwidth {copy_tbps:.2f} TB/s")
    records = []
    with open(args.out / "kernels.jsonl", "a") as fh:
        for case in build_cases(args.families, args.sizes):
            kernels.reset_counters()
            for r in run_case(case, copy_tbps, args.repeats, args.block_ms, FLUX.device, meta):
                r["device"] = device_name
                fh.write(json.dumps(r) + "\n")
                records.append(r)
    print(f"{'benchmark':<42} {'params':<34} {'median_us':>10} {'TB/s':>6} {'%copy':>6} {'x_compiled':>10} evidence")
    for r in records:
        p = ",".join(f"{k}={v}" for k, v in r["params"].items())[:34]
        ev = r["evidence"]
        ev_s = "" if ev is None else ("ran" if ev["ran"] else f"NOT RUN: {ev['reason'][:120]}")
        print(f"{r['benchmark']:<42} {p:<34} {r['median_us']:>10.1f} {r['tb_per_s']:>6.2f} "
              f"{100 * r['frac_of_copy_bw']:>5.1f}% {r['ratio_vs_compiled']:>10.2f} {ev_s}")
    export(records, args.out)
    print(f"wrote {len(records)} raw records to {args.out / 'kernels.jsonl'} and store records to records.jsonl")
    return 0


def export(records: list[dict], out: Path) -> list[dict]:
    """One store record per (family, shape, pass, impl): ratio = compiled / impl, judged by
    bench.compare with the impl's evidence from the timed loop (eager has none: it has no fast path
    to prove, so a speed verdict for it reads unverified)."""
    from fluxlab import store

    db = out / "bench.db"
    by_key: dict = {}
    for r in records:
        by_key.setdefault((r["family"], json.dumps(r["params"], sort_keys=True), r["pass"]), {})[r["impl"]] = r
    written = []
    for group in by_key.values():
        base = group["compiled"]["samples"]
        for impl, r in group.items():
            metrics = {k: r[k] for k in ("median_us", "bytes", "tb_per_s", "copy_tb_per_s", "frac_of_copy_bw",
                                         "ratio_vs_compiled", "correctness", "evidence", "dtype", "timing")}
            fields = {"metrics": metrics}
            if impl != "compiled":
                evidence = bench.Evidence(**r["evidence"]) if r["evidence"] else None
                fields = bench.compare(base, r["samples"], evidence=evidence).record_fields()
                fields["metrics"] = {**metrics, **fields["metrics"]}
            written.append(store.record(r["benchmark"], **fields, samples={"candidate": r["samples"], "baseline": base},
                                        params={**r["params"], "pass": r["pass"], "impl": impl}, store=db,
                                        display=False))
    (out / "records.jsonl").write_text(store.export_records("json", store=db))
    return written


if __name__ == "__main__":
    sys.exit(main())
