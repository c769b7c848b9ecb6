"""Trainer: loss parity with an independent recomputation, the CLI run whose loss falls, the
diffusers-format LoRA in a stock FluxPipeline, and the optimizer holding nothing for frozen params."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fluxlab import models
from fluxlab.config import load_config
from fluxlab.trainer import LORA_FILE, Trainer

ROOT = Path(__file__).resolve().parents[2]


def _cfg(shapes, out, **kw):
    base = {"data": str(shapes), "output_dir": str(out), "num_workers": "0", "progress": "false",
            "max_sequence_length": "16", "batch_size": "2", "steps": "4", "rank": "4", "device": "cpu",
            "log_every": "1", "lr_warmup_steps": "0"}
    base.update({k: str(v) for k, v in kw.items()})
    return load_config(ROOT / "configs" / "tiny.yaml", base)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "cosmap"])
def test_loss_matches_an_independent_recomputation(pipe, shapes, tmp_path, scheme):
    """Recompute train_dreambooth_lora_flux.py's loss step by step from raw pixels and captions,
    with diffusers' helpers called directly, and match the trainer's loss to 1e-6 in fp32."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from fluxlab.data import ImageCaptionDataset

    cfg = _cfg(shapes, tmp_path, timestep_sampling=scheme, validation_every=0, lr_warmup_steps=0,
               learning_rate=1e-2, checkpoint_every=0)
    tr = Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    ds = ImageCaptionDataset(shapes, cfg.resolution)
    vae, sched = pipe.vae, copy.deepcopy(pipe.scheduler)
    for step in range(2):  # step 0: LoRA B == 0; step 1: after a real update
        mb = tr.next_micro_batch()
        idx = mb["index"]
        with torch.no_grad():
            pixels = torch.stack([ds[i]["pixels"] for i in idx])                  # [B, 3, 64, 64]
            dists = [vae.encode(p[None]).latent_dist for p in pixels]
            mean = torch.cat([d.mean for d in dists])                               # [B, 16, 8, 8]
            std = torch.cat([d.std for d in dists])
            enc = [pipe.encode_prompt(ds.records[i][1], max_sequence_length=cfg.max_sequence_length) for i in idx]
            embeds = torch.cat([e[0] for e in enc])                                 # [B, S, 32]
            pooled = torch.cat([e[1] for e in enc])                                 # [B, 32]
            g = torch.Generator().manual_seed(0)
            g.set_state(tr.generator_for(step, 0).get_state())
            x0 = mean + std * torch.randn(mean.shape, generator=g)
            x0 = (x0 - vae.config.shift_factor) * vae.config.scaling_factor
            noise = torch.randn(x0.shape, generator=g)
            B, C, h, w = x0.shape
            u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=B, logit_mean=0.0,
                                                      logit_std=1.0, mode_scale=1.29, generator=g)
            t = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
            # sigmas as the script's get_sigmas: find each timestep in the schedule
            sig = sched.sigmas[[(sched.timesteps == ti).nonzero().item() for ti in t]].view(B, 1, 1, 1)
            noisy = (1 - sig) * x0 + sig * noise
            packed = FluxPipeline._pack_latents(noisy, B, C, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32)
            txt_ids = torch.zeros(embeds.shape[1], 3)
            pred = tr.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((B,), 3.5),
                                  pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                                  img_ids=img_ids, return_dict=False)[0]
            pred = FluxPipeline._unpack_latents(pred, h * 8, w * 8, 8)
            wgt = compute_loss_weighting_for_sd3(scheme, sig)
            ref = torch.mean((wgt * (pred - (noise - x0)) ** 2).reshape(B, -1), 1).mean().item()
        got = tr.step([mb])["loss"].item()
        assert abs(got - ref) <= 1e-6, (step, got, ref)
    # The update moved the LoRA, so step 1 was computed with a changed model (not a no-op check).
    assert any(p.abs().sum() > 0 for n, p in tr.trainable_parameters().items() if "lora_B" in n)


def test_use_kernels_runs_every_patched_family_in_a_training_step(pipe, shapes, tmp_path):
    from fluxlab import attention, kernels

    cfg = _cfg(shapes, tmp_path, use_kernels=True, validation_every=0, checkpoint_every=0)
    tr = Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    kernels.reset_counters()
    attention.reset_counters()
    tr.step([tr.next_micro_batch()])
    ran = kernels.family_totals()
    patched = {f for f, n in tr.patch_report.patched.items() if n}
    assert {"qk_norm_rope", "adaln"} <= patched
    assert all(ran[f] > 0 for f in patched), (ran, tr.patch_report)
    # The fused processor still attends through fluxlab.attention (the cuDNN fix lives there).
    assert sum(attention.counters().values()) == len(tr.transformer.transformer_blocks) + len(
        tr.transformer.single_transformer_blocks)


def test_frozen_parameters_hold_no_optimizer_state(pipe, shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path, validation_every=0, checkpoint_every=0)
    tr = Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    for _ in range(2):
        tr.step([tr.next_micro_batch()])

    def audit():
        frozen = [p for p in tr.transformer.parameters() if not p.requires_grad]
        in_opt = [p for g in tr.optimizer.param_groups for p in g["params"]]
        return frozen, in_opt

    frozen, in_opt = audit()
    assert len(frozen) > 0 and all(p.requires_grad for p in in_opt)
    assert not any(p in tr.optimizer.state for p in frozen)
    assert len(tr.optimizer.state) == len(in_opt) > 0      # every trainable param has Adam moments
    # Freeze half the LoRA mid-run: their Adam state must go too.
    names = sorted(tr.trainable_parameters())[::2]
    assert tr.freeze(names) == len(names)
    frozen, in_opt = audit()
    assert not any(p in tr.optimizer.state for p in frozen)
    assert len(in_opt) == len(tr.trainable_parameters())
    tr.step([tr.next_micro_batch()])                        # still trains
    assert not any(p in tr.optimizer.state for p in audit()[0])


