"""FLUX LoRA training step: stock diffusers + peft against fluxlab, side by side, one machine, one call.

    fluxlab bench train --preset flux1-dev --res 1024 --batch 1 --rank 16 [--variants a,b] --out DIR

Every variant runs in its own process (a CUDA fault kills only that variant) on identical inputs:
step i draws its latents, text embeddings, noise and timesteps from seed + i, so the loss curves
of all variants are comparable step by step. Per variant it reports the median step time from
CUDA events after warm-up, peak allocated memory, achieved TFLOP/s against the bf16 GEMM ceiling
measured in the same call, the profiler's attention / GEMM / other split, and the evidence of
which attention kernels and fluxlab kernels ran. Ratios against the stock variants go to
`records.jsonl` in the store's export format.
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
}
# Not a TrainConfig mode: compile's min-cut partitioner under an activation-memory budget (a probe
# of selective recomputation: it keeps matmul/attention outputs, recomputes elementwise work).
BUDGET = {"fluxlab_lean_budget": 0.1}
VARIANTS = [*STOCK, *FLUXLAB, *BUDGET]
DEFAULT = "stock_eager,stock_compile,stock_gc,fluxlab_eager,fluxlab_fast,fluxlab_lean"


def flux_train_flops(res: int, txt: int = 512, batch: int = 1) -> dict:
    """FLOPs of one FLUX.1 LoRA step (frozen base: no weight-gradient GEMMs).

    Every block holds 2*(4*3072^2 + 2*3072*12288) linear FLOPs per token (double blocks per
    stream, single blocks fused); attention is 4*S^2*D*H per layer forward, 2.5x that backward.
    """
    s = (res // 16) ** 2 + txt
    lin = 57 * 2 * (4 * 3072**2 + 2 * 3072 * 12288) * s * batch
    attn = 57 * 4 * s * s * 128 * 24 * batch
    return {"forward": lin + attn, "step": lin + attn + lin + 2.5 * attn}


def classify(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "cudnn", "sdpa", "attention")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma")):
        return "gemm"
    return "other"


# --- child: one variant ---------------------------------------------------------------------------
def train_config(name: str, a):
    from fluxlab.config import config_from_dict

    overrides = dict(FLUXLAB.get(name, {"attention_backend": "cudnn", "compile": True}))
    return config_from_dict({"model": a.preset, "resolution": a.res, "batch_size": a.batch, "rank": a.rank,
                             "lora_alpha": float(a.rank), "target_modules": LORA_TARGETS, "learning_rate": 1e-4,
                             "max_grad_norm": 0.0, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                             "max_sequence_length": 512, "seed": 0, "steps": a.warmup + a.steps + 2,
                             "log_every": 10**6, "progress": False, **overrides})


def run_variant(name: str, a) -> dict:
    """Time one variant. Step i of every variant sees the same inputs: the micro-batch comes from
    seed 1000 + i, and x0 / noise / timesteps from the trainer's own step_generator(0, i)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fluxlab import attention, models
    from fluxlab.trainer import Trainer, draw_step_inputs, flow_matching_loss, step_generator

    cfg = train_config(name, a)
    if name in BUDGET:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = BUDGET[name]
    lat = a.res // 8

    def micro_batch(i):                                  # the trainer's batch format, on the GPU
        g = torch.Generator("cpu").manual_seed(1000 + i)
        return {"mean": torch.randn(a.batch, 16, lat, lat, generator=g).cuda(),          # [B, 16, h, w]
                "logvar": torch.full((a.batch, 16, lat, lat), -4.0).cuda(),
                "prompt_embeds": torch.randn(a.batch, 512, 4096, generator=g).cuda(),     # [B, 512, 4096]
                "pooled": torch.randn(a.batch, 768, generator=g).cuda()}                   # [B, 768]

    evidence: dict = {}
    if name in STOCK:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        backend, compile_, ckpt = STOCK[name]
        model = models.build_transformer(a.preset, "cuda", torch.bfloat16)
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
        img_ids = FluxPipeline._prepare_latent_image_ids(a.batch, lat // 2, lat // 2, "cuda", torch.bfloat16)
        txt_ids = torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16)
        sdp = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
        counter = iter(range(10**9))

        def step(mb):
            x0, noise, u = draw_step_inputs(mb["mean"], mb["logvar"], step_generator(0, next(counter), 0, 0), cfg,
                                            models.FLUX_VAE_SHIFT, models.FLUX_VAE_SCALE)
            # Backward stays inside the backend context: checkpointing recomputes the forward there.
            with sdpa_kernel([sdp]):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = flow_matching_loss(model, x0.cuda().bfloat16(), mb["prompt_embeds"].bfloat16(),
                                              mb["pooled"].bfloat16(), noise.cuda().bfloat16(), u, scheduler,
                                              img_ids=img_ids, txt_ids=txt_ids)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        trainer = Trainer(cfg).setup(with_data=False)
        if trainer.patch_report is not None:
            evidence["patch"] = trainer.patch_report.to_dict()
        step = lambda mb: trainer.step([mb])["loss"]  # noqa: E731

    losses, times, first_steps_s = [], [], []
    for i in range(a.warmup + a.steps):
        mb = micro_batch(i)
        torch.cuda.synchronize()
        if i == a.warmup:
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        loss = step(mb)
        end.record()
        torch.cuda.synchronize()
        losses.append(float(loss))
        if i >= a.warmup:
            times.append(start.elapsed_time(end))
        else:
            first_steps_s.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()

    # Profile two more steps: where the time goes, and which kernels really ran.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            step(micro_batch(a.warmup + a.steps + i))
        torch.cuda.synchronize()
    split = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    names = set()
    for e in prof.events():                    # kernel events: their own time range on the device
        if e.device_type.name == "CUDA":
            split[classify(e.name)] += e.time_range.elapsed_us() / 1e3 / 2    # ms per step
            names.add(e.name)
    evidence["attention_backends_seen"] = sorted(attention.classify_kernels(names))
    evidence["attention_kernels"] = sorted(n for n in names if classify(n) == "attention")[:12]
    evidence["attention_counters"] = attention.counters()
    if cfg.use_kernels and name not in STOCK:
        from fluxlab import kernels

        evidence["kernel_counters"] = kernels.counters()
        evidence["kernel_fallbacks"] = kernels.fallbacks()
        evidence["triton_kernels_seen"] = sorted(n for n in names if "_kernel" in n and "triton" in n.lower()
                                                 or n.startswith("_"))[:20]
    return {"variant": name, "samples_ms": times, "median_ms": statistics.median(times),
            "peak_gib": peak / 2**30, "losses": losses, "warmup_s": first_steps_s,
            "profile_ms": split, "evidence": evidence}


