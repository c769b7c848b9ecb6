"""Training step time with cold caches against warm caches (tiny preset, CPU by default).

    python -m benchmarks.caches [--batch 4] [--res 64] [--repeats 10] [--out benchmarks/results/caches.jsonl]
    fluxlab bench caches [same options]

One step = prepare a batch (latent distributions from the VAE or the LatentCache, a latent sample,
T5/CLIP embeddings from the encoders or the TextEmbeddingCache, position ids) + one LoRA
training step of the transformer (forward, flow-matching loss, backward, AdamW step).

* cold: a fresh, empty cache folder and fresh cache objects every sample, so every look-up misses
  (VAE encode, text encode, disk write).
* warm: cache objects primed once and reused, so every look-up hits in memory; `warm_disk` uses
  new objects over the primed folder each sample (hits read from disk, as a new process would).

The three are interleaved sample by sample (cold, warm, warm_disk, cold, ...) by
`fluxlab.bench.run`, so drift in the machine's load hits all of them alike; CPU numbers describe
the workbench's own speed, never a GPU claim. The caches' own counters are the evidence, read
around every timed step: a warm step must hit on every look-up and miss on none, a cold one must
miss on every distinct image and caption. The cold/warm verdict is judged with the warm
evidence. One store record (raw samples, evidence, provenance) is appended to --out as a line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import itertools
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="model preset or diffusers FLUX folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--res", type=int, default=64, help="image side in pixels (multiple of 16)")
    p.add_argument("--max-seq", type=int, default=32, help="T5 max sequence length")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/caches.jsonl")
    return p.parse_args(argv)


class CacheVariant:
    """One timed variant: each call runs the step on the next cache set from `sets`. Its counters
    (`stats`) sum the look-ups of every cache object it has used, so a fresh set per call and
    one reused set are read alike, before and after each timed call."""

    def __init__(self, step, sets):
        self.step, self.sets, self.used = step, sets, {}

    def __call__(self) -> None:
        caches = next(self.sets)
        self.used[id(caches)] = caches
        self.step(*caches)

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for caches in self.used.values():
            for kind, cache in zip(("latent", "text", "position"), caches):
                for key in ("hits", "misses"):
                    out[f"{kind}.{key}"] = out.get(f"{kind}.{key}", 0) + cache.stats()[key]
        return out


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

    from fluxlab import bench, store
    from fluxlab.caches import LatentCache, PositionIdCache, TextEmbeddingCache, latent_preprocess
    from fluxlab.data import ImageCaptionDataset, make_shapes_dataset
    from fluxlab.models import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, load_pipeline

    dlog.set_verbosity_error()  # encode_prompt warns on every caption it pads
    device = torch.device(args.device)
    pipe = load_pipeline(args.preset, device, torch.float32)
    tr = pipe.transformer
    tr.requires_grad_(False)
    torch.manual_seed(args.seed)
    tr.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-4)

    work = Path(tempfile.mkdtemp(prefix="fluxlab-bench-caches-"))
    data = make_shapes_dataset(work / "data", n=args.batch, seed=args.seed, size=args.res)
    ds = ImageCaptionDataset(data, args.res, seed=args.seed)
    shas = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p, _ in ds.records]
    gen = torch.Generator("cpu").manual_seed(args.seed)

    def step(latents: LatentCache, texts: TextEmbeddingCache, positions: PositionIdCache) -> None:
        # --- prepare the batch (what the caches speed up) ---
        x0, embeds, pooled = [], [], []
        for i in range(len(ds)):
            pre = latent_preprocess(ds.bucket_of(i), True, False)
            mean, logvar = latents.get(shas[i], pre, lambda i=i: ds[i]["pixels"])   # [16, h, w] each
            x0.append((LatentCache.sample(mean, logvar, gen) - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE)
            e, p = texts.get(ds.records[i][1])                                       # [S, D], [Dp]
            embeds.append(e), pooled.append(p)
        x0 = torch.stack(x0).to(device)                          # [B, 16, h, w]
        embeds, pooled = torch.stack(embeds).to(device), torch.stack(pooled).to(device)  # [B, S, D], [B, Dp]
        b, c, h, w = x0.shape
        img_ids, txt_ids = positions.get(h, w, embeds.shape[1], device, x0.dtype)  # [h/2*w/2, 3], [S, 3]
        # --- one flow-matching LoRA step ---
        noise = torch.randn(x0.shape, generator=gen).to(device)                    # [B, 16, h, w]
        t = torch.rand(b, generator=gen).to(device)                                # [B]
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        packed = FluxPipeline._pack_latents(xt, b, c, h, w)                        # [B, h/2*w/2, 64]
        guidance = torch.full((b,), 3.5, device=device) if tr.config.guidance_embeds else None
        pred = tr(hidden_states=packed, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
        torch.nn.functional.mse_loss(pred, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fresh(folder):
        return (LatentCache(folder, pipe.vae), TextEmbeddingCache(folder, pipe, args.max_seq),
                PositionIdCache())

    # Cache objects are built before timing (their construction hashes the VAE and encoders), one
    # set per call for the variants that start fresh: a timed call is the step alone.
    calls = args.warmup + args.repeats
    cold_sets = [fresh(tempfile.mkdtemp(dir=work)) for _ in range(calls)]
    warm_dir = work / "warm"
    warm = fresh(warm_dir)
    step(*warm)  # prime: fills the folder and the in-memory layers
    for c in warm:
        c.reset_stats()
    disk_sets = [fresh(warm_dir) for _ in range(calls)]
    for caches in disk_sets:
        caches[2].precompute([ds.bucket_of(0)], args.max_seq, device, torch.float32)
    variants = {"cold": CacheVariant(step, iter(cold_sets)), "warm": CacheVariant(step, itertools.repeat(warm)),
                "warm_disk": CacheVariant(step, iter(disk_sets))}
    n_img, n_txt = len(set(shas)), len({caption for _, caption in ds.records})
    look = {"latent": len(ds), "text": len(ds), "position": 1}   # look-ups per step
    # cold: every distinct image and caption misses (encoded and written); warm: every look-up hits
    # in memory; warm_disk: every look-up hits (read from disk), nothing is recomputed.
    hits = {f"{k}.hits": n for k, n in look.items()}
    misses = tuple(f"{k}.misses" for k in look)
    expect = {"cold": bench.Expect(counters={"latent.misses": n_img, "text.misses": n_txt, "position.misses": 1},
                                   read=variants["cold"].stats),
              "warm": bench.Expect(counters=hits, still=misses, read=variants["warm"].stats),
              "warm_disk": bench.Expect(counters=hits, still=misses, read=variants["warm_disk"].stats)}
    m = bench.run(variants, repeats=args.repeats, warmup=args.warmup, device=device,
                  clock="events" if device.type == "cuda" else "wall", expect=expect)
    samples, timing = m.samples, {"clock": m.clock, "calls_per_sample": m.calls_per_sample}
    evidence = {k: e.to_dict() for k, e in m.evidence.items()}

    # ratio = median cold / median warm
    cmp = bench.compare(samples["cold"], samples["warm"], evidence=m.evidence["warm"])
    params = {"preset": args.preset, "batch": args.batch, "res": args.res, "max_seq": args.max_seq,
              "rank": args.rank, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed}
    fields = cmp.record_fields()
    fields["metrics"] = {**{f"median_{k}_ms": sorted(v)[len(v) // 2] for k, v in samples.items()},
                         "evidence_by_variant": evidence, "timing": timing, **fields["metrics"]}
    out = Path(args.out)
    rec = store.record("caches_cold_vs_warm_step", **fields, samples=samples, params=params, device=device,
                       store=work / "bench.db", display=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:  # one whole line per run; JSON-lines readers skip nothing partial
        f.write(json.dumps(rec) + "\n")
    med = rec["metrics"]
    print(f"cold {med['median_cold_ms']:.1f} ms, warm {med['median_warm_ms']:.1f} ms "
          f"(from disk {med['median_warm_disk_ms']:.1f} ms): cold/warm = {cmp.ratio:.2f} "
          f"[95% CI {cmp.ci_low:.2f}-{cmp.ci_high:.2f}], {rec['verdict']}; evidence: {cmp.reason[:160]}; "
          f"record appended to {out}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
