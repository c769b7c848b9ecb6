"""FLUX.2 [klein] LoRA training on the tiny offline pipeline: the loss as diffusers'
train_dreambooth_lora_flux2_klein.py computes it (an independent step-by-step recomputation), the
shipped config training with falling loss, the caches holding Qwen3 embeddings, the LoRA loading
into stock Flux2KleinPipeline at its trained strength, and bitwise resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxlab.config import load_config
from fluxlab.trainer import LORA_FILE, Trainer

ROOT = Path(__file__).resolve().parents[2]


def _cfg(shapes, out, **kw):
    base = {"data": str(shapes), "output_dir": str(out), "num_workers": "0", "progress": "false",
            "max_sequence_length": "64", "batch_size": "2", "steps": "4", "rank": "4", "lora_alpha": "8",
            "device": "cpu", "log_every": "1", "lr_warmup_steps": "0", "validation_every": "0",
            "checkpoint_every": "0", "learning_rate": "1e-2"}
    base.update({k: str(v) for k, v in kw.items()})
    return load_config(ROOT / "configs" / "tiny-flux2.yaml", base)


@pytest.fixture(scope="module")
def klein(home):
    from diffusers import Flux2KleinPipeline

    from fluxlab import flux2

    return Flux2KleinPipeline.from_pretrained(flux2.tiny_flux2_pipeline_path(), local_files_only=True)


@pytest.mark.parametrize("scheme", ["none", "logit_normal"])
def test_flux2_loss_matches_an_independent_recomputation(klein, shapes, tmp_path, scheme):
    """Recompute the klein script's loss from raw pixels and captions with diffusers' helpers."""
    from diffusers import Flux2KleinPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from fluxlab.data import ImageCaptionDataset

    cfg = _cfg(shapes, tmp_path, timestep_sampling=scheme)
    tr = Trainer(cfg).setup()
    ds = ImageCaptionDataset(shapes, cfg.resolution)
    vae, sched = klein.vae, klein.scheduler
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    try:
        for step in range(2):  # step 0: LoRA B == 0; step 1: after a real update
            mb = tr.next_micro_batch()
            idx = mb["index"]
            with torch.no_grad():
                pixels = torch.stack([ds[i]["pixels"] for i in idx])                      # [B, 3, 64, 64]
                lat = torch.cat([vae.encode(p[None]).latent_dist.mode() for p in pixels])  # [B, 32, 8, 8]
                x0 = (Flux2KleinPipeline._patchify_latents(lat) - bn_mean) / bn_std        # [B, 128, 4, 4]
                embeds, text_ids = klein.encode_prompt([ds.records[i][1] for i in idx],
                                                       max_sequence_length=cfg.max_sequence_length)
                g = torch.Generator().manual_seed(0)
                g.set_state(tr.generator_for(step, 0).get_state())
                noise = torch.randn(x0.shape, generator=g)
                B = x0.shape[0]
                u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=B, logit_mean=0.0,
                                                          logit_std=1.0, mode_scale=1.29, generator=g)
                t = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
                sig = sched.sigmas[[(sched.timesteps == ti).nonzero().item() for ti in t]].view(B, 1, 1, 1)
                noisy = (1 - sig) * x0 + sig * noise
                packed = Flux2KleinPipeline._pack_latents(noisy)                          # [B, 16, 128]
                ids = Flux2KleinPipeline._prepare_latent_ids(noisy)                       # [B, 16, 4]
                pred = tr.transformer(hidden_states=packed, timestep=t / 1000, guidance=None,
                                      encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                      return_dict=False)[0][:, : packed.shape[1]]
                pred = Flux2KleinPipeline._unpack_latents_with_ids(pred, ids)
                wgt = compute_loss_weighting_for_sd3(scheme, sig)
                ref = torch.mean((wgt * (pred - (noise - x0)) ** 2).reshape(B, -1), 1).mean().item()
            got = tr.step([mb])["loss"].item()
            assert abs(got - ref) <= 1e-6 * max(1.0, abs(ref)), (step, got, ref)
        assert any(p.abs().sum() > 0 for n, p in tr.trainable_parameters().items() if "lora_B" in n)
    finally:
        tr.close()


@pytest.fixture(scope="module")
def cli_run(shapes, home, tmp_path_factory):
    """`fluxlab train configs/tiny-flux2.yaml` through the CLI, as shipped (data and output moved; alpha
    16 at rank 8, so the LoRA's scale is 2)."""
    from fluxlab.cli import main

    out = tmp_path_factory.mktemp("flux2_run")
    rc = main(["train", str(ROOT / "configs" / "tiny-flux2.yaml"), "--set", f"data={shapes}",
               "--set", f"output_dir={out}", "--set", "progress=false", "--set", "validation_size=2",
               "--set", "log_every=5", "--set", "max_sequence_length=64", "--set", "lora_alpha=16"])
    assert rc == 0
    return out


def test_shipped_flux2_config_trains_and_its_loss_falls(cli_run):
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in rows])
    assert len(rows) == 40 and np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean()
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0]
    summary = json.loads((cli_run / "train_summary.json").read_text())
    text = summary["cache_stats"]["text"]
    assert text["hits"] + text["misses"] == 16 and summary["steps_done"] == 40


