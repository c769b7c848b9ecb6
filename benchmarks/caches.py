"""Training step time with cold caches against warm caches, on the tiny preset (CPU) or the whole
FLUX.1-dev pipeline at real scale (GPU).

    python -m benchmarks.caches [--preset tiny] [--batch 4] [--res 64] [--repeats 10] [--out FILE]
    python -m benchmarks.caches --preset flux1-dev-full --device cuda --res 1024 --batch 1 --max-seq 512 --rank 16
    fluxlab bench caches [same options]

One step = prepare a batch (latent distributions from the VAE or the LatentCache, a latent sample,
T5/CLIP embeddings from the encoders or the TextEmbeddingCache, position ids, the copies to the
device) + one LoRA training step of the transformer (forward under autocast, flow-matching loss,
backward, AdamW step).

* cold: a fresh, empty cache folder every sample, so every look-up misses (VAE encode, text
  encode, disk write).
* warm: cache objects primed once and reused, so every look-up hits in memory; `warm_disk` opens
  the primed folder afresh every sample (hits read from disk, as a new process would).

The three are interleaved sample by sample by `fluxlab.bench.run`, so drift hits all alike. The
caches' own counters are the evidence, read around every timed step: a warm step must hit on every
look-up and miss on none, a cold one must miss on every distinct image and caption.

Inside every timed step the batch preparation is timed on its own (CUDA events on the GPU), so each
variant reports `data_overhead_fraction` = median preparation / median step. `peak_gib` is the
peak allocated memory over a variant's timed steps with the encoders resident (the cold path needs
them); afterwards the encoders are released (as the trainer releases them once its caches are
filled) and a few warm steps measure `peak_gib` without them. The cost of one VAE encode, one T5
encode and one CLIP encode at the run's shape is timed on its own.

Records (one JSON line each, appended to --out): `caches/cold`, `caches/warm`, `caches/warm_disk`
with metrics cold_ms, warm_ms, data_overhead_fraction and peak_gib (warm and warm_disk are judged
against cold, with their own evidence), and `caches/encode/vae`, `caches/encode/t5`,
`caches/encode/clip`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, flux1-dev-full, ...) or diffusers FLUX folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--res", type=int, default=64, help="image side in pixels (multiple of 16)")
    p.add_argument("--max-seq", type=int, default=32, help="T5 max sequence length")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--released-steps", type=int, default=3, help="warm steps after the encoders are released")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/caches.jsonl")
    return p.parse_args(argv)


class CacheVariant:
    """One timed variant: each call runs the step on the next cache set from `sets`. Its counters
    (`stats`) sum the look-ups of every cache object it has used, so a fresh set per call and
    one reused set are read alike, before and after each timed call."""

    def __init__(self, step, sets):
        self.step, self.sets, self.used = step, sets, {}
        self.data_ms: list[float] = []   # batch preparation per call
        self.peaks: list[float] = []     # peak allocated GiB per call (CUDA)

    def __call__(self) -> None:
        caches = next(self.sets)
        self.used[id(caches)] = caches
        self.step(self, *caches)

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for caches in self.used.values():
            for kind, cache in zip(("latent", "text", "position"), caches):
                for key in ("hits", "misses"):
                    out[f"{kind}.{key}"] = out.get(f"{kind}.{key}", 0) + cache.stats()[key]
        return out


class Marks:
    """Two points inside a call: CUDA events on the GPU (read after the call), wall time on the CPU."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch = cuda, torch

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.res < 64 or args.res % 16 or args.repeats < 2 or args.warmup < 0 or args.batch < 1:
        print(f"benchmarks/caches.py: need --res a multiple of 16 and >= 64, --repeats >= 2, --warmup >= 0, "
              f"--batch >= 1 (got {args.res}, {args.repeats}, {args.warmup}, {args.batch})", file=sys.stderr)
        return 2
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlog
    from peft import LoraConfig

    from fluxlab import attention, bench, store
    from fluxlab.caches import LatentCache, PositionIdCache, TextEmbeddingCache, latent_preprocess
    from fluxlab.data import ImageCaptionDataset, make_shapes_dataset
    from fluxlab.env import default_dtype
    from fluxlab.models import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, load_pipeline
    from fluxlab.training.setup import release_encoders

    dlog.set_verbosity_error()  # encode_prompt warns on every caption it pads
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = default_dtype(device)                  # bf16 weights under autocast on the GPU, as training
    marks = Marks(cuda)
    pipe = load_pipeline(args.preset, device, dtype, seed=args.seed)
    tr = pipe.transformer
    tr.requires_grad_(False)
    torch.manual_seed(args.seed)
    tr.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # fluxlab's attention, as the trainer installs it: stock SDPA picks cuDNN on Hopper, whose
    # backward fails inside FLUX training (fluxlab/attention.py carries the fix).
    attention.install(tr, "auto")
    trainable = [p for p in tr.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()                    # LoRA in fp32, base in bf16 (diffusers' cast_training_params)
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    work = Path(tempfile.mkdtemp(prefix="fluxlab-bench-caches-"))
    data = make_shapes_dataset(work / "data", n=args.batch, seed=args.seed, size=args.res)
    ds = ImageCaptionDataset(data, args.res, seed=args.seed)
    shas = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p, _ in ds.records]
    gen = torch.Generator("cpu").manual_seed(args.seed)

    def step(variant: CacheVariant, latents: LatentCache, texts: TextEmbeddingCache, positions: PositionIdCache):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = marks.mark()
        # --- prepare the batch (what the caches speed up) ---
        x0, embeds, pooled = [], [], []
        for i in range(len(ds)):
            pre = latent_preprocess(ds.bucket_of(i), True, False)
            mean, logvar = latents.get(shas[i], pre, lambda i=i: ds[i]["pixels"])   # [16, h, w] each
            x0.append((LatentCache.sample(mean, logvar, gen) - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE)
            e, p = texts.get(ds.records[i][1])                                       # [S, D], [Dp]
            embeds.append(e), pooled.append(p)
        x0 = torch.stack(x0).to(device, dtype)                                       # [B, 16, h, w]
        embeds = torch.stack(embeds).to(device, dtype)                               # [B, S, D]
        pooled = torch.stack(pooled).to(device, dtype)                               # [B, Dp]
        b, c, h, w = x0.shape
        img_ids, txt_ids = positions.get(h, w, embeds.shape[1], device, dtype)       # [h/2*w/2, 3], [S, 3]
        noise = torch.randn(x0.shape, generator=gen).to(device, dtype)               # [B, 16, h, w]
        t = torch.rand(b, generator=gen).to(device)                                  # [B]
        t1 = marks.mark()
        # --- one flow-matching LoRA step ---
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            packed = FluxPipeline._pack_latents(xt, b, c, h, w)                      # [B, h/2*w/2, 64]
            guidance = torch.full((b,), 3.5, device=device) if tr.config.guidance_embeds else None
            pred = tr(hidden_states=packed, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
            target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        variant.data_ms.append(marks.ms(t0, t1))
        if cuda:
            variant.peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)

    # Cache objects are built before timing (the first one hashes the VAE and encoders; the others
    # reopen it over new folders): a timed call is the step alone.
    calls = args.warmup + args.repeats
    proto = (LatentCache(work / "proto", pipe.vae), TextEmbeddingCache(work / "proto", pipe, args.max_seq))

    def fresh(folder):
        return (*(c.reopen(folder) for c in proto), PositionIdCache())

    cold_sets = [fresh(tempfile.mkdtemp(dir=work)) for _ in range(calls)]
    warm_dir = work / "warm"
    warm = fresh(warm_dir)
    prime = CacheVariant(step, itertools.repeat(warm))
    prime()                   # fills the folder and the in-memory layers
    for c in warm:
        c.reset_stats()
    disk_sets = [fresh(warm_dir) for _ in range(calls)]
    for caches in disk_sets:
        caches[2].precompute([ds.bucket_of(0)], args.max_seq, device, dtype)
    variants = {"cold": CacheVariant(step, iter(cold_sets)), "warm": CacheVariant(step, itertools.repeat(warm)),
                "warm_disk": CacheVariant(step, iter(disk_sets))}
    n_img, n_txt = len(set(shas)), len({caption for _, caption in ds.records})
    look = {"latent": len(ds), "text": len(ds), "position": 1}   # look-ups per step
    hits = {f"{k}.hits": n for k, n in look.items()}
    misses = tuple(f"{k}.misses" for k in look)
    expect = {"cold": bench.Expect(counters={"latent.misses": n_img, "text.misses": n_txt, "position.misses": 1},
                                   read=variants["cold"].stats),
              "warm": bench.Expect(counters=hits, still=misses, read=variants["warm"].stats),
              "warm_disk": bench.Expect(counters=hits, still=misses, read=variants["warm_disk"].stats)}
    m = bench.run(variants, repeats=args.repeats, warmup=args.warmup, device=device,
                  clock="events" if cuda else "wall", expect=expect)
    samples, timing = m.samples, {"clock": m.clock, "calls_per_sample": m.calls_per_sample}
    med = {k: statistics.median(v) for k, v in samples.items()}

    # --- what one encode costs at this shape (timed alone) ---
    pixels = ds[0]["pixels"][None].to(device, dtype)                                   # [1, 3, H, W]
    caption = ds.records[0][1]
    with torch.no_grad():
        enc = bench.run({
            "vae": lambda: pipe.vae.encode(pixels).latent_dist.mean,
            "t5": lambda: pipe._get_t5_prompt_embeds(caption, max_sequence_length=args.max_seq, device=device),
            "clip": lambda: pipe._get_clip_prompt_embeds(caption, device=device),
        }, repeats=args.repeats, warmup=1, device=device, clock="events" if cuda else "wall")

    # --- the encoders released, as the trainer does once its caches are filled ---
    for caches in (proto, warm, *cold_sets, *disk_sets):
        caches[0].vae = None                       # the latent caches' hold on the VAE
    released = release_encoders(pipe, device)
    after = CacheVariant(step, itertools.repeat(warm))
    for _ in range(args.released_steps):
        after()
    peak_released = max(after.peaks) if after.peaks else None

    params = {"preset": args.preset, "batch": args.batch, "res": args.res, "max_seq": args.max_seq,
              "rank": args.rank, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
              "dtype": str(dtype).removeprefix("torch.")}
    written = []

    def record(name: str, **fields):
        written.append(store.record(name, params=params, device=device, store=work / "bench.db", display=False,
                                    **fields))

    for name, v in variants.items():
        data_ms = v.data_ms[-args.repeats:]          # the timed calls (warm-up calls come first)
        metrics = {"cold_ms": med["cold"], "warm_ms": med["warm"], "median_ms": med[name],
                   "data_ms": statistics.median(data_ms), "data_ms_samples": data_ms,
                   "data_overhead_fraction": statistics.median(data_ms) / med[name],
                   "peak_gib": max(v.peaks[-args.repeats:]) if v.peaks else None,
                   "timing": timing, "evidence": m.evidence[name].to_dict()}
        if name != "cold" and cuda:
            # Warm steps need no encoder: their peak is the one measured after the release.
            metrics.update(peak_gib=peak_released, peak_gib_encoders_resident=metrics["peak_gib"],
                           released=released)
        if name == "cold":
            record("caches/cold", samples={"candidate": samples["cold"]}, metrics=metrics)
            continue
        cmp = bench.compare(samples["cold"], samples[name], evidence=m.evidence[name])  # ratio = cold / variant
        fields = cmp.record_fields()
        fields["metrics"] = {**metrics, **fields["metrics"], "baseline_evidence": m.evidence["cold"].to_dict()}
        record(f"caches/{name}", **fields, samples={"candidate": samples[name], "baseline": samples["cold"]})
    for name, s in enc.samples.items():
        record(f"caches/encode/{name}", samples={"candidate": s},
               metrics={"median_ms": statistics.median(s), "timing": {"clock": enc.clock},
                        "shape": {"vae": [args.res, args.res], "t5": [args.max_seq], "clip": [77]}[name]})

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:  # whole lines; JSON-lines readers skip nothing partial
        f.writelines(json.dumps(rec) + "\n" for rec in written)
    by = {r["benchmark"]: r for r in written}
    w = by["caches/warm"]
    print(f"cold {med['cold']:.1f} ms, warm {med['warm']:.1f} ms (from disk {med['warm_disk']:.1f} ms): "
          f"cold/warm = {w['ratio']:.2f} [95% CI {w['ci_low']:.2f}-{w['ci_high']:.2f}], {w['verdict']}; "
          f"data overhead warm {w['metrics']['data_overhead_fraction']:.2%}, cold "
          f"{by['caches/cold']['metrics']['data_overhead_fraction']:.2%}; encode ms: "
          + ", ".join(f"{k} {statistics.median(s):.1f}" for k, s in enc.samples.items())
          + (f"; peak {by['caches/cold']['metrics']['peak_gib']:.1f} GiB with encoders, "
             f"{peak_released:.1f} GiB after releasing {released['freed_gib']:.1f} GiB" if cuda else "")
          + f"; {len(written)} records appended to {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
