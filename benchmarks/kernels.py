"""Time the fluxlab kernels at FLUX shapes against eager PyTorch and torch.compile of the same reference.

    python -m benchmarks.kernels --out DIR [--sizes 1024 512] [--families rope adaln ...] [--rounds 3]

GPU only. For each (family, shape, pass in {fwd, fwd+bwd}, impl in {eager, compiled, fluxlab}) one
JSON line goes to DIR/kernels.jsonl with: benchmark, device, params, median_us, samples (raw, µs),
bytes, tb_per_s, frac_of_copy_bw, ratio_vs_compiled (compiled median / this median), evidence
(fluxlab counters before/after and the CUDA kernel names the profiler saw). The device's
copy bandwidth is measured in the same run. Timing: triton.testing.do_bench (it flushes L2 before
every call), inputs rotated over several sets, impls interleaved over `--rounds` rounds.
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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from fluxlab import kernels  # noqa: E402
from fluxlab.kernels import adaln, qk_norm_rope, rope, sparse_delta  # noqa: E402

DT = torch.bfloat16
DEVICE = "cuda"
H, D, C_MODEL, S_TXT = 24, 128, 3072, 512  # FLUX.1: 24 heads x 128, hidden 3072, 512 T5 tokens
ROTATE_BYTES = 512 << 20  # keep at least this much distinct input in rotation (H100/H200 L2 is 50-60 MB)
TRITON_NAMES = ("_fl_",)  # every fluxlab Triton kernel is named _fl_<family>_...


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def tables(S: int):
    """cos/sin [S, D] the way FluxPosEmbed builds them (fp32), for FLUX's (16, 56, 56) axes."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    ids = torch.randint(0, 64, (S, 3), device=DEVICE).float()
    return FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)


