"""Everything the trainer builds before its first step: the process group, the pipeline (and its
quantized base), the adapter (peft LoRA or a sparse delta), attention, the fused kernels, compile,
DDP and the optimizer. Also the small distributed helpers the other training modules share."""

from __future__ import annotations

import gc
import inspect
import os
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from fluxlab import attention, fusion, kernels, models, quant
from fluxlab.config import ConfigError, TrainConfig


# --- distributed helpers ------------------------------------------------------------------------
def _dist():
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def gather(obj) -> list:
    d = _dist()
    if not d:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any (DDP ranks must stop at the same step)."""
    d = _dist()
    if not d:
        return flag
    t = torch.tensor([int(flag)], device=device if d.get_backend() == "nccl" else "cpu")
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return bool(t.item())


def init_distributed(cfg: TrainConfig) -> bool:
    """Join the process group torchrun describes; True when this call created it (and must end it)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
        return True
    return False


def destroy_distributed() -> None:
    if _dist():
        dist.destroy_process_group()


# --- the pipeline -------------------------------------------------------------------------------
def load_pipeline(cfg: TrainConfig, pipe, device: torch.device, dtype: torch.dtype, with_data: bool):
    """The pipeline's parts the data pass needs: scheduler, VAE, tokenizers and (with data) the text
    encoders, on `device`, without the transformer: `load_transformer` loads that once the caches
    are filled and the encoders freed, so they never share the GPU. A preloaded `pipe` is used
    as it is."""
    if pipe is not None:
        return pipe
    return models.load_pipeline(cfg.model, device=device, dtype=dtype, seed=0, transformer=False,
                                encoders=with_data)


def load_transformer(cfg: TrainConfig, pipe, device: torch.device, dtype: torch.dtype):
    """The transformer to train: a preloaded pipeline's (moved to `device`), or the config's model
    loaded, quantized when asked."""
    if pipe is not None and pipe.transformer is not None:
        tr = pipe.transformer
        p = next(tr.parameters())
        if p.device != device or p.dtype != dtype:
            tr.to(device, dtype)
    elif cfg.quantize != "none":
        tr = quantized_transformer(cfg, device, dtype)
    else:
        tr = models.load_transformer(cfg.model, device=device, dtype=dtype, seed=0)
    return tr


def quantized_transformer(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """QLoRA base: the transformer in NF4 / int8 with diffusers' BitsAndBytesConfig settings."""
    if models.family_of(cfg.model) == "flux2":
        raise ConfigError(f"quantize: {cfg.quantize} base weights are FLUX.1-only for now; set quantize=none "
                          f"for {cfg.model}")
    try:
        import bitsandbytes  # noqa: F401  (an availability check)
    except ImportError:
        raise ConfigError("quantize: bitsandbytes is not installed; pip install 'fluxlab[quant]'") from None
    if cfg.model in models.REAL_PRESETS:
        # Random-weight presets have no checkpoint to load quantized: swap the layers in place.
        tr = models.build_transformer(cfg.model, device, dtype, seed=0)
        quant.quantize_transformer(tr, cfg.quantize, dtype)
    else:
        root = models.tiny_pipeline_path() if cfg.model == "tiny" else Path(cfg.model)
        tr = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", local_files_only=True,
                                                    quantization_config=quant.bnb_config(cfg.quantize, dtype),
                                                    dtype=dtype)
    tr.requires_grad_(False)
    return tr


