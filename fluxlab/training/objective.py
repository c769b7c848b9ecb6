"""The training objective as pure functions: the flow-matching loss, the per-step generators and
the random inputs of one micro-batch.

The objective is flow matching as diffusers' examples/dreambooth/train_dreambooth_lora_flux.py
computes it (see `flow_matching_loss`), reusing diffusers' own helpers.

Randomness: every random draw of a step (latent sample, noise, timesteps) comes from a CPU
generator seeded by (seed, step, micro-batch, rank), so a resumed run draws exactly what the
uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from fluxlab.caches import LatentCache
from fluxlab.config import TrainConfig

VALIDATION_STREAM = 2**62  # the "step" number of the validation draws: beyond any real step


def flow_matching_loss(transformer, latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                       noise: torch.Tensor, u: torch.Tensor, scheduler, *, img_ids: torch.Tensor,
                       txt_ids: torch.Tensor, guidance_scale: float = 3.5, weighting_scheme: str = "none",
                       vae_scale_factor: int = 8) -> torch.Tensor:
    """Rectified-flow loss of one batch, as train_dreambooth_lora_flux.py computes it.

    latents: x0 = (vae_sample - shift) * scale   [B, 16, h, w]   (h = H/8)
    noise:   N(0, 1) like latents                [B, 16, h, w]
    u:       compute_density_for_timestep_sampling(...) draws in [0, 1]   [B]
    scheduler: the pipeline's FlowMatchEulerDiscreteScheduler before any set_timesteps call.
    """
    B, C, h, w = latents.shape
    n_train = scheduler.config.num_train_timesteps
    # u -> a training timestep index. "mode" sampling can reach u = 1 exactly, which indexes one
    # past the table (the reference script would raise there), so clamp.
    indices = (u.cpu() * n_train).long().clamp_(0, n_train - 1)            # [B]
    timesteps = scheduler.timesteps[indices].to(latents.device)            # [B], in (0, 1000]
    # The script looks each timestep up in scheduler.timesteps to get its sigma; that position is
    # `indices` itself (the table holds distinct values), so index directly: no per-item .item().
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype)   # [B]
    sigmas = sigmas.view(B, 1, 1, 1)                                       # [B, 1, 1, 1]

    noisy = (1.0 - sigmas) * latents + sigmas * noise                      # [B, 16, h, w]
    packed = FluxPipeline._pack_latents(noisy, B, C, h, w)                 # [B, h/2 * w/2, 64]

    module = getattr(transformer, "module", transformer)  # unwrap DDP for the config
    guidance = None
    if module.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale], device=latents.device).expand(B)  # [B]

    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]     # [B, h/2 * w/2, 64]
    pred = FluxPipeline._unpack_latents(pred, height=h * vae_scale_factor, width=w * vae_scale_factor,
                                        vae_scale_factor=vae_scale_factor)        # [B, 16, h, w]

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)  # [B, 1, 1, 1]
    target = noise - latents                                               # the velocity x1 - x0
    per_item = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(B, -1), 1)  # [B]
    return per_item.mean()


def flux2_flow_matching_loss(transformer, latents: torch.Tensor, prompt_embeds: torch.Tensor, noise: torch.Tensor,
                             u: torch.Tensor, scheduler, *, guidance_scale: float = 3.5,
                             weighting_scheme: str = "none") -> torch.Tensor:
    """Rectified-flow loss of one FLUX.2 batch, as train_dreambooth_lora_flux2_klein.py computes it.

    latents: x0 = (patchify(vae mode) - bn_mean) / bn_std   [B, 4C, h/2, w/2]   (h = H/8)
    prompt_embeds: the text encoder's stacked hidden states  [B, S, D]
    noise, u, scheduler: as in `flow_matching_loss`; the timestep index is clamped the same way.
    """
    B = latents.shape[0]
    n_train = scheduler.config.num_train_timesteps
    indices = (u.cpu() * n_train).long().clamp_(0, n_train - 1)            # [B]
    timesteps = scheduler.timesteps[indices].to(latents.device)            # [B]
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(B, 1, 1, 1)  # [B, 1, 1, 1]
    noisy = (1.0 - sigmas) * latents + sigmas * noise                      # [B, 4C, h/2, w/2]
    packed = Flux2KleinPipeline._pack_latents(noisy)                       # [B, h/2 * w/2, 4C]
    img_ids = Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device)       # [B, h/2 * w/2, 4]
    txt_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(latents.device)   # [B, S, 4]

    module = getattr(transformer, "module", transformer)
    guidance = None
    if module.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale], device=latents.device).expand(B)  # [B]
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
                       return_dict=False)[0][:, : packed.shape[1]]                 # [B, h/2 * w/2, 4C]
    pred = Flux2KleinPipeline._unpack_latents_with_ids(pred, img_ids)              # [B, 4C, h/2, w/2]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - latents
    per_item = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(B, -1), 1)  # [B]
    return per_item.mean()


def flux2_latents(mean: torch.Tensor, bn_mean: torch.Tensor, bn_std: torch.Tensor) -> torch.Tensor:
    """x0 of FLUX.2: the VAE's mode (its mean), patchified 2x2 and normalised by the VAE's latent
    batch-norm statistics. mean [B, C, h, w] -> [B, 4C, h/2, w/2]; bn_* [4C]."""
    x = Flux2KleinPipeline._patchify_latents(mean.float())
    return (x - bn_mean.view(1, -1, 1, 1)) / bn_std.view(1, -1, 1, 1)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator behind every random draw of (step, micro-batch, rank)."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_step_inputs(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator, cfg: TrainConfig,
                     shift: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, noise, u) for one micro-batch, in this fixed draw order, all on the CPU in fp32.

    x0 = (sample(N(mean, exp(logvar))) - shift) * scale   [B, 16, h, w]
    """
    x0 = LatentCache.sample(mean.float().cpu(), logvar.float().cpu(), generator)
    x0 = (x0 - shift) * scale                                               # [B, 16, h, w]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)  # [B, 16, h, w]
    u = compute_density_for_timestep_sampling(
        weighting_scheme=cfg.timestep_sampling, batch_size=x0.shape[0], logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, device="cpu", generator=generator)  # [B]
    return x0, noise, u


