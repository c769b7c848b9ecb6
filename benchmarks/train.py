"""FLUX LoRA training step: stock diffusers + peft against fluxlab, side by side, one machine, one call.

    fluxlab bench train --preset flux1-dev --res 1024 --batch 1 --rank 16 [--variants a,b] --out DIR

Every variant runs in its own process (a CUDA fault kills only that variant) on identical inputs:
the j-th step a variant runs draws its latents, text embeddings, noise and timesteps from seed
1000 + j (the micro-batch, built on the CPU before timing; its copy to the GPU is part of the step,
as in training) and the trainer's step_generator(0, j), so the loss curves of all variants are
comparable step by step.

Timing is `fluxlab.bench.run` with CUDA events around each step. With one variant per process the
timer has nothing to interleave with: samples are consecutive steps of that variant, and variants
run one after another, so drift between processes is not cancelled out (the ratios' CIs cover
step-to-step noise only). Each variant declares what must be seen in its timed steps
(`variant_expect`): anchored profiler patterns for the SDPA backend it claims (flash for stock,
cuDNN for fluxlab, with the other forbidden), fluxlab.attention's per-call counters for eager
fluxlab variants, and the counters and `_fl_<family>_` kernels of every patched kernel family.
The parent judges each variant against the stock ones with `bench.compare(..., evidence=...)`:
a variant whose path was not seen reads `did-not-run`, whatever its time.

Per variant it also reports peak allocated memory over the timed steps, achieved TFLOP/s against
the bf16 GEMM ceiling measured in the same call, the first (compiling) steps' wall time, and an
attention / GEMM / other split from two profiled steps. Records go to `records.jsonl` in the
store's export format.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Stock: diffusers + peft exactly as a user would write it. name -> (SDPA backend, compile, checkpointing)
STOCK = {
    "stock_eager": ("flash", False, False),
    "stock_compile": ("flash", True, False),
    "stock_gc": ("flash", False, True),
    "stock_cudnn": ("cudnn", False, False),          # the known defect, kept as a control
}
# fluxlab: its own Trainer.step, configured through TrainConfig overrides.
FLUXLAB = {
    "fluxlab_eager": {"attention_backend": "cudnn"},
    "fluxlab_kernels": {"attention_backend": "cudnn", "use_kernels": True},
    "fluxlab_fast": {"attention_backend": "cudnn", "compile": True},
    "fluxlab_lean": {"attention_backend": "cudnn", "compile": True, "gradient_checkpointing": True},
    "fluxlab_qlora_nf4": {"attention_backend": "cudnn", "quantize": "nf4", "gradient_checkpointing": True},
    "fluxlab_fast_fused": {"attention_backend": "cudnn", "compile": True, "fuse_projections": True},
    "fluxlab_fast_cg": {"attention_backend": "cudnn", "compile": True, "compile_mode": "reduce-overhead"},
    "fluxlab_fast_autotune": {"attention_backend": "cudnn", "compile": True,
                              "compile_mode": "max-autotune-no-cudagraphs"},
}
# Not a TrainConfig mode: compile's min-cut partitioner under an activation-memory budget (a probe
# of selective recomputation: it keeps matmul/attention outputs, recomputes elementwise work).
BUDGET = {"fluxlab_lean_budget": 0.1}
VARIANTS = [*STOCK, *FLUXLAB, *BUDGET]
DEFAULT = "stock_eager,stock_compile,stock_gc,fluxlab_eager,fluxlab_fast,fluxlab_lean"
BASELINES = ("stock_eager", "stock_compile", "stock_gc")
# A lever on top of the fast path is also judged against the fast path itself.
LEVER_BASE = {"fluxlab_fast_fused": "fluxlab_fast", "fluxlab_fast_cg": "fluxlab_fast",
              "fluxlab_fast_autotune": "fluxlab_fast"}
GEMM_MARKERS = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma")


def flux_train_flops(res: int, txt: int = 512, batch: int = 1) -> dict:
    """FLOPs of one FLUX.1 LoRA step (frozen base: no weight-gradient GEMMs).

    Every block holds 2*(4*3072^2 + 2*3072*12288) linear FLOPs per token (double blocks per
    stream, single blocks fused); attention is 4*S^2*D*H per layer forward, 2.5x that backward.
    """
    s = (res // 16) ** 2 + txt
    lin = 57 * 2 * (4 * 3072**2 + 2 * 3072 * 12288) * s * batch
    attn = 57 * 4 * s * s * 128 * 24 * batch
    return {"forward": lin + attn, "step": lin + attn + lin + 2.5 * attn}


def sdpa_pattern(backend: str, cuda: bool = True) -> str:
    """One anchored pattern for an SDPA backend: on the GPU it fully matches any of the backend's
    CUDA kernels, on the CPU its aten op.

    ATTENTION_KERNELS lists several kernel names per backend (a fused kernel, its helpers) and
    the backend's aten op (a CPU event); any one of the kernels shows the backend ran on the GPU.
    The op alone is no proof on the GPU (CUDA graph replays have no ops).
    """
    from fluxlab import bench

    pats = [p for p in bench.ATTENTION_KERNELS[backend] if p.startswith("aten::") != cuda]
    if not pats:
        raise ValueError(f"ATTENTION_KERNELS[{backend!r}] has no {'CUDA kernel' if cuda else 'aten op'} pattern")
    return "|".join(f"(?:{p})" for p in pats)


def classify(name: str) -> str:
    """attention / gemm / other for the time split. Attention by the anchored SDPA patterns (an
    inductor kernel named after the cuDNN op is elementwise work, not attention); GEMMs by name."""
    from fluxlab import bench

    if bench.attention_backends([name]):
        return "attention"
    low = name.lower()
    if any(k in low for k in GEMM_MARKERS):
        return "gemm"
    return "other"


# --- child: one variant ---------------------------------------------------------------------------
def train_config(name: str, a):
    from fluxlab.config import config_from_dict

    overrides = dict(FLUXLAB.get(name, {"attention_backend": "cudnn", "compile": True}))
    return config_from_dict({"model": a.preset, "resolution": a.res, "batch_size": a.batch, "rank": a.rank,
                             "lora_alpha": float(a.rank), "target_modules": LORA_TARGETS, "learning_rate": 1e-4,
                             "max_grad_norm": 0.0, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                             "max_sequence_length": 512, "seed": 0, "steps": a.warmup + a.steps + 8,
                             "log_every": 10**6, "progress": False, "device": getattr(a, "device", "cuda"),
                             **overrides})


def variant_expect(name: str, *, compiled: bool, n_attention: int, patched: dict | None = None):
    """What must be seen in a variant's timed steps for its claimed path to count as run.

    Stock variants: their pinned SDPA backend's kernels, the other fused backend's forbidden.
    fluxlab variants (cuDNN): cuDNN kernels, flash forbidden; when eager, fluxlab.attention's
    counter must rise by every attention module per step and the other backends' stay still
    (compiled code does not bump those counters: fluxlab/attention.py); each patched kernel
    family must launch forward and backward once per patched module per step, and its
    `_fl_<family>_..._kernel` must appear on the GPU.
    """
    from fluxlab import attention, bench, kernels

    if name in STOCK:
        backend = STOCK[name][0]
        other = "cudnn" if backend == "flash" else "flash"
        return bench.Expect(kernels=(sdpa_pattern(backend),), forbid=(sdpa_pattern(other),))
    counters: dict[str, int] = {}
    if not compiled:
        counters["attention.cudnn"] = n_attention
    patterns = [sdpa_pattern("cudnn")]
    for family, n in (patched or {}).items():
        if n:
            counters.update({f"{family}.fwd": n, f"{family}.bwd": n})
            patterns.append(bench.family_pattern(family))
    return bench.Expect(counters=counters, still=tuple(f"attention.{b}" for b in ("flash", "efficient", "math")),
                        kernels=tuple(patterns), forbid=tuple(bench.ATTENTION_KERNELS["flash"]),
                        read=lambda: {**attention.counters(), **kernels.counters()},
                        fallbacks=lambda: {**attention.fallbacks(), **kernels.fallbacks()})


def run_variant(name: str, a) -> dict:
    """Time one variant (see the module docstring for the inputs each step sees)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fluxlab import bench, models
    from fluxlab.trainer import Trainer, draw_step_inputs, flow_matching_loss, step_generator

    cfg = train_config(name, a)
    if name in BUDGET:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = BUDGET[name]
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"        # the CPU runs the same code on tiny shapes: a smoke, not a measurement
    dtype = torch.bfloat16 if cuda else torch.float32               # as the trainer: fp32 on the CPU
    shape = models.PRESETS.get(a.preset, models.PRESETS["flux1-dev"])
    lat, ch = a.res // 8, shape["in_channels"] // 4
    pin = (lambda t: t.pin_memory()) if cuda else (lambda t: t)  # noqa: E731

    def micro_batch(j):                                  # the trainer's batch format, on the CPU
        g = torch.Generator("cpu").manual_seed(1000 + j)
        return {"mean": pin(torch.randn(a.batch, ch, lat, lat, generator=g)),                          # [B, 16, h, w]
                "logvar": pin(torch.full((a.batch, ch, lat, lat), -4.0)),
                "prompt_embeds": pin(torch.randn(a.batch, 512, shape["joint_attention_dim"], generator=g)),  # [B, 512, 4096]
                "pooled": pin(torch.randn(a.batch, shape["pooled_projection_dim"], generator=g))}            # [B, 768]

    # warm-up + timed + 1 profiled (evidence) + 2 profiled (split) steps
    batches = [micro_batch(j) for j in range(a.warmup + a.steps + 3)]
    losses: list = []
    info: dict = {}
    if name in STOCK:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        backend, compile_, ckpt = STOCK[name]
        model = models.build_transformer(a.preset, dev, dtype)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                     target_modules=LORA_TARGETS))
        cast_training_params(model, dtype=torch.float32)      # LoRA params in fp32, as diffusers' script
        if ckpt:
            model.enable_gradient_checkpointing()
        if compile_:
            model.compile_repeated_blocks(fullgraph=True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        scheduler = FlowMatchEulerDiscreteScheduler(**models.FLUX_DEV_SCHEDULER)
        img_ids = FluxPipeline._prepare_latent_image_ids(a.batch, lat // 2, lat // 2, dev, dtype)
        txt_ids = torch.zeros(512, 3, device=dev, dtype=dtype)
        sdp = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
        expect = variant_expect(name, compiled=compile_, n_attention=0)

        def train_step(j):
            mb = batches[j]
            x0, noise, u = draw_step_inputs(mb["mean"], mb["logvar"], step_generator(0, j, 0, 0), cfg,
                                            models.FLUX_VAE_SHIFT, models.FLUX_VAE_SCALE)
            to_dev = lambda t: t.to(dev, dtype, non_blocking=True)  # noqa: E731
            # Backward stays inside the backend context: checkpointing recomputes the forward there.
            with sdpa_kernel([sdp]):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = flow_matching_loss(model, to_dev(x0), to_dev(mb["prompt_embeds"]), to_dev(mb["pooled"]),
                                              to_dev(noise), u, scheduler, img_ids=img_ids, txt_ids=txt_ids)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
    else:
        from diffusers.models.transformers.transformer_flux import FluxAttention

        trainer = Trainer(cfg).setup(with_data=False)
        if trainer.patch_report is not None:
            info["patch"] = trainer.patch_report.to_dict()
        info["fused_groups"] = sum(hasattr(m, "fl_qkv") + hasattr(m, "fl_added") for m in trainer.transformer.modules())
        n_attention = sum(isinstance(m, FluxAttention) for m in trainer.transformer.modules())
        expect = variant_expect(name, compiled=cfg.compile, n_attention=n_attention,
                                patched=info.get("patch", {}).get("patched"))
        train_step = lambda j: trainer.step([batches[j]])["loss"]  # noqa: E731

    calls = iter(range(len(batches)))

    def step():
        losses.append(train_step(next(calls)))   # a 0-dim device tensor: no sync inside the timed step

    # Warm-up outside `bench.run`, so its wall time (compilation) is reported; it is not a sample.
    warmup_s = []
    for _ in range(a.warmup):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        warmup_s.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    m = bench.run({name: step}, repeats=a.steps, warmup=0, device=dev, clock="events" if cuda else "wall",
                  expect={name: expect}, profile_iters=1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    # Where the time goes: two more steps under the profiler (CUDA kernel time per step).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    split = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    launches = {"attention": 0, "gemm": 0, "other": 0}
    names = set()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kind = classify(e.name)
            split[kind] += e.time_range.elapsed_us() / 1e3 / 2    # ms per step
            launches[kind] += 1
            names.add(e.name)
    info["launches_per_step"] = {k: v / 2 for k, v in launches.items()}  # fused projections: fewer GEMMs
    samples, timing = m.samples[name], {"clock": m.clock, "calls_per_sample": m.calls_per_sample}
    return {"variant": name, "samples_ms": samples, "median_ms": statistics.median(samples),
            "peak_gib": peak, "losses": [float(x) for x in losses], "warmup_s": warmup_s,
            "profile_ms": split, "evidence": m.evidence[name].to_dict(), "timing": timing,
            "attention_backends_seen": sorted(bench.attention_backends(names)), **info}


def add_step_args(ap: argparse.ArgumentParser) -> None:
    """The step's shape: shared by every training benchmark."""
    ap.add_argument("--preset", default="flux1-dev")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after warm-up), at least 2")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the code path on tiny shapes (a smoke test)")


# --- parent: all variants, then records -------------------------------------------------------------
def write_records(results: dict, *, flops: float, ceil: dict | None, params: dict, db) -> list[dict]:
    """One record per (variant, stock baseline): ratio = baseline / variant (> 1: faster), judged
    with the variant's evidence from its timed loop. A variant without baselines gets one record."""
    from fluxlab import bench, store

    written = []
    for name, res in results.items():
        if "error" in res:
            written.append(store.record(f"train_step/{name}", verdict="error", params=params,
                                        metrics={"error": res["error"]}, store=db, display=False))
            continue
        metrics = {"median_ms": res["median_ms"], "peak_gib": res["peak_gib"], "step_tflop": flops / 1e12,
                   "tflops": flops / (res["median_ms"] / 1e3) / 1e12, "ceilings": ceil,
                   "floor_ms": flops / (ceil["tflops"] * 1e12) * 1e3 if ceil else None,
                   "profile_ms": res["profile_ms"], "attention_backends_seen": res.get("attention_backends_seen"),
                   "losses": res["losses"], "warmup_s": res["warmup_s"], "timing": res.get("timing"),
                   "patch": res.get("patch"), "evidence": res.get("evidence"),
                   "launches_per_step": res.get("launches_per_step"), "fused_groups": res.get("fused_groups")}
        metrics["fraction_of_floor"] = metrics["floor_ms"] / res["median_ms"] if ceil else None
        ref = results.get("stock_eager", {})
        if "losses" in ref and name != "stock_eager":
            metrics["loss_max_rel_dev_vs_stock_eager"] = max(
                abs(x - y) / max(abs(y), 1e-12) for x, y in zip(res["losses"], ref["losses"]))
        # A variant JSON without evidence (an older child) has none to show: compare() then says unverified.
        evidence = bench.Evidence(**res["evidence"]) if res.get("evidence") else None
        bases = [b for b in (*BASELINES, LEVER_BASE.get(name)) if b and b != name and "samples_ms" in results.get(b, {})]
        if not bases:
            written.append(store.record(f"train_step/{name}", samples={"candidate": res["samples_ms"]},
                                        params=params, metrics=metrics, store=db, display=False))
        for base in bases:
            # Against the fast path, the evidence must show the lever itself; nothing in the timed
            # loop names a fused GEMM or an autotuned one, so such a claim stays unverified (the
            # launch counts per step are recorded beside it).
            lever = base == LEVER_BASE.get(name)
            c = bench.compare(results[base]["samples_ms"], res["samples_ms"], evidence=None if lever else evidence)
            fields = c.record_fields()
            fields["metrics"] = {**metrics, **fields["metrics"], "baseline_evidence": results[base].get("evidence")}
            written.append(store.record(f"train_step/{name}/vs_{base}", **fields, params=params, store=db,
                                        display=False,
                                        samples={"candidate": res["samples_ms"], "baseline": results[base]["samples_ms"]}))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(ap)
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--out", default="runs/bench_train")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(run_variant(a.child, a)), flush=True)
        return 0
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if a.steps < 2 or a.warmup < 0:
        raise SystemExit(f"--steps must be >= 2 and --warmup >= 0 (got {a.steps}, {a.warmup}): a verdict needs samples")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from fluxlab import bench, store

    ceil = bench.measure_ceilings(a.device)   # None on the CPU
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    flops = flux_train_flops(a.res, batch=a.batch)["step"]
    results = {}
    for name in a.variants.split(","):
        t0 = time.time()
        cmd = [sys.executable, "-m", "benchmarks.train", "--child", name] + [f"--{k}={getattr(a, k)}" for k in
                                                              ("preset", "res", "batch", "rank", "steps", "warmup", "device")]
        p = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                           timeout=420 if a.res >= 1024 else 300)   # compile warm-up included
        res = next((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")), None)
        if res is None:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:400]
            res = {"variant": name, "error": tail, "rc": p.returncode}
        res["wall_s"] = round(time.time() - t0, 1)
        results[name] = res
        (out / f"variant_{name}.json").write_text(json.dumps(res, indent=1))
        print(_row(res, flops), flush=True)

    params = {"preset": a.preset, "res": a.res, "batch": a.batch, "rank": a.rank, "lora_targets": LORA_TARGETS}
    db = out / "bench.db"
    for rec in write_records(results, flops=flops, ceil=ceil, params=params, db=db):
        if rec.get("ratio") is not None:
            print(f"{rec['benchmark']:44s} {rec['ratio']:.3f} [{rec['ci_low']:.3f}, {rec['ci_high']:.3f}] "
                  f"{rec['verdict']}", flush=True)
    (out / "records.jsonl").write_text(store.export_records("json", store=db))
    print(json.dumps({"ceilings": ceil, "step_tflop": flops / 1e12}))
    return 0


def _row(res: dict, flops: float) -> str:
    if "error" in res:
        return f"{res['variant']:18s} ERROR rc={res.get('rc')} {res['error'][:200]}"
    ms = res["median_ms"]
    p = res["profile_ms"]
    ev = res["evidence"]
    peak = "-" if res["peak_gib"] is None else f"{res['peak_gib']:5.1f}"
    return (f"{res['variant']:18s} {ms:8.1f} ms  peak {peak} GiB  "
            f"{flops / (ms / 1e3) / 1e12:6.1f} TFLOP/s  attn {p['attention']:.0f} gemm {p['gemm']:.0f} "
            f"other {p['other']:.0f} ms  backends {res.get('attention_backends_seen')}  "
            f"evidence {'ran' if ev['ran'] else 'NOT RUN: ' + ev['reason'][:200]}  "
            f"loss0 {res['losses'][0]:.4f} lossN {res['losses'][-1]:.4f}")


if __name__ == "__main__":
    sys.exit(main())