def add_step_args(ap: argparse.ArgumentParser) -> None:
    """The step's shape: shared by every training benchmark."""
    ap.add_argument("--preset", default="flux1-dev")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)


# --- parent: all variants, then records -------------------------------------------------------------
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
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from fluxlab import bench, store

    ceil = bench.measure_ceilings("cuda")
    torch.cuda.empty_cache()
    flops = flux_train_flops(a.res, batch=a.batch)["step"]
    results = {}
    for name in a.variants.split(","):
        t0 = time.time()
        cmd = [sys.executable, "-m", "benchmarks.train", "--child", name] + [f"--{k}={getattr(a, k)}" for k in
                                                              ("preset", "res", "batch", "rank", "steps", "warmup")]
        p = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                           timeout=420 if a.res >= 1024 else 300)   # compile warm-up included
        res = next((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")), None)
        if res is None:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:400]
            res = {"variant": name, "error": tail, "rc": p.returncode}
        res["wall_s"] = round(time.time() - t0, 1)
        results[name] = res
        (out / f"variant_{name}.json").write_text(json.dumps(res, indent=1))
        print(_row(res, flops, ceil), flush=True)

    params = {"preset": a.preset, "res": a.res, "batch": a.batch, "rank": a.rank, "lora_targets": LORA_TARGETS}
    db = out / "bench.db"
    for name, res in results.items():
        if "error" in res:
            store.record(f"train_step/{name}", verdict="error", params=params, metrics={"error": res["error"]},
                         store=db, display=False)
            continue
        metrics = {"median_ms": res["median_ms"], "peak_gib": res["peak_gib"], "step_tflop": flops / 1e12,
                   "tflops": flops / (res["median_ms"] / 1e3) / 1e12,
                   "floor_ms": flops / (ceil["tflops"] * 1e12) * 1e3, "ceilings": ceil,
                   "profile_ms": res["profile_ms"], "evidence": res["evidence"], "losses": res["losses"],
                   "warmup_s": res["warmup_s"]}
        metrics["fraction_of_floor"] = metrics["floor_ms"] / res["median_ms"]
        ref = results.get("stock_eager", {})
        if "losses" in ref and name != "stock_eager":
            metrics["loss_max_rel_dev_vs_stock_eager"] = max(
                abs(x - y) / max(abs(y), 1e-12) for x, y in zip(res["losses"], ref["losses"]))
        # One record per (variant, stock baseline): the ratio is baseline / variant (> 1: faster).
        bases = [b for b in ("stock_eager", "stock_compile", "stock_gc")
                 if b != name and "samples_ms" in results.get(b, {})]
        for base in bases or [None]:
            c = bench.compare(results[base]["samples_ms"], res["samples_ms"]) if base else None
            store.record(f"train_step/{name}" + (f"/vs_{base}" if base else ""), verdict=c and c.verdict,
                         ratio=c and c.ratio, ci_low=c and c.ci_low, ci_high=c and c.ci_high,
                         samples={"candidate": res["samples_ms"], **({"baseline": results[base]["samples_ms"]} if base else {})},
                         params=params, metrics=metrics, store=db, display=False)
    (out / "records.jsonl").write_text(store.export_records("json", store=db))
    print(json.dumps({"ceilings": ceil, "step_tflop": flops / 1e12}))
    return 0


def _row(res: dict, flops: float, ceil: dict) -> str:
    if "error" in res:
        return f"{res['variant']:18s} ERROR rc={res.get('rc')} {res['error'][:200]}"
    ms = res["median_ms"]
    p = res["profile_ms"]
    return (f"{res['variant']:18s} {ms:8.1f} ms  peak {res['peak_gib']:5.1f} GiB  "
            f"{flops / (ms / 1e3) / 1e12:6.1f} TFLOP/s  attn {p['attention']:.0f} gemm {p['gemm']:.0f} "
            f"other {p['other']:.0f} ms  backends {res['evidence'].get('attention_backends_seen')}  "
            f"loss0 {res['losses'][0]:.4f} lossN {res['losses'][-1]:.4f}")


if __name__ == "__main__":
    sys.exit(main())