# --- cases: each builds inputs and names which are differentiable, plus minimal byte counts ----------
def case_rope(side: int):
    S = (side // 16) ** 2 + S_TXT
    cos, sin = tables(S)

    def make():
        return dict(x=torch.randn(1, S, H, D, device=DEVICE, dtype=DT, requires_grad=True), cos=cos, sin=sin)
    x = make()["x"]
    fwd = 2 * nbytes(x) + nbytes(cos, sin)  # read x, write y, read tables
    return dict(name="rope", params=dict(side=side, B=1, S=S, H=H, D=D), make=make, grad=("x",),
                fast=rope.apply_rope, ref=rope.reference, bytes={"fwd": fwd, "fwd+bwd": 2 * fwd})


def case_qk_norm_rope(side: int):
    S_img = (side // 16) ** 2
    cos, sin = tables(S_img + S_TXT)

    def make():
        t = lambda S: torch.randn(1, S, H, D, device=DEVICE, dtype=DT, requires_grad=True)  # noqa: E731
        w = lambda: (1 + 0.1 * torch.randn(D, device=DEVICE, dtype=DT)).requires_grad_()  # noqa: E731
        return dict(q=t(S_img), k=t(S_img), q_weight=w(), k_weight=w(), cos=cos, sin=sin, eps=1e-6,
                    context=(t(S_TXT), t(S_TXT), w(), w()))
    ins = make()
    qk = nbytes(ins["q"], ins["k"], *ins["context"][:2])
    fwd = 2 * qk + nbytes(cos, sin)  # read q, k (both streams); write joint q, k
    bwd = 3 * qk + nbytes(cos, sin)  # read x and dy; write dx
    return dict(name="qk_norm_rope", params=dict(side=side, B=1, S_img=S_img, S_txt=S_TXT, H=H, D=D), make=make,
                grad=("q", "k", "q_weight", "k_weight", "context"), fast=qk_norm_rope.qk_norm_rope,
                ref=qk_norm_rope.reference, bytes={"fwd": fwd, "fwd+bwd": fwd + bwd})


def case_adaln(side: int, gated: bool):
    S = (side // 16) ** 2 + S_TXT  # single blocks run over the joint sequence

    def make():
        t = lambda *s: torch.randn(*s, device=DEVICE, dtype=DT, requires_grad=True)  # noqa: E731
        d = dict(x=t(1, S, C_MODEL), scale=t(1, C_MODEL), shift=t(1, C_MODEL), eps=1e-6)
        if gated:
            d.update(residual=t(1, S, C_MODEL), gate=t(1, C_MODEL))
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
    return dict(name="adaln.gated" if gated else "adaln", params=dict(side=side, B=1, S=S, C=C_MODEL), make=make,
                grad=grad, fast=fast, ref=ref, bytes={"fwd": fwd, "fwd+bwd": fwd + bwd})


def case_sparse_delta(density: float = 0.01):
    out_f, in_f = 4 * C_MODEL, C_MODEL  # the single blocks' proj_mlp weight, [12288, 3072]
    index = sparse_delta.choose_indices(out_f * in_f, density, seed=0).to(DEVICE)

    def make():
        return dict(weight=torch.randn(out_f, in_f, device=DEVICE, dtype=DT),
                    theta=torch.randn(index.numel(), device=DEVICE, requires_grad=True), index=index)  # never zeros: they hide unwritten outputs
    ins = make()
    fwd = 2 * nbytes(ins["weight"]) + nbytes(ins["theta"], index)  # copy W, add θ at the indices
    bwd = nbytes(index, ins["theta"]) + index.numel() * 2  # gather K bf16 values, write dθ
    return dict(name="sparse_delta", params=dict(out=out_f, in_=in_f, density=density, K=index.numel()),
                make=make, grad=("theta",), fast=sparse_delta.sparse_delta, ref=sparse_delta.reference,
                bytes={"fwd": fwd, "fwd+bwd": fwd + bwd})


# --- timing -------------------------------------------------------------------------------------
def flat_grad_inputs(ins: dict, names) -> list[torch.Tensor]:
    out = []
    for n in names:
        v = ins[n]
        out += [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor) and t.requires_grad]
    return out


def runner(fn, sets: list[dict], grad_names, backward: bool):
    """A no-argument callable that runs fn on the next input set (rotating), plus backward if asked."""
    state = {"i": 0}
    upstream = []
    if backward:
        for ins in sets:
            outs = fn(**ins)
            outs = outs if isinstance(outs, tuple) else (outs,)
            upstream.append([torch.randn_like(o) for o in outs])

    def call():
        i = state["i"] = (state["i"] + 1) % len(sets)
        ins = sets[i]
        if not backward:
            with torch.no_grad():
                return fn(**ins)
        outs = fn(**ins)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, flat_grad_inputs(ins, grad_names), upstream[i])
    return call


def bench_samples(call, reps_ms: int) -> list[float]:
    try:
        times = do_bench(call, warmup=25, rep=reps_ms, return_mode="all")
    except TypeError:  # older triton without return_mode="all"
        times = [do_bench(call, warmup=25, rep=reps_ms) for _ in range(5)]
    return [t * 1e3 for t in times]  # ms -> µs


def copy_bandwidth() -> float:
    """Device-to-device copy rate in TB/s (1 GiB read + 1 GiB written per call)."""
    src = torch.empty(1 << 29, device=DEVICE, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = statistics.median(bench_samples(lambda: dst.copy_(src), 200)) / 1e3
    return 2 * nbytes(src) / (ms * 1e-3) / 1e12


def profiler_kernel_names(call) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA")})


def _upcast(v):
    if isinstance(v, torch.Tensor):
        return v.detach().double() if v.is_floating_point() else v
    return tuple(_upcast(t) for t in v) if isinstance(v, tuple) else v


def check(case) -> dict:
    """Forward error of fluxlab and of eager bf16 against the reference run in float64, fresh inputs.

    Passes when fluxlab's error is no worse than 2x eager bf16's own error (DESIGN's bf16 rule).
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


def run_case(case, copy_tbps: float, rounds: int, reps_ms: int, device: str, meta: dict) -> list[dict]:
    correctness = check(case)
    per_set = sum(nbytes(*(v if isinstance(v, tuple) else (v,))) for v in case["make"]().values()
                  if isinstance(v, (torch.Tensor, tuple)))
    sets = [case["make"]() for _ in range(max(2, min(16, triton.cdiv(ROTATE_BYTES, max(per_set, 1)))))]
    compiled = torch.compile(case["ref"], dynamic=False)
    impls = {"eager": case["ref"], "compiled": compiled, "fluxlab": case["fast"]}
    records = []
    for pass_ in ("fwd", "fwd+bwd"):
        calls = {k: runner(fn, sets, case["grad"], pass_ == "fwd+bwd") for k, fn in impls.items()}
        for c in calls.values():  # warm up / compile outside the timed region
            c()
        torch.cuda.synchronize()
        samples = {k: [] for k in calls}
        evidence = {}
        before = kernels.counters()
        for _ in range(rounds):  # interleave impls round by round
            for k, c in calls.items():
                samples[k] += bench_samples(c, reps_ms)
        after = kernels.counters()
        names = profiler_kernel_names(calls["fluxlab"])
        evidence = dict(counters_before=before, counters_after=after, fallbacks=kernels.fallbacks(),
                        profiler_kernels=names, triton_kernel_seen=any(t in n for n in names for t in TRITON_NAMES))
        med = {k: statistics.median(v) for k, v in samples.items()}
        for k, v in samples.items():
            tbps = case["bytes"][pass_] / (med[k] * 1e-6) / 1e12
            records.append(dict(
                benchmark=f"kernels.{case['name']}.{pass_}.{k}", family=case["name"], impl=k, **{"pass": pass_},
                device=device, params=case["params"], dtype=str(DT), median_us=med[k], samples=v,
                bytes=case["bytes"][pass_], tb_per_s=tbps, copy_tb_per_s=copy_tbps, frac_of_copy_bw=tbps / copy_tbps,
                ratio_vs_compiled=med["compiled"] / med[k], evidence=evidence if k == "fluxlab" else None,
                correctness=correctness, **meta))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory for kernels.jsonl")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 512], help="image side in pixels")
    ap.add_argument("--families", nargs="+", default=["rope", "qk_norm_rope", "adaln", "adaln.gated", "sparse_delta"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per impl")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench time budget per round (ms)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import diffusers
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    meta = dict(torch=torch.__version__, triton=triton.__version__, diffusers=diffusers.__version__,
                utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    copy_tbps = copy_bandwidth()
    print(f"{device}: measured copy bandwidth {copy_tbps:.2f} TB/s")
    builders = {"rope": case_rope, "qk_norm_rope": case_qk_norm_rope,
                "adaln": lambda s: case_adaln(s, False), "adaln.gated": lambda s: case_adaln(s, True)}
    cases = [builders[f](s) for f in args.families if f in builders for s in args.sizes]
    if "sparse_delta" in args.families:
        cases.append(case_sparse_delta())
    records = []
    with open(args.out / "kernels.jsonl", "a") as fh:
        for case in cases:
            kernels.reset_counters()
            for r in run_case(case, copy_tbps, args.rounds, args.rep_ms, device, meta):
                fh.write(json.dumps(r) + "\n")
                records.append(r)
    print(f"{'benchmark':<42} {'params':<34} {'median_us':>10} {'TB/s':>6} {'%copy':>6} {'x_compiled':>10} evidence")
    for r in records:
        p = ",".join(f"{k}={v}" for k, v in r["params"].items())[:34]
        ev = r["evidence"]
        ev_s = "" if ev is None else ("ran" if ev["triton_kernel_seen"] and ev["counters_after"] != ev["counters_before"]
                                      else f"NOT RUN {ev['fallbacks']}")
        print(f"{r['benchmark']:<42} {p:<34} {r['median_us']:>10.1f} {r['tb_per_s']:>6.2f} "
              f"{100 * r['frac_of_copy_bw']:>5.1f}% {r['ratio_vs_compiled']:>10.2f} {ev_s}")
    _export(records, args.out)
    print(f"wrote {len(records)} raw records to {args.out / 'kernels.jsonl'} and store records to records.jsonl")
    return 0


def _export(records: list[dict], out: Path) -> None:
    """One store record per (family, shape, pass, impl): ratio = compiled / impl, judged by bench.compare."""
    from fluxlab import bench, store

    db = out / "bench.db"
    by_key = {(r["family"], json.dumps(r["params"], sort_keys=True), r["pass"]): {} for r in records}
    for r in records:
        by_key[(r["family"], json.dumps(r["params"], sort_keys=True), r["pass"])][r["impl"]] = r
    for group in by_key.values():
        base = group["compiled"]["samples"]
        for impl, r in group.items():
            ev = r["evidence"]
            evidence = None
            if ev is not None:
                evidence = bench.Evidence(ran=bool(ev["triton_kernel_seen"] and ev["counters_after"] != ev["counters_before"]),
                                          counters=ev["counters_after"], fallbacks=ev["fallbacks"],
                                          kernel_names=ev["profiler_kernels"], reason="")
            c = bench.compare(base, r["samples"], evidence=evidence) if impl != "compiled" else None
            metrics = {k: r[k] for k in ("median_us", "bytes", "tb_per_s", "copy_tb_per_s", "frac_of_copy_bw",
                                         "ratio_vs_compiled", "correctness", "evidence", "dtype")}
            store.record(r["benchmark"], verdict=c and c.verdict, ratio=c and c.ratio, ci_low=c and c.ci_low,
                         ci_high=c and c.ci_high, samples={"candidate": r["samples"], "baseline": base},
                         params={**r["params"], "pass": r["pass"], "impl": impl}, metrics=metrics,
                         store=db, display=False)
    (out / "records.jsonl").write_text(store.export_records("json", store=db))


if __name__ == "__main__":
    sys.exit(main())