def test_stock_flux2_load_lora_weights_reproduces_the_trained_transformer(cli_run, klein, home):
    """The saved LoRA (rank 8, alpha 16: scale 2, not the rank's 1) loads into a fresh stock
    Flux2KleinPipeline and gives the trained transformer's output; a missing or mis-scaled load could not."""
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import load_file

    from fluxlab import flux2

    stock = Flux2KleinPipeline.from_pretrained(flux2.tiny_flux2_pipeline_path(), local_files_only=True)
    c = stock.transformer.config
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, c.in_channels, 4, 4, generator=g)                          # [B, 128, 4, 4]
    emb = torch.randn(2, 8, c.joint_attention_dim, generator=g)                      # [B, S, D]
    inputs = dict(hidden_states=Flux2KleinPipeline._pack_latents(lat), encoder_hidden_states=emb,
                  timestep=torch.tensor([0.3, 0.8]), guidance=None, img_ids=Flux2KleinPipeline._prepare_latent_ids(lat),
                  txt_ids=Flux2KleinPipeline._prepare_text_ids(emb), return_dict=False)
    with torch.no_grad():
        base = stock.transformer(**inputs)[0]
    stock.load_lora_weights(str(cli_run), weight_name=LORA_FILE)
    # Our own transformer with the same adapter weights applied by hand: base + LoRA from the file.
    ours = Flux2KleinPipeline.from_pretrained(flux2.tiny_flux2_pipeline_path(), local_files_only=True).transformer
    lora = load_file(cli_run / LORA_FILE)
    assert lora and all(k.startswith("transformer.") for k in lora)
    scales = {m.scaling["default_0"] for m in stock.transformer.modules()
              if "default_0" in getattr(m, "scaling", {})}
    assert scales == {2.0}, scales  # read from the file's metadata, not guessed from the rank
    with torch.no_grad():
        for name, mod in ours.named_modules():
            a, b = lora.get(f"transformer.{name}.lora_A.weight"), lora.get(f"transformer.{name}.lora_B.weight")
            if a is not None:
                mod.weight += 2.0 * b @ a                                            # scale alpha / r = 2
        want = ours(**inputs)[0]
        got = stock.transformer(**inputs)[0]
    assert (want - base).abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flux2_resume_is_bitwise(shapes, tmp_path, home):
    """4 steps in one go against 2 steps, a checkpoint, and 2 more after --resume."""
    from fluxlab.training.state import adapter_digest

    def run(out, steps, resume=None):
        t = Trainer(_cfg(shapes, out, steps=steps, checkpoint_every=2), resume=resume)
        try:
            res = t.setup().train()
        finally:
            t.close()
        return res, adapter_digest(t.trainable_parameters())

    full, d_full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, d_res = run(tmp_path / "b", 4, resume="latest")
    assert resumed.start_step == 2 and resumed.steps_done == 4
    assert d_res == d_full


@pytest.mark.parametrize("preset,expected", [("flux2-klein-4b", 3.88e9), ("flux2-klein-9b", 9.08e9),
                                             ("flux2-dev", 32.2e9)])
def test_real_flux2_presets_have_their_parameter_counts(preset, expected):
    from fluxlab import models

    tr = models.load_transformer(preset, device="meta", dtype=torch.bfloat16)
    n = models.param_count(tr)
    assert abs(n - expected) / expected < 0.01, n
    assert type(tr).__name__ == "Flux2Transformer2DModel" and models.family_of(preset) == "flux2"
    pipe = models.load_pipeline(preset, device="meta", dtype=torch.bfloat16, transformer=False, encoders=False)
    assert pipe.transformer is None and pipe.scheduler.config.use_dynamic_shifting


def test_a_real_flux2_preset_with_data_is_refused_in_one_line(shapes, tmp_path, capsys):
    from fluxlab.cli import main

    rc = main(["train", str(ROOT / "configs" / "tiny-flux2.yaml"), "--set", f"data={shapes}", "--set",
               f"output_dir={tmp_path / 'run'}", "--set", "model=flux2-klein-4b", "--set", "device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "flux2-klein-4b" in err[0] and "tiny-flux2" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_flux2_steps_on_random_batches_without_data(home, tmp_path):
    """The benchmark path (no dataset, no encoders): random batches of the model's real input shapes."""
    cfg = load_config(ROOT / "configs" / "tiny-flux2.yaml", {"output_dir": str(tmp_path), "device": "cpu",
                                                            "progress": "false", "rank": "4"})
    t = Trainer(cfg).setup(with_data=False)
    batch = t.random_batch(batch_size=2, resolution=64, seq_len=16)
    assert "pooled" not in batch and batch["mean"].shape == (2, 32, 8, 8)
    losses = [t.step([batch])["loss"].item() for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] != losses[0]


def test_fluxlab_generate_uses_the_trained_flux2_lora(cli_run, tmp_path, capsys):
    """`fluxlab generate --model tiny-flux2 --lora DIR` writes an image that the LoRA changed, and the
    same seed gives the same image; a missing LoRA is one line and writes nothing."""
    from PIL import Image

    from fluxlab.cli import main

    def gen(name, *extra):
        out = tmp_path / f"{name}.png"
        args = ["generate", "--model", "tiny-flux2", "--prompt", "a large red circle at the center", "--steps", "2",
                "--size", "64", "--max-sequence-length", "64", "--device", "cpu", "--out", str(out), *extra]
        assert main(args) == 0
        return np.asarray(Image.open(out), dtype=np.float32)                     # [64, 64, 3]

    base, with_lora, again = gen("base"), gen("lora", "--lora", str(cli_run)), gen("again", "--lora", str(cli_run))
    assert base.shape == (64, 64, 3) and base.std() > 0
    assert np.array_equal(with_lora, again)
    assert np.abs(with_lora - base).max() > 0
    capsys.readouterr()
    missing = tmp_path / "nothing"
    assert main(["generate", "--model", "tiny-flux2", "--lora", str(missing), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and not (tmp_path / "x.png").exists()