def release_encoders(pipe, device: torch.device) -> dict[str, float]:
    """Drop the pipeline's VAE and text encoders (this process built them: nothing else holds
    them once the caches are filled) and return the device memory before and after, in GiB.
    On the GPU `freed_gib` is what the encoders held; the transformer loads after this."""
    def allocated() -> float:
        return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0

    before = allocated()
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:  # FLUX.2 has no text_encoder_2
            setattr(pipe, name, None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    after = allocated()
    return {"with_encoders_gib": before, "after_release_gib": after, "freed_gib": before - after}


def latent_bn(pipe) -> tuple[torch.Tensor, torch.Tensor] | None:
    """FLUX.2 normalises patchified latents by its VAE's batch-norm statistics: (mean, std) [4C] on
    the CPU; None for FLUX.1 (shift and scale instead). Without a VAE (random benchmark batches)
    the identity."""
    if models.family_of_pipeline(pipe) != "flux2":
        return None
    vae = pipe.vae
    if vae is None:
        return torch.zeros(128), torch.ones(128)  # FLUX.2's 32 latent channels, patchified 2x2
    std = torch.sqrt(vae.bn.running_var.float() + vae.config.batch_norm_eps)
    return vae.bn.running_mean.float().cpu(), std.cpu()


def vae_constants(vae) -> tuple[float, float, int]:
    """(shift, scale, spatial factor) of the VAE latents; FLUX's when the pipeline has no VAE."""
    if vae is None:
        return models.FLUX_VAE_SHIFT, models.FLUX_VAE_SCALE, 8
    if getattr(vae.config, "shift_factor", None) is None:  # FLUX.2's VAE: batch-norm statistics instead
        return 0.0, 1.0, 2 ** (len(vae.config.block_out_channels) - 1)
    return (float(vae.config.shift_factor), float(vae.config.scaling_factor),
            2 ** (len(vae.config.block_out_channels) - 1))


# --- the adapter and the model ------------------------------------------------------------------
def add_adapter(tr, cfg: TrainConfig):
    """Freeze the base, add the adapter (same init on every rank and run), install attention, the
    fused kernels and compile. Returns the kernels' patch report (None without use_kernels)."""
    tr.requires_grad_(False)                      # base weights frozen
    torch.manual_seed(cfg.seed)                   # same adapter init on every rank and every run
    if cfg.adapter == "lora":
        tr.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                  init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))
    else:
        from fluxlab.kernels import sparse_delta

        sparse_delta.apply_sparse_adapter(tr, list(cfg.target_modules), cfg.sparse_density, cfg.seed)
    if not any(p.requires_grad for p in tr.parameters()):
        raise ConfigError(f"target_modules: {cfg.target_modules} matched no module of the transformer; "
                          f"use suffixes such as attn.to_q")
    cast_training_params(tr, dtype=torch.float32)  # trainable params in fp32; base stays bf16 on GPU
    if cfg.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    # Always through fluxlab.attention, "auto" included: stock SDPA picks cuDNN on Hopper, whose
    # backward breaks inside FLUX training (see fluxlab/attention.py); this path carries the fix.
    attention.install(tr, cfg.attention_backend)
    report = kernels.patch(tr) if cfg.use_kernels else None  # after install: keeps the chosen backend
    if cfg.fuse_projections:
        fusion.fuse_projections(tr)  # after the adapter and before compile (the bases become views)
    if cfg.compile:
        # By position (kernels.patch renames block classes); static shapes: one graph per aspect bucket.
        models.compile_blocks(tr, fullgraph=True, dynamic=False, mode=cfg.compile_mode)
    tr.train()
    return report


def wrap_ddp(tr, device: torch.device):
    """The model the step runs: `tr` itself, or DDP around it when there are several processes."""
    if world() == 1:
        return tr
    kw = {}
    if "init_sync" in inspect.signature(DDP.__init__).parameters:
        kw["init_sync"] = False  # weights are identical by construction; skip broadcasting 12B params
    return DDP(tr, device_ids=[device.index] if device.type == "cuda" else None, **kw)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    """(AdamW over the trainable `params` only: frozen ones never get Adam state, its lr schedule)."""
    # Fused on the GPU: one kernel over every LoRA tensor instead of foreach's several per group.
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused or None)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                    num_training_steps=cfg.steps)


def freeze(transformer, optimizer, names) -> int:
    """Freeze trainable parameters by name and drop their optimizer state (and their slot in the
    optimizer), so frozen parameters hold no Adam moments. Returns how many were frozen."""
    names = set(names)
    params = {n: p for n, p in transformer.named_parameters() if n in names and p.requires_grad}
    ids = {id(p) for p in params.values()}
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
        optimizer.state.pop(p, None)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    return len(params)