@pytest.fixture(scope="module")
def cli_run(shapes, home, tmp_path_factory):
    """`fluxlab train configs/tiny.yaml` through the CLI, with DataLoader workers."""
    from fluxlab.cli import main

    out = tmp_path_factory.mktemp("cli_run")
    rc = main(["train", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data={shapes}", "--set", f"output_dir={out}",
               "--set", "steps=40", "--set", "num_workers=1", "--set", "validation_size=2", "--set",
               "validation_every=10", "--set", "checkpoint_every=20", "--set", "progress=false",
               "--set", "learning_rate=3e-3", "--set", "log_every=5"])
    assert rc == 0
    return out


def test_cli_training_loss_falls(cli_run):
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    losses = np.array([r["loss"] for r in rows])
    assert np.isfinite(losses).all()
    # Training loss is noisy (random noise and timesteps per step): compare window means.
    assert losses[-10:].mean() < losses[:10].mean()
    # The validation loss uses fixed latents, noise and timesteps, so it shows the trend cleanly.
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0]
    # Grad norm only on logging steps; data wait recorded every step.
    assert [r["step"] for r in rows if "grad_norm" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(r["data_wait_s"] >= 0 for r in rows)
    for name in ("loss.png", "lr.png", "grad_norm.png", LORA_FILE, "config.yaml"):
        assert (cli_run / name).stat().st_size > 0, name
    assert (cli_run / "checkpoints" / "step_40" / "manifest.json").exists()
    assert yaml.safe_load((cli_run / "config.yaml").read_text())["steps"] == 40


def test_lora_loads_into_a_stock_flux_pipeline_and_changes_the_output(cli_run, home):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    stock = FluxPipeline.from_pretrained(models.tiny_pipeline_path(), local_files_only=True)

    def render():
        return stock("a large red circle at the top left on a white background", height=64, width=64,
                     num_inference_steps=2, generator=torch.Generator().manual_seed(0), max_sequence_length=16,
                     output_type="pt").images

    before = render()
    saved = load_file(str(cli_run / LORA_FILE))
    assert saved and all(k.startswith("transformer.") for k in saved)
    stock.load_lora_weights(str(cli_run), weight_name=LORA_FILE)
    # Every saved tensor landed in the transformer (nothing dropped as an unexpected key).
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(stock.transformer, adapter_name=stock.get_active_adapters()[0])
    assert {f"transformer.{k}" for k in loaded} == set(saved)
    for k, v in loaded.items():
        assert torch.equal(v, saved[f"transformer.{k}"]), k
    after = render()
    assert (after - before).abs().max() > 1e-4


def test_out_of_memory_reports_the_step_and_checkpoints_the_last_completed_one(pipe, shapes, tmp_path):
    from fluxlab.checkpoints import load_checkpoint
    from fluxlab.trainer import TrainingOOM

    cfg = _cfg(shapes, tmp_path, steps=5, validation_every=0, checkpoint_every=0)
    tr = Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    calls = {"n": 0}

    def fault(module, args):  # fault injection: the third forward pass runs out of memory
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    tr.transformer.register_forward_pre_hook(fault)
    with pytest.raises(TrainingOOM) as info:
        tr.train()
    msg = str(info.value)
    assert "at step 3 (during forward)" in msg and "largest known tensors" in msg
    assert "resolution" in msg and "quantize=nf4" in msg
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "step_2")   # verified on load
    assert ckpt.step == 2
    # Resume must start at step 3's batches: the sampler cursor is where step 2 left it
    # (batch 2, accumulation 1: two batches consumed), not past the failed step's batch.
    assert ckpt.state["sampler"]["cursor"] == 2 * cfg.gradient_accumulation, ckpt.state["sampler"]
    for name, p in tr.trainable_parameters().items():           # params of the last completed step
        assert torch.equal(ckpt.tensors[name], p.detach()), name


@pytest.mark.parametrize("flip", [False, True])
def test_encoders_are_freed_before_the_transformer_loads(shapes, tmp_path, home, monkeypatch, flip):
    """The trainer fills the caches with the VAE and text encoders, lets them go, and only then
    loads the transformer: at that moment nothing holds the encoders any more (weak references are
    dead), so on a GPU they never share memory with the transformer. With random flips the VAE
    must stay (it encodes every step) and the text encoders still go."""
    import gc
    import weakref

    refs, seen = {}, {}
    real_pipeline, real_transformer = models.load_pipeline, models.load_transformer

    def load_pipeline(*a, **k):
        p = real_pipeline(*a, **k)
        assert p.transformer is None          # the encoders come alone
        refs.update({n: weakref.ref(getattr(p, n)) for n in ("vae", "text_encoder", "text_encoder_2")})
        return p

    def load_transformer(*a, **k):
        gc.collect()
        seen.update({n: r() is not None for n, r in refs.items()})
        return real_transformer(*a, **k)

    monkeypatch.setattr(models, "load_pipeline", load_pipeline)
    monkeypatch.setattr(models, "load_transformer", load_transformer)
    t = Trainer(_cfg(shapes, tmp_path / "run", random_flip=flip, validation_every=0)).setup()
    try:
        assert seen == {"vae": flip, "text_encoder": False, "text_encoder_2": False}
        assert (t.data.latent_cache is not None) == flip
        assert t.cache_stats["text"]["misses"] + t.cache_stats["text"]["hits"] == 16
        out = t.step([t.next_micro_batch()])      # and it still trains (encoding every step with flips)
        assert torch.isfinite(out["loss"])
    finally:
        t.close()