def micro_inputs(mb: dict, g: torch.Generator, cfg: TrainConfig, latent_cache, shift: float, scale: float,
                 device: torch.device, dtype: torch.dtype, bn: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Move one micro-batch to the device and draw its (x0, noise, u); returns
    (x0, noise, u, prompt_embeds, pooled). A micro-batch of pixels (per-epoch augmentation) is
    encoded now through `latent_cache`. With `bn` (FLUX.2: the VAE's latent batch-norm mean and
    std) x0 is `flux2_latents` of the VAE mode, nothing is sampled for it, and pooled is None."""
    if "mean" not in mb:
        means, logvars = [], []
        for pix, sha in zip(mb["pixels"], mb["image_sha256"]):
            # A true random_* key makes the cache bypass itself (encode, store nothing).
            m, lv = latent_cache.get(sha, {"random_augment": True}, lambda pix=pix: pix)
            means.append(m)
            logvars.append(lv)
        mb = {**mb, "mean": torch.stack(means), "logvar": torch.stack(logvars)}
    if bn is not None:
        x0 = flux2_latents(mb["mean"], *bn)                                  # [B, 4C, h/2, w/2]
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=cfg.timestep_sampling, batch_size=x0.shape[0], logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, device="cpu", generator=g)  # [B]
        pooled = None
    else:
        x0, noise, u = draw_step_inputs(mb["mean"], mb["logvar"], g, cfg, shift, scale)
        pooled = mb["pooled"].to(device, dtype, non_blocking=True)
    return (x0.to(device, dtype, non_blocking=True), noise.to(device, dtype, non_blocking=True), u,
            mb["prompt_embeds"].to(device, dtype, non_blocking=True), pooled)


def random_batch(config, cfg: TrainConfig, vae_scale_factor: int, device, batch_size: int = 1,
                 resolution: int = 1024, seq_len: int | None = None) -> dict:
    """A micro-batch of the transformer's real input shapes (`config`: its config) with random
    values, for benchmarks."""
    h = w = resolution // vae_scale_factor
    S = seq_len or cfg.max_sequence_length
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    batch = {"mean": torch.randn(batch_size, config.in_channels // 4, h, w, generator=g).to(device),
             "logvar": torch.full((batch_size, config.in_channels // 4, h, w), -4.0).to(device),
             "prompt_embeds": torch.randn(batch_size, S, config.joint_attention_dim, generator=g).to(device)}
    if "pooled_projection_dim" in config:  # FLUX.1 (FLUX.2 has no pooled embedding)
        batch["pooled"] = torch.randn(batch_size, config.pooled_projection_dim, generator=g).to(device)
    return batch


@torch.no_grad()
def validation_loss(loss_fn, transformer, items: list[dict], seed: int) -> float:
    """Loss on the held-out items with fixed latents, noise and timesteps (the same every call:
    a generator stream training never draws). `loss_fn(model, micro_batch, generator)`."""
    transformer.eval()
    losses = [loss_fn(transformer, {k: v[None] for k, v in item.items() if isinstance(v, torch.Tensor)},
                      step_generator(seed, VALIDATION_STREAM, j, 0)).item() for j, item in enumerate(items)]
    transformer.train()
    return float(np.mean(losses))
