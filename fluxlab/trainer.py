"""FLUX LoRA training: one step, top to bottom, in this file.

    fluxlab train configs/tiny.yaml [--set key=value ...] [--resume latest|DIR] [--profile N]
    fluxlab lr-find configs/tiny.yaml

Python API
----------
    trainer = Trainer(cfg)                   # cfg: fluxlab.config.TrainConfig
    trainer.setup()                          # data, caches, model + adapter, optimizer, resume
    result = trainer.train()                 # TrainResult(final_loss, losses, lora_path, ...)

Timing one step in isolation (benchmarks/train.py): no dataset, no caches, random inputs of
the model's real shapes:

    trainer = Trainer(cfg); trainer.setup(with_data=False)
    batch = trainer.random_batch(batch_size=1, resolution=1024)
    out = trainer.step([batch])              # dict(loss, lr, grad_norm): one optimizer step
    # `step` takes a list of micro-batches (len == gradient_accumulation); each is a dict of
    # mean/logvar [B, 16, H/8, W/8] (VAE latent distribution), prompt_embeds [B, S, D],
    # pooled [B, Dp]. Tensors may be on the CPU or the device. Nothing is synchronised except
    # what the math needs; call torch.cuda.synchronize() around it when timing.

The objective is flow matching as diffusers' examples/dreambooth/train_dreambooth_lora_flux.py
computes it (see `flow_matching_loss`), reusing diffusers' own helpers.

Randomness: every random draw of a step (latent sample, noise, timesteps) comes from a CPU
generator seeded by (seed, step, micro-batch, rank), so a resumed run draws exactly what the
uninterrupted one would. The global RNG (LoRA dropout) is checkpointed per rank.

Exit codes of `fluxlab train`: 0 done; 2 bad config, data, checkpoint or output folder (one line
naming the field or file); 3 CUDA out of memory (message has the step, memory and hints); 4 the
loss or gradient became non-finite (message names the step and cause; nothing written after it);
130 / 143 stopped by SIGINT / SIGTERM (128 + the signal): a signal during the loop finishes the
step and writes a checkpoint first, one during start-up stops at once, one during the final save
lets that save finish. A second signal aborts at once (every file is still whole: writes are atomic).

Output folders: fluxlab marks a run folder with `.fluxlab-run`. A new run refuses a folder that
holds an earlier run (pass --resume to continue it, or --overwrite to move it aside to
`<output_dir>.replaced-<time>`; nothing is deleted), a folder it did not create that holds other
files, the filesystem root and the home folder. Hidden leftovers of a killed save or retention
(`checkpoints/.tmp-*`, `.del-*`, `.old-*`, `.lora-*`, `.<file>.*.tmp`) are removed at the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxlab import checkpoints, models
from fluxlab._atomic import atomic_write_bytes, atomic_write_text
from fluxlab.checkpoints import CheckpointError
from fluxlab.config import ConfigError, TrainConfig, load_config
from fluxlab.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
RUN_MARKER = ".fluxlab-run"
EXIT_OOM = 3
EXIT_NONFINITE = 4
VALIDATION_STREAM = 2**62  # the "step" number of the validation draws: beyond any real step
# What a run writes at the top of its folder: a folder holding any of these holds an earlier run.
RUN_OUTPUTS = (LORA_FILE, "sparse_delta.safetensors", "metrics.jsonl", "train_summary.json", "checkpoints")


class TrainingOOM(RuntimeError):
    """CUDA ran out of memory; the message holds the step, memory numbers and what to try."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss, a gradient or a trained parameter became non-finite; names the step and the cause."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped start-up, or a second signal aborted a run; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- output folders -----------------------------------------------------------------------------
def _forbidden_output(path: Path) -> str | None:
    """Why `path` can never be a run folder (the filesystem root, home or one of its parents)."""
    p = path.expanduser().resolve()
    if p == Path(p.anchor):
        return "is the filesystem root"
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry: nothing to protect there
        return None
    if p == home:
        return "is your home folder"
    if p in home.parents:
        return "is a parent of your home folder"
    return None


def _holds_run(out: Path) -> list[str]:
    """The earlier-run outputs in `out` (empty when it holds none)."""
    found = [n for n in RUN_OUTPUTS if (out / n).exists()]
    if "checkpoints" in found and not any((out / "checkpoints").iterdir()):
        found.remove("checkpoints")
    return found


def check_output_dir(out: Path, *, resume, overwrite: bool, new_run: bool = True) -> str:
    """Refuse an output folder fluxlab must not write into; read-only. `new_run=False` (lr-find)
    accepts fluxlab's folder of an earlier run: it writes its own files beside that run's.

    Returns "new" (absent or empty), "owned" (marked by fluxlab) or "legacy" (an unmarked folder of
    an older fluxlab run, adopted only to resume it). Raises ConfigError naming output_dir.
    """
    why = _forbidden_output(out)
    if why:
        raise ConfigError(f"output_dir: {out} {why}; name a folder of its own, e.g. runs/train/my-run")
    if resume is not None and overwrite:
        raise ConfigError("--overwrite starts a new run and --resume continues one: pass only one")
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder; choose another output_dir")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return "new"
    if RUN_MARKER not in entries:
        known = set(RUN_OUTPUTS) | {"config.yaml", "loss.png", "lr.png", "grad_norm.png", "profile", "lr_find.json",
                                    "lr_find.png"}
        ckpts = out / "checkpoints"
        legacy = (resume is not None and set(entries) <= known and ckpts.is_dir()
                  and any((d / checkpoints.MANIFEST_FILE).is_file() for _, d in checkpoints.list_checkpoints(ckpts)))
        if legacy:
            return "legacy"
        shown = ", ".join(repr(n) for n in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"output_dir: {out} was not created by fluxlab (no {RUN_MARKER} marker) and holds "
                          f"other files ({shown}); fluxlab writes only into new, empty or its own folders: "
                          f"choose another output_dir")
    earlier = _holds_run(out)
    if earlier and resume is None and not overwrite and new_run:
        raise ConfigError(f"output_dir: {out} holds an earlier run ({', '.join(earlier)}); continue it with "
                          f"--resume latest, start over with --overwrite (moves it aside, deletes nothing), "
                          f"or choose another output_dir")
    return "owned"


def claim_output_dir(out: Path, state: str, *, overwrite: bool) -> list[str]:
    """Make `out` this run's folder (after `check_output_dir`): move an earlier run aside when
    overwriting, write the marker, and remove the hidden leftovers of killed writes. Returns notes."""
    notes = []
    if overwrite and state == "owned" and _holds_run(out):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = out.with_name(f"{out.name}.replaced-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
        os.rename(out, aside)  # one rename: the earlier run stays whole, just under a new name
        notes.append(f"moved the earlier run in {out} aside to {aside}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).exists():
        atomic_write_text(out / RUN_MARKER, json.dumps({"fluxlab": "training run folder",
                                                        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}) + "\n")
    removed = checkpoints.clean_leftovers(out / "checkpoints")
    # Temp files of killed atomic writes (`.<name>.<random>.tmp`) and of a killed LoRA save.
    for p in list(out.glob(".*.tmp")) + list(out.glob(".lora-*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        notes.append(f"removed {len(removed)} leftover(s) of an interrupted save: "
                     + ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return notes


@dataclass
class TrainResult:
    final_loss: float | None
    """Loss of the last step (nan if no step ran)."""
    losses: list[float]
    """Per-step training loss of this run (resumed runs: the steps run in this process)."""
    lora_path: Path | None
    """<output_dir>/pytorch_lora_weights.safetensors once the run completes, else None."""
    steps_done: int
    """Global step reached (resumed runs count the earlier steps too)."""
    start_step: int = 0
    interrupted: bool = False
    checkpoint_path: Path | None = None
    val_losses: dict[int, float] = field(default_factory=dict)
    output_dir: Path | None = None
    patch_report: Any = None
    cache_stats: dict = field(default_factory=dict)
    data_wait_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    adapter_sha256_per_rank: list[str] = field(default_factory=list)
    """Per rank, sha256 of the trainable parameters (names + fp32 bytes): equal on every rank when
    DDP kept the replicas in sync. A hash of tensors in memory, not of the file (lora_file_sha256)."""
    lora_file_sha256: str | None = None
    """sha256 of the saved LoRA file's bytes (None until it is written)."""
    writes_per_rank: list[list[str]] = field(default_factory=list)

    @property
    def lora_sha256_per_rank(self) -> list[str]:
        """Former name of adapter_sha256_per_rank (it never hashed the file); kept for old readers."""
        return self.adapter_sha256_per_rank


# --- the objective ------------------------------------------------------------------------------
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
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

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


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator behind every random draw of (step, micro-batch, rank)."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_step_inputs(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator, cfg: TrainConfig,
                     shift: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, noise, u) for one micro-batch, in this fixed draw order, all on the CPU in fp32.

    x0 = (sample(N(mean, exp(logvar))) - shift) * scale   [B, 16, h, w]
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from fluxlab.caches import LatentCache

    x0 = LatentCache.sample(mean.float().cpu(), logvar.float().cpu(), generator)
    x0 = (x0 - shift) * scale                                               # [B, 16, h, w]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)  # [B, 16, h, w]
    u = compute_density_for_timestep_sampling(
        weighting_scheme=cfg.timestep_sampling, batch_size=x0.shape[0], logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, device="cpu", generator=generator)  # [B]
    return x0, noise, u


# --- distributed helpers ------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _world() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _gather(obj) -> list:
    d = _dist()
    if not d:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


# --- data ---------------------------------------------------------------------------------------
class _CachedItems(torch.utils.data.Dataset):
    """What the DataLoader workers serve: cached latent distributions and text embeddings per
    training item, or pixels when per-epoch augmentation makes latents uncacheable.

    Indexed by (epoch, item): the epoch travels with each index, so persistent workers (which
    never see the main process's set_epoch) still draw the right crop/flip.
    """

    def __init__(self, items: list[dict], base=None, dataset_index: list[int] | None = None):
        self.items, self.base, self.dataset_index = items, base, dataset_index

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        epoch, i = key
        out = dict(self.items[i])
        if self.base is not None:  # latents are encoded in the training process from these pixels
            self.base.set_epoch(epoch)
            item = self.base[self.dataset_index[i]]
            out["pixels"], out["image_sha256"] = item["pixels"], item["image_sha256"]  # [3, H, W]
        return out


def _worker_ignores_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM: a signal to the whole process group (Ctrl-C, a
    scheduler's SIGTERM) must reach the main process alone, which finishes the step, checkpoints,
    and shuts the workers down itself. (Torch's own worker SIGTERM handler would let the worker die,
    and the main process then fails wherever it is, mid-checkpoint included.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        v = [it[k] for it in items]
        out[k] = torch.stack(v) if isinstance(v[0], torch.Tensor) else v
    return out


class _EpochTagged:
    """Batch sampler wrapper: yields [(epoch, i), ...] so the dataset knows the epoch."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield [(self.sampler.epoch, i) for i in batch]


# --- the trainer --------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, *, pipe=None, resume: str | os.PathLike | None = None,
                 profile_steps: int = 0, overwrite: bool = False, new_run: bool = True):
        self.cfg = cfg
        self._pipe = pipe                      # a preloaded FluxPipeline (tests reuse one); else loaded
        self.resume = resume                   # None | "latest" | checkpoint dir
        self.overwrite = overwrite             # move an earlier run in output_dir aside (never delete it)
        self.new_run = new_run                 # False: lr-find, which writes beside an earlier run, not over it
        self.profile_steps = int(profile_steps)
        self.out = Path(cfg.output_dir)
        self.global_step = 0                   # optimizer steps done
        self.epoch = 0                         # data position: epoch and batches consumed in it
        self.consumed = 0
        self.history = {k: deque(maxlen=cfg.metrics_window)
                        for k in ("loss", "lr", "grad_norm", "data_wait_s", "step_time_s", "val_loss")}
        self.written: list[str] = []           # every file this rank wrote (DDP: rank 0 only)
        self.patch_report = None
        self.cache_stats: dict = {}
        self._stop_requested = False
        self.stop_signal: int | None = None    # SIGINT/SIGTERM that asked this run to stop
        self._signal_mode = "abort"            # abort: raise at once; finish: end the step, then stop
        self._main_pid = os.getpid()
        self._phase = "idle"
        self._owns_process_group = False
        self._resume_ckpt = None
        self._resume_candidates: list[Path] = []
        self._last_ckpt: Path | None = None
        self._out_state: str | None = None    # new | owned | legacy, once check_output_dir ran
        # Non-finite guard, on the device so no step syncs: (first bad step, cause bits 1 loss | 2 grad).
        self._nonfinite = None

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, with_data: bool = True) -> "Trainer":
        with self._handling_signals("abort"):  # start-up has nothing to save: a signal stops it at once
            return self._setup(with_data)

    def _setup(self, with_data: bool) -> "Trainer":
        cfg = self.cfg
        # Before anything is read or loaded: is output_dir a folder this run may write into? (Timing
        # set-ups without data never write there; `train` checks then, if it ever runs.)
        if with_data:
            self._out_state = check_output_dir(self.out, resume=self.resume, overwrite=self.overwrite,
                                               new_run=self.new_run)
        self._init_distributed()
        self.rank, self.world = _rank(), _world()
        self.device = cfg.resolved_device(int(os.environ.get("LOCAL_RANK", 0)) if self.world > 1 else None)
        self.dtype = cfg.compute_dtype(self.device)
        self.autocast = self.dtype != torch.float32  # base weights in bf16 -> forward under autocast

        # Cheap checks first: the dataset size and the checkpoint to resume, before any model loads.
        if with_data:
            from fluxlab.data import ImageCaptionDataset

            self.dataset = ImageCaptionDataset(cfg.data, cfg.resolution, center_crop=cfg.center_crop,
                                               random_flip=cfg.random_flip, seed=cfg.seed)
            cfg.check_dataset_size(len(self.dataset), self.world)
        self._resume_ckpt = self._find_resume() if self.resume else None

        pipe = self._load_pipeline(with_data)
        # A fresh training table from the config: a pipe that already generated has a shortened,
        # set_timesteps'd table in its scheduler, which the loss must not index.
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        vae = pipe.vae
        self.vae_shift = float(vae.config.shift_factor) if vae is not None else models.FLUX_VAE_SHIFT
        self.vae_scale = float(vae.config.scaling_factor) if vae is not None else models.FLUX_VAE_SCALE
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.transformer = pipe.transformer
        from fluxlab.caches import PositionIdCache

        self.positions = PositionIdCache()  # img_ids / txt_ids per bucket (LRU)
        if with_data:
            self._build_data(pipe)
        # Keep the VAE only when latents are encoded every step; the text encoders never.
        self._vae = vae if with_data and self._encode_every_step else None
        del pipe
        self._pipe = None
        self._setup_model()
        self._setup_optimizer()
        self._nonfinite = torch.full((2,), -1, dtype=torch.int64, device=self.device)
        while self._resume_ckpt is not None:
            try:
                self._load_resume(self._resume_ckpt)
                break
            except CheckpointError as e:
                if str(self.resume) != "latest":
                    raise
                self._say(f"fluxlab: skipping checkpoint {self._resume_ckpt.path}: {e}")
                self._resume_ckpt = self._next_resume()
        self._resume_ckpt = None  # loaded: free its tensors and optimizer state
        return self

    def _say(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def _init_distributed(self) -> None:
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and self.cfg.device != "cpu" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend)
            self._owns_process_group = True

    def _load_pipeline(self, with_data: bool):
        cfg = self.cfg
        if self._pipe is not None:
            pipe = self._pipe
            p = next(pipe.transformer.parameters())
            if p.device != self.device or p.dtype != self.dtype:
                pipe.transformer.to(self.device, self.dtype)
        elif not with_data and cfg.model in ("flux1-dev", "flux1-schnell"):
            # Benchmarks: the transformer alone at real shape (no 9.5 GB T5 that nothing would use).
            from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

            sched = models.FLUX_SCHNELL_SCHEDULER if cfg.model == "flux1-schnell" else models.FLUX_DEV_SCHEDULER
            tr = models.build_transformer(cfg.model, self.device, self.dtype, seed=cfg.seed)
            pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**sched), vae=None, text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
        else:
            pipe = models.load_pipeline(cfg.model, device=self.device, dtype=self.dtype, seed=0)
        if cfg.quantize != "none":
            pipe.transformer = self._quantized_transformer(pipe)
        return pipe

    def _quantized_transformer(self, pipe):
        """QLoRA base: the transformer in NF4 / int8 with diffusers' BitsAndBytesConfig settings."""
        from diffusers import FluxTransformer2DModel

        from fluxlab.inference import bnb_config, quantize_transformer

        cfg = self.cfg
        try:
            import bitsandbytes  # noqa: F401  (an availability check)
        except ImportError:
            raise ConfigError("quantize: bitsandbytes is not installed; pip install 'fluxlab[quant]'") from None
        if cfg.model in ("flux1-dev", "flux1-schnell"):
            # Random-weight presets have no checkpoint to load quantized: swap the layers in place.
            tr = pipe.transformer
            quantize_transformer(tr, cfg.quantize, self.dtype)
        else:
            root = models.tiny_pipeline_path() if cfg.model == "tiny" else Path(cfg.model)
            pipe.transformer = None
            torch.cuda.empty_cache()
            tr = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", local_files_only=True,
                                                        quantization_config=bnb_config(cfg.quantize, self.dtype),
                                                        dtype=self.dtype)
        tr.requires_grad_(False)
        return tr

    def _build_data(self, pipe) -> None:
        """Encode every image and caption once through the content-addressed caches, keep the
        results in memory, and build the bucketed, resumable DataLoader over them."""
        from fluxlab.caches import LatentCache, TextEmbeddingCache, latent_preprocess
        from fluxlab.data import BucketBatchSampler

        cfg, ds = self.cfg, self.dataset
        n_val = cfg.validation_size if cfg.validation_every > 0 else 0
        # Hold the last `validation_size` images out of training: a fixed validation batch.
        self.train_index = list(range(len(ds) - n_val))
        self.val_index = list(range(len(ds) - n_val, len(ds)))
        # Random crops / flips change pixels every epoch, so their latents cannot be cached.
        self._encode_every_step = cfg.random_flip or not cfg.center_crop
        latent_cache = LatentCache(cfg.cache_dir, pipe.vae, memory=False)
        text_cache = TextEmbeddingCache(cfg.cache_dir, pipe, cfg.max_sequence_length, memory=False)
        self.latent_cache = latent_cache

        def encode(i: int, with_latent: bool) -> dict:
            rec_path, caption = ds.records[i]
            embeds, pooled = text_cache.get(caption)                    # [S, D], [Dp]
            item = {"index": i, "prompt_embeds": embeds.float(), "pooled": pooled.float()}
            if with_latent:
                pre = latent_preprocess(ds.bucket_of(i), cfg.center_crop, False)
                sha = hashlib.sha256(Path(rec_path).read_bytes()).hexdigest()
                mean, logvar = latent_cache.get(sha, pre, lambda: ds[i]["pixels"])
                item.update(mean=mean, logvar=logvar)                   # [16, h, w] each
            return item

        # Rank 0 fills the on-disk caches first; the other ranks then read them (hits).
        from diffusers.utils import logging as dlog

        verbosity = dlog.get_verbosity()
        dlog.set_verbosity_error()  # encode_prompt warns per caption when T5 pads/truncates
        for turn in ([0, 1] if self.world > 1 else [0]):
            if (self.rank == 0) == (turn == 0):
                with torch.no_grad():
                    items = [encode(i, not self._encode_every_step) for i in self.train_index]
                    self.val_items = [encode(i, True) for i in self.val_index]  # fixed: no augmentation
            _barrier()
        dlog.set_verbosity(verbosity)
        if self.rank == 0:
            from fluxlab.caches import report_evictions

            report_evictions(latent_cache, text_cache)
            self._warn_long_captions(pipe)
        self.cache_stats = {"latent": latent_cache.stats(), "text": text_cache.stats()}

        self.batch_sampler = BucketBatchSampler([ds.bucket_of(i) for i in self.train_index], cfg.batch_size,
                                                seed=cfg.seed, rank=self.rank, world_size=self.world, drop_last=True)
        train_items = _CachedItems(items, base=ds if self._encode_every_step else None,
                                   dataset_index=self.train_index)
        workers = cfg.num_workers
        self.loader = torch.utils.data.DataLoader(
            train_items, batch_sampler=_EpochTagged(self.batch_sampler), collate_fn=_collate,
            num_workers=workers, pin_memory=cfg.pin_memory and self.device.type == "cuda",
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            persistent_workers=cfg.persistent_workers and workers > 0,
            worker_init_fn=_worker_ignores_signals if workers > 0 else None,
            # Its own generator: each iter() draws a base seed, and from the global RNG that draw
            # would shift dropout masks whenever a resumed run re-creates the iterator.
            generator=torch.Generator().manual_seed(cfg.seed))

    def _warn_long_captions(self, pipe) -> None:
        """Say which captions the T5 encoder truncates at max_sequence_length (their tail is ignored)."""
        tok, limit = getattr(pipe, "tokenizer_2", None), self.cfg.max_sequence_length
        if tok is None:
            return
        from fluxlab.errors import printable

        long = [(Path(p).name, n) for p, cap in self.dataset.records
                if (n := len(tok(cap, add_special_tokens=True)["input_ids"])) > limit]
        if long:
            shown = ", ".join(f"{printable(name)} ({n})" for name, n in long[:3]) + (" ..." if len(long) > 3 else "")
            warnings.warn(f"{len(long)} caption(s) are longer than max_sequence_length={limit} T5 tokens and will "
                          f"be truncated: {shown}; shorten them or raise max_sequence_length", stacklevel=2)

    def _setup_model(self) -> None:
        cfg, tr = self.cfg, self.transformer
        tr.requires_grad_(False)                      # base weights frozen
        torch.manual_seed(cfg.seed)                   # same adapter init on every rank and every run
        if cfg.adapter == "lora":
            from peft import LoraConfig

            tr.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                      init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))
        else:
            from fluxlab.kernels import sparse_delta

            sparse_delta.apply_sparse_adapter(tr, list(cfg.target_modules), cfg.sparse_density, cfg.seed)
        if not any(p.requires_grad for p in tr.parameters()):
            raise ConfigError(f"target_modules: {cfg.target_modules} matched no module of the transformer; "
                              f"use suffixes such as attn.to_q")
        from diffusers.training_utils import cast_training_params

        cast_training_params(tr, dtype=torch.float32)  # trainable params in fp32; base stays bf16 on GPU
        if cfg.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        # Always through fluxlab.attention, "auto" included: stock SDPA picks cuDNN on Hopper, whose
        # backward breaks inside FLUX training (see fluxlab/attention.py); this path carries the fix.
        from fluxlab import attention

        attention.install(tr, cfg.attention_backend)
        if cfg.use_kernels:  # after install: the fused processor keeps the chosen backend
            from fluxlab import kernels

            self.patch_report = kernels.patch(tr)
        if cfg.compile:
            models.compile_blocks(tr, fullgraph=True)  # by position: kernels.patch renames block classes
        tr.train()
        self.model = tr
        if self.world > 1:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            kw = {}
            if "init_sync" in inspect.signature(DDP.__init__).parameters:
                kw["init_sync"] = False  # weights are identical by construction; skip broadcasting 12B params
            self.model = DDP(tr, device_ids=[self.device.index] if self.device.type == "cuda" else None, **kw)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        # Only trainable parameters enter the optimizer: frozen ones never get Adam state.
        self.optimizer = torch.optim.AdamW(list(self.trainable_parameters().values()), lr=cfg.learning_rate,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                           weight_decay=cfg.weight_decay)
        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
        self.lr_scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.steps)

    def freeze(self, names) -> int:
        """Freeze trainable parameters by name and drop their optimizer state (and their slot in the
        optimizer), so frozen parameters hold no Adam moments. Returns how many were frozen."""
        names = set(names)
        params = {n: p for n, p in self.transformer.named_parameters() if n in names and p.requires_grad}
        ids = {id(p) for p in params.values()}
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
            self.optimizer.state.pop(p, None)
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        return len(params)

    # ---- one step --------------------------------------------------------------------------------
    def generator_for(self, step: int, micro: int) -> torch.Generator:
        return step_generator(self.cfg.seed, step, micro, self.rank)

    def _position_ids(self, h: int, w: int, text_len: int):
        return self.positions.get(h, w, text_len, self.device, self.dtype)

    def _micro_inputs(self, mb: dict, g: torch.Generator):
        """Move one micro-batch to the device and draw its (x0, noise, u)."""
        if "mean" not in mb:  # per-epoch augmentation: encode this epoch's pixels now
            means, logvars = [], []
            for pix, sha in zip(mb["pixels"], mb["image_sha256"]):
                # A true random_* key makes the cache bypass itself (encode, store nothing).
                m, lv = self.latent_cache.get(sha, {"random_augment": True}, lambda pix=pix: pix)
                means.append(m)
                logvars.append(lv)
            mb = {**mb, "mean": torch.stack(means), "logvar": torch.stack(logvars)}
        x0, noise, u = draw_step_inputs(mb["mean"], mb["logvar"], g, self.cfg, self.vae_shift, self.vae_scale)
        dev, dt = self.device, self.dtype
        return (x0.to(dev, dt, non_blocking=True), noise.to(dev, dt, non_blocking=True), u,
                mb["prompt_embeds"].to(dev, dt, non_blocking=True), mb["pooled"].to(dev, dt, non_blocking=True))

    def step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `gradient_accumulation` micro-batches; no data loading.

        Returns dict(loss: 0-dim tensor (mean over micro-batches, detached), lr: float,
        grad_norm: 0-dim tensor or None (only when clipping is on or on logging steps)).
        """
        cfg, step = self.cfg, self.global_step
        n = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for k, mb in enumerate(micro_batches):
            self._phase = "forward"
            x0, noise, u, embeds, pooled = self._micro_inputs(mb, self.generator_for(step, k))
            B, _, h, w = x0.shape                                             # x0: [B, 16, h, w]
            img_ids, txt_ids = self._position_ids(h, w, embeds.shape[1])      # [h/2*w/2, 3], [S, 3]
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if (k == n - 1 or self.world == 1) else self.model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                    loss = flow_matching_loss(self.model, x0, embeds, pooled, noise, u, self.scheduler,
                                              img_ids=img_ids, txt_ids=txt_ids, guidance_scale=cfg.guidance_scale,
                                              weighting_scheme=cfg.timestep_sampling,
                                              vae_scale_factor=self.vae_scale_factor)
                self._phase = "backward"
                (loss / n).backward()
            loss_sum += loss.detach()

        params = self.optimizer.param_groups[0]["params"]
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        elif self._is_log_step(step + 1):  # the norm costs a pass over all grads: logging steps only
            grad_norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
        if self._nonfinite is not None:
            self._note_nonfinite(step + 1, loss_sum, grad_norm, params)
        self._phase = "optimizer"   # from here until the step ends a checkpoint would be inconsistent
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.global_step += 1
        self._phase = "idle"
        return {"loss": loss_sum / n, "lr": lr, "grad_norm": grad_norm}

    def _note_nonfinite(self, step: int, loss: torch.Tensor, grad_norm, params) -> None:
        """Record the first step whose loss or gradient is non-finite, without a host sync:
        `_check_finite` reads it on logging steps and before anything is written."""
        if grad_norm is None:  # a non-finite gradient makes its sum non-finite; a sum is cheaper than a norm
            grad_norm = torch.stack([p.grad.sum() for p in params if p.grad is not None]).sum()
        cause = (~torch.isfinite(loss)).long() + 2 * (~torch.isfinite(grad_norm.float())).long()    # 0-dim
        first = self._nonfinite                                                                     # [2]
        new = torch.stack([torch.full_like(cause, step), cause])                                    # [2]
        self._nonfinite = torch.where((first[0] < 0) & (cause > 0), new, first)

    def _check_finite(self) -> None:
        """Raise TrainingDiverged when a step went non-finite or a trained parameter is (one sync)."""
        if self._nonfinite is None:
            return
        params = list(self.trainable_parameters().values())
        params_ok = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
        (step, cause), params_ok = self._nonfinite.tolist(), bool(params_ok)
        if step < 0 and params_ok:
            return
        what = ({1: "loss", 2: "gradient", 3: "loss and gradient"}[cause] if step >= 0
                else "trained parameters (after an optimizer update)")
        at = f"step {step}" if step >= 0 else f"step {self.global_step} or earlier"
        last = (f"the last good checkpoint is {self._last_ckpt}" if self._last_ckpt is not None
                else "no checkpoint of this run was written")
        raise TrainingDiverged(
            f"training diverged: non-finite {what} at {at} (learning_rate {self.cfg.learning_rate:g}, "
            f"max_grad_norm {self.cfg.max_grad_norm:g}); stopped without writing a checkpoint or LoRA from it; "
            f"{last}. Lower learning_rate, keep max_grad_norm > 0, or check the data")

    def random_batch(self, batch_size: int = 1, resolution: int = 1024, seq_len: int | None = None,
                     device=None) -> dict:
        """A micro-batch of the model's real input shapes with random values (benchmarks)."""
        c = self.transformer.config
        h = w = resolution // self.vae_scale_factor
        S = seq_len or self.cfg.max_sequence_length
        g = torch.Generator("cpu").manual_seed(self.cfg.seed)
        dev = device or self.device
        return {"mean": torch.randn(batch_size, c.in_channels // 4, h, w, generator=g).to(dev),
                "logvar": torch.full((batch_size, c.in_channels // 4, h, w), -4.0).to(dev),
                "prompt_embeds": torch.randn(batch_size, S, c.joint_attention_dim, generator=g).to(dev),
                "pooled": torch.randn(batch_size, c.pooled_projection_dim, generator=g).to(dev)}

    # ---- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float:
        """Loss on the held-out items with fixed latents, noise and timesteps (same every call)."""
        self.transformer.eval()
        losses = []
        for j, item in enumerate(self.val_items):
            g = step_generator(self.cfg.seed, VALIDATION_STREAM, j, 0)  # a stream training never draws
            mb = {k: v[None] for k, v in item.items() if isinstance(v, torch.Tensor)}
            x0, noise, u, embeds, pooled = self._micro_inputs(mb, g)
            img_ids, txt_ids = self._position_ids(x0.shape[2], x0.shape[3], embeds.shape[1])
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                losses.append(flow_matching_loss(
                    self.transformer, x0, embeds, pooled, noise, u, self.scheduler, img_ids=img_ids,
                    txt_ids=txt_ids, guidance_scale=self.cfg.guidance_scale,
                    weighting_scheme=self.cfg.timestep_sampling, vae_scale_factor=self.vae_scale_factor).item())
        self.transformer.train()
        return float(np.mean(losses))

    # ---- the loop ---------------------------------------------------------------------------------
    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def _next_micro_batch(self):
        """The next batch from the bucketed loader, crossing epochs; advances (epoch, consumed)."""
        while True:
            if self._iter is None:
                self.batch_sampler.set_epoch(self.epoch)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch, self.consumed = self.epoch + 1, 0
                continue
            self.consumed += 1
            return batch

    def train(self) -> TrainResult:
        with self._handling_signals("finish"):  # a signal finishes the step, then checkpoints
            try:
                return self._train()
            finally:
                self._close_loader()

    def _close_loader(self) -> None:
        """Stop the DataLoader workers now, through the loader's own sentinel shutdown. They ignore
        SIGTERM (see `_worker_ignores_signals`), so they must not be left to the interpreter's exit,
        which terminates daemonic children with SIGTERM and would then wait for them forever."""
        loader = getattr(self, "loader", None)
        for it in (getattr(self, "_iter", None), getattr(loader, "_iterator", None)):
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
        self._iter = None
        if loader is not None and hasattr(loader, "_iterator"):
            loader._iterator = None

    def _train(self) -> TrainResult:
        cfg = self.cfg
        is_main = self.rank == 0
        t_start = time.perf_counter()
        start_step = self.global_step
        result = TrainResult(final_loss=float("nan"), losses=[], lora_path=None, steps_done=self.global_step,
                             start_step=start_step, output_dir=self.out, patch_report=self.patch_report,
                             cache_stats=self.cache_stats)
        if self._out_state is None:
            self._out_state = check_output_dir(self.out, resume=self.resume, overwrite=self.overwrite)
        if is_main:
            for note in claim_output_dir(self.out, self._out_state, overwrite=self.overwrite):
                self._say(f"fluxlab: {note}")
            self._out_state = "owned"
            self._trim_metrics(start_step)
            from fluxlab.config import save_config

            save_config(cfg, self.out / "config.yaml")
            self.written.append(str(self.out / "config.yaml"))
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and is_main))
        pending: list[dict] = []   # rows whose loss tensors are read (one sync) on logging steps
        self._iter = None
        profiler = self._make_profiler(start_step)
        last_ckpt = self._last_ckpt  # a run resumed at its last step trains nothing: that one stands
        try:
            while self.global_step < cfg.steps:
                t0 = time.perf_counter()
                # Where this step starts: a checkpoint written after an OOM in it must resume here,
                # not after the batches and random draws the failed step already took.
                self._step_start = (self.epoch, self.consumed, checkpoints.capture_rng_state())
                wait = 0.0
                micro = []
                for _ in range(cfg.gradient_accumulation):
                    tw = time.perf_counter()
                    micro.append(self._next_micro_batch())
                    wait += time.perf_counter() - tw
                try:
                    out = self.step(micro)
                except torch.OutOfMemoryError as e:
                    raise self._handle_oom(e) from None
                step = self.global_step
                row = {"step": step, "epoch": self.epoch, "loss": out["loss"], "lr": out["lr"],
                       "data_wait_s": wait, "step_time_s": time.perf_counter() - t0}
                if self._is_log_step(step) and out["grad_norm"] is not None:
                    row["grad_norm"] = out["grad_norm"]
                if cfg.validation_every and step % cfg.validation_every == 0 and is_main:
                    row["val_loss"] = self.validation_loss()
                    result.val_losses[step] = row["val_loss"]
                pending.append(row)
                if profiler is not None:
                    profiler.step()
                    self._memory_samples.append(self._memory_now(step))
                bar.update(1)
                if self._is_log_step(step):
                    self._flush_metrics(pending, result, bar)
                    self._check_finite()
                # Every rank must agree to stop at the same step (DDP), so reduce the flag.
                stop = self._agree(self._stop_requested)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps or stop:
                    self._flush_metrics(pending, result, bar)
                    last_ckpt = self.save_checkpoint()
                if stop:
                    result.interrupted = True
                    break
            self._phase = "final save"  # a signal from here on lets the final writes finish
        finally:
            self._flush_metrics(pending, result, bar)
            bar.close()
            if profiler is not None:
                profiler.stop()
                self._write_memory_timeline(profiler)
        result.checkpoint_path = last_ckpt
        result.steps_done = self.global_step
        if not result.interrupted:
            self._check_finite()
            result.lora_path = self.save_lora()
            result.adapter_sha256_per_rank = _gather(self._lora_digest())
            if is_main and result.lora_path is not None:
                result.lora_file_sha256 = hashlib.sha256(result.lora_path.read_bytes()).hexdigest()
            if is_main and not self._stop_requested:  # asked to stop: the curves can wait
                self._plot_curves()
        self._finish(result, t_start)
        return result

    def _finish(self, result: TrainResult, t_start: float) -> None:
        is_main = self.rank == 0
        result.writes_per_rank = _gather(list(self.written))
        result.final_loss = result.losses[-1] if result.losses else float("nan")
        result.wall_s = time.perf_counter() - t_start
        if is_main:
            summary = {k: v for k, v in dataclasses.asdict(result).items()
                       if k not in ("losses", "patch_report", "data_wait_s")}
            summary["patch_report"] = repr(self.patch_report) if self.patch_report is not None else None
            summary["lora_sha256_per_rank"] = summary["adapter_sha256_per_rank"]  # former name, for old readers
            self._write_json(self.out / "train_summary.json", summary)
        _barrier()

    def close(self) -> None:
        self._close_loader()
        if self._owns_process_group and _dist():
            _dist().destroy_process_group()
            self._owns_process_group = False

    # ---- metrics and plots -----------------------------------------------------------------------
    def _flush_metrics(self, pending: list[dict], result: TrainResult, bar) -> None:
        if not pending:
            return
        rows = []
        for r in pending:
            r = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
            rows.append(r)
            for k in self.history:
                if k in r:
                    self.history[k].append(r[k])
            result.losses.append(r["loss"])
            result.data_wait_s.append(r["data_wait_s"])
        pending.clear()
        if self.rank == 0:
            path = self.out / "metrics.jsonl"
            with open(path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            if str(path) not in self.written:
                self.written.append(str(path))
        last = rows[-1]
        post = {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}
        if "grad_norm" in last:
            post["gnorm"] = f"{last['grad_norm']:.3f}"
        bar.set_postfix(post, refresh=False)

    def _trim_metrics(self, upto_step: int) -> None:
        """On resume keep metrics.jsonl rows up to the resumed step, so the history reads once."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the half line of a process killed while appending
            if isinstance(row, dict) and row.get("step", 0) <= upto_step:
                keep.append(line)
        self._write_text(path, "".join(line + "\n" for line in keep))

    def _plot_curves(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        for key, ylabel, log in (("loss", "training loss", False), ("lr", "learning rate", False),
                                 ("grad_norm", "gradient norm", True)):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.5))
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1, alpha=0.6 if key == "loss" else 1.0, label=key)
            if key == "loss" and len(ys) > 4:
                ema, s = [], ys[0]
                for y in ys:
                    s = 0.9 * s + 0.1 * y
                    ema.append(s)
                ax.plot(xs, ema, lw=2, label="EMA 0.9")
                vals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
                if vals:
                    ax.plot(*zip(*vals), "o-", label="validation")
                ax.legend()
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = self.out / f"{key}.png"
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            atomic_write_bytes(path, buf.getvalue())
            self.written.append(str(path))

    # ---- files (rank 0 alone writes) ---------------------------------------------------------------
    def _write_text(self, path: Path, text: str) -> None:
        assert self.rank == 0, "only rank 0 writes"
        atomic_write_text(path, text)

    def _write_json(self, path: Path, obj) -> None:
        self._write_text(path, json.dumps(obj, indent=1, default=str))
        self.written.append(str(path))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA in diffusers/peft naming (no adapter name), as save_lora_weights wants it."""
        if self.cfg.adapter == "sparse":
            from fluxlab.kernels import sparse_delta

            return sparse_delta.sparse_state_dict(self.transformer)
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save_lora(self) -> Path | None:
        """Write <output_dir>/pytorch_lora_weights.safetensors (diffusers format) from rank 0."""
        if self.rank != 0:
            return self.out / LORA_FILE
        import tempfile

        from diffusers import FluxPipeline

        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.adapter_state_dict().items()}
        if self.cfg.adapter == "sparse":
            from safetensors.torch import save

            path = atomic_write_bytes(self.out / "sparse_delta.safetensors", save(state))
            self.written.append(str(path))
            return path
        from diffusers.training_utils import _collate_lora_metadata

        # The adapter's LoraConfig (rank, alpha, targets) goes into the file's metadata, as
        # train_dreambooth_lora_flux.py writes it: without it, load_lora_weights guesses alpha
        # and the LoRA loads at the wrong strength whenever lora_alpha != rank.
        metadata = _collate_lora_metadata({"transformer": self.transformer})
        with tempfile.TemporaryDirectory(dir=self.out, prefix=".lora-") as tmp:
            FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=state, safe_serialization=True, **metadata)
            # Through the atomic writer: durable, and the usual file mode (safetensors writes 0600).
            atomic_write_bytes(self.out / LORA_FILE, (Path(tmp) / LORA_FILE).read_bytes())
        self.written.append(str(self.out / LORA_FILE))
        return self.out / LORA_FILE

    def _lora_digest(self) -> str:
        h = hashlib.sha256()
        for name, p in sorted(self.trainable_parameters().items()):
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    # ---- checkpoints and resume ------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Every rank calls this (it gathers per-rank RNG states); rank 0 writes and prunes.
        Raises TrainingDiverged instead of writing a checkpoint of non-finite weights."""
        self._check_finite()
        rng = _gather(checkpoints.capture_rng_state())
        path = self.checkpoint_root / f"step_{self.global_step}"
        if self.rank == 0:
            tensors = {n: p.detach() for n, p in self.trainable_parameters().items()}
            state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                     "rng_per_rank": rng,
                     "sampler": (self.batch_sampler.state_dict(consumed=self.consumed)
                                 if hasattr(self, "batch_sampler") else {}),
                     "step": self.global_step}
            val = self.history["val_loss"][-1] if self.history["val_loss"] else None
            meta = {"config": self.cfg.to_dict(), "world_size": self.world, "val_loss": val,
                    "fluxlab_format": 1}
            path = checkpoints.save_checkpoint(self.checkpoint_root, self.global_step, tensors=tensors,
                                               state=state, meta=meta)
            self.written.append(str(path))
            if self.cfg.keep_last:  # never prunes the one just written
                checkpoints.apply_retention(self.checkpoint_root, self.cfg.keep_last, protect=[path])
        self._last_ckpt = path
        _barrier()
        return path

    def _find_resume(self):
        """Pick, verify and load the checkpoint to resume (before the model loads); None to start
        fresh. `--resume latest` tries the newest first and falls back past any that fails."""
        if str(self.resume) != "latest":
            self._resume_candidates = [Path(self.resume)]
            return self._next_resume()
        self._resume_candidates = [p for _, p in checkpoints.list_checkpoints(self.checkpoint_root)]
        if not self._resume_candidates:
            self._say(f"fluxlab: no checkpoint under {self.checkpoint_root}; starting a new run")
            return None
        return self._next_resume()

    def _next_resume(self):
        """Load the next resume candidate; with `latest`, skip (and name) each that fails."""
        while self._resume_candidates:
            path = self._resume_candidates.pop(0)
            try:
                ckpt = checkpoints.load_checkpoint(path)  # CheckpointError names the bad file
            except CheckpointError as e:
                if str(self.resume) != "latest":
                    raise
                self._say(f"fluxlab: skipping corrupt checkpoint {path}: {e}")
                continue
            self._check_resume_config(ckpt)
            return ckpt
        raise CheckpointError(f"no checkpoint under {self.checkpoint_root} can be resumed (reasons above); move "
                              f"the damaged ones aside, or start over with --overwrite")

    def _check_resume_config(self, ckpt) -> None:
        path = ckpt.path
        saved = ckpt.meta.get("config", {})
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path / checkpoints.META_FILE}: 'config' is not a mapping")
        for key in ("adapter", "rank", "target_modules", "batch_size", "seed", "gradient_accumulation",
                    "resolution", "sparse_density"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise ConfigError(f"{key}: the checkpoint {path} was trained with {key}={saved[key]!r}, this config "
                                  f"has {getattr(self.cfg, key)!r}; resume with the same {key} or start a new run")
        if ckpt.meta.get("world_size", 1) != self.world:
            raise ConfigError(f"world_size: {path} was written by {ckpt.meta.get('world_size')} process(es), "
                              f"this run has {self.world}; resume with the same number of processes")

    def _load_resume(self, ckpt) -> None:
        """Restore the model, optimizer, scheduler, sampler and RNG from a loaded checkpoint.
        Everything is checked against this model before anything changes; any failure is a
        CheckpointError naming the file (a checkpoint that hashes fine can still be unusable)."""
        params = self.trainable_parameters()
        tfile, sfile = ckpt.path / checkpoints.TENSORS_FILE, ckpt.path / checkpoints.STATE_FILE
        hint = checkpoints.RESUME_HINT
        missing = sorted(set(params) - set(ckpt.tensors))
        if missing:
            raise CheckpointError(f"{tfile}: lacks adapter tensors such as {missing[0]} that this config trains; "
                                  f"{hint}")
        for name, p in params.items():
            t = ckpt.tensors[name]
            if t.shape != p.shape or not t.is_floating_point():
                raise CheckpointError(f"{tfile}: tensor {name} is {tuple(t.shape)} {t.dtype}, the model needs "
                                      f"{tuple(p.shape)} floating point; {hint}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{tfile}: tensor {name} holds non-finite values; {hint}")
        state = ckpt.state
        for key in ("optimizer", "lr_scheduler", "rng_per_rank") + (("sampler",) if hasattr(self, "batch_sampler") else ()):
            if key not in state:
                raise CheckpointError(f"{sfile}: lacks {key!r}; {hint}")
        if not isinstance(state["rng_per_rank"], list) or len(state["rng_per_rank"]) <= self.rank:
            raise CheckpointError(f"{sfile}: no RNG state for rank {self.rank}; {hint}")
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(ckpt.tensors[name])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if hasattr(self, "batch_sampler"):
                self.batch_sampler.load_state_dict(state["sampler"])
                self.epoch, self.consumed = int(state["sampler"]["epoch"]), int(state["sampler"]["cursor"])
            checkpoints.restore_rng_state(state["rng_per_rank"][self.rank])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{sfile}: cannot be restored into this run ({type(e).__name__}: {e}); "
                                  f"{hint}") from e
        self.global_step = ckpt.step
        self._last_ckpt = ckpt.path
        if self.rank == 0:
            print(f"fluxlab: resumed from {ckpt.path} at step {ckpt.step}", file=sys.stderr)

    # ---- signals -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _handling_signals(self, mode: str):
        """SIGINT/SIGTERM handling for a block. mode "abort": raise RunInterrupted at once (start-up
        has nothing to save). mode "finish": note the signal; the loop ends the step, checkpoints and
        stops, and the final save runs to its end. A second signal aborts at once. Only the main
        process reacts: forked DataLoader workers inherit this handler and must stay silent."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if os.getpid() != self._main_pid:
                return  # a DataLoader worker: the main process decides and speaks
            if self._signal_mode == "abort" or self._stop_requested:
                self.aborted_during = "start-up" if self._signal_mode == "abort" else self._phase
                raise RunInterrupted(signum)
            self._stop_requested, self.stop_signal = True, signum
            if self.rank == 0:
                doing = ("letting the final save finish" if self._phase == "final save" else
                         "finishing the step in progress, then writing a checkpoint")
                print(f"\nfluxlab: {signal.Signals(signum).name} received: {doing} "
                      f"(a second signal aborts at once)", file=sys.stderr, flush=True)

        old_mode, self._signal_mode = self._signal_mode, mode
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._signal_mode = old_mode

    def _agree(self, flag: bool) -> bool:
        d = _dist()
        if not d:
            return flag
        t = torch.tensor([int(flag)], device=self.device if d.get_backend() == "nccl" else "cpu")
        d.all_reduce(t, op=d.ReduceOp.MAX)
        return bool(t.item())

    # ---- out of memory -----------------------------------------------------------------------------
    def _handle_oom(self, err: Exception) -> TrainingOOM:
        step = self.global_step + 1
        phase = self._phase
        lines = [f"CUDA out of memory at step {step} (during {phase})."]
        if torch.cuda.is_available():
            dev = self.device if self.device.type == "cuda" else None
            lines.append(f"  allocated {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB, "
                         f"reserved {torch.cuda.memory_reserved(dev) / 2**30:.2f} GiB, "
                         f"peak {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
        owners = []
        for name, p in self.transformer.named_parameters():
            owners.append((p.numel() * p.element_size(), f"parameter {name} {tuple(p.shape)} {p.dtype}"))
            if p.grad is not None:
                owners.append((p.grad.numel() * p.grad.element_size(), f"grad of {name}"))
        names = {id(p): n for n, p in self.transformer.named_parameters()}
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    owners.append((v.numel() * v.element_size(), f"optimizer {k} of {names.get(id(p), '?')}"))
        owners.sort(key=lambda t: -t[0])
        lines.append("  largest known tensors:")
        lines += [f"    {b / 2**20:9.1f} MiB  {what}" for b, what in owners[:8]]
        # Before the optimizer touched anything, params and Adam state are those of the last
        # completed step: a checkpoint of that step is consistent. Mid-update it would not be.
        if phase in ("forward", "backward") and self.global_step > 0:
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            self.epoch, self.consumed, rng = self._step_start
            self.batch_sampler.set_epoch(self.epoch)
            checkpoints.restore_rng_state(rng)
            try:
                path = self.save_checkpoint()
                lines.append(f"  checkpoint of step {self.global_step} written to {path}")
            except Exception as e:  # noqa: BLE001 -- memory may still be too tight; say so
                lines.append(f"  could not write a checkpoint ({type(e).__name__}: {e})")
        else:
            lines.append("  no checkpoint written (nothing completed yet, or the optimizer was mid-update)")
        lines.append("  try: a lower resolution (--set resolution=512), batch_size=1 with gradient_accumulation, "
                     "gradient_checkpointing=true, the memory-lean mode, or QLoRA (--set quantize=nf4).")
        return TrainingOOM("\n".join(lines))

    # ---- profiling ---------------------------------------------------------------------------------
    def _make_profiler(self, start_step: int):
        self._memory_samples: list[dict] = []
        if not self.profile_steps or self.rank != 0:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule

        warm = 2
        if self.cfg.steps - start_step < warm + 1 + self.profile_steps:
            warnings.warn(f"--profile {self.profile_steps}: only {self.cfg.steps - start_step} steps left, fewer "
                          f"than {warm} wait + 1 warm-up + {self.profile_steps} profiled", stacklevel=2)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        pdir = self.out / "profile"
        pdir.mkdir(parents=True, exist_ok=True)

        def on_ready(prof):
            path = pdir / "trace.json"
            prof.export_chrome_trace(str(path))
            self.written.append(str(path))

        prof = profile(activities=acts, schedule=schedule(wait=warm, warmup=1, active=self.profile_steps, repeat=1),
                       on_trace_ready=on_ready, record_shapes=True, profile_memory=True, with_stack=True)
        prof.start()
        return prof

    def _memory_now(self, step: int) -> dict:
        if self.device.type == "cuda":
            return {"step": step, "allocated": torch.cuda.memory_allocated(self.device),
                    "reserved": torch.cuda.memory_reserved(self.device),
                    "peak": torch.cuda.max_memory_allocated(self.device)}
        import psutil

        return {"step": step, "rss": psutil.Process().memory_info().rss}

    def _write_memory_timeline(self, prof) -> None:
        pdir = self.out / "profile"
        # Per-step memory (always), plus torch's categorised timeline where it can build one.
        self._write_json(pdir / "memory_steps.json", self._memory_samples)
        try:
            dev = str(self.device) if self.device.type == "cuda" else "cpu"
            path = pdir / "memory_timeline.json"
            prof.export_memory_timeline(str(path), device=dev)
            self.written.append(str(path))
        except Exception as e:  # noqa: BLE001 -- torch's exporter is experimental; the trace still stands
            warnings.warn(f"memory timeline not exported ({type(e).__name__}: {e}); see memory_steps.json",
                          stacklevel=2)


# --- lr-find ------------------------------------------------------------------------------------
LR_FIND_MAX_FACTOR = 10.0  # a sweep that never diverged suggests at most this x the config's learning_rate


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    steepest_lr: float | None
    diverged_at: float | None
    plot_path: Path | None
    warning: str | None = None
    """Why the suggestion is weak (the sweep never diverged, or the loss never fell); None otherwise."""


def suggest_lr(lrs, smoothed, diverged_at: float | None, current_lr: float,
               max_factor: float = LR_FIND_MAX_FACTOR) -> tuple[float, float | None, str | None]:
    """(suggested lr, steepest-descent lr, warning) from a range test's smoothed loss curve.

    Diverged: the lr at the smoothed minimum / 10 (the minimum sits just below the blow-up).
    Never diverged: that minimum is only where the sweep stopped, so /10 means nothing; suggest the
    steepest descent of the smoothed loss over log(lr), capped at `max_factor` x `current_lr` since
    the ceiling was never found. A loss that never fell gives `current_lr` back.
    """
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    k = int(np.argmin(smoothed))
    steepest = None
    if k >= 2:  # a slope needs a few points before the minimum (np.gradient refuses one)
        grad = np.gradient(smoothed[: k + 1], np.log(lrs[: k + 1]))
        steepest = float(lrs[int(np.argmin(grad))])
    if diverged_at is not None:
        return float(lrs[k] / 10), steepest, None
    span = f"{lrs[0]:.1e}..{lrs[-1]:.1e}"
    # "Fell": the minimum lies clearly below the start (1%), not within the noise of a flat curve.
    if steepest is None or smoothed[k] > 0.99 * smoothed[0]:
        return float(current_lr), steepest, (
            f"the loss never fell over the sweep ({span}); no suggestion, keeping learning_rate {current_lr:.2e}")
    cap = max_factor * current_lr
    suggested = min(steepest, cap)
    return float(suggested), steepest, (
        f"the sweep never diverged (up to {lrs[-1]:.1e}), so its ceiling is unknown; suggesting the steepest "
        f"descent {steepest:.2e}" + (f", capped at {max_factor:g}x learning_rate = {cap:.2e}" if steepest > cap else "")
        + "; raise lr_find_max to find where it diverges")


def lr_find(cfg: TrainConfig, *, pipe=None, divergence: float = 4.0) -> LRFindResult:
    """Learning-rate range test: lr grows exponentially from lr_find_min to lr_find_max over
    lr_find_steps; stop when the smoothed loss exceeds `divergence` x its best. The suggestion is
    `suggest_lr`'s: minimum / 10 after a divergence, else the bounded steepest descent (with a warning)."""
    from torch.optim.lr_scheduler import LambdaLR

    tr = Trainer(cfg, pipe=pipe, new_run=False).setup()
    n = cfg.lr_find_steps
    ratio = cfg.lr_find_max / cfg.lr_find_min
    for g in tr.optimizer.param_groups:
        g["lr"] = g["initial_lr"] = cfg.lr_find_min
    tr.lr_scheduler = LambdaLR(tr.optimizer, lambda i: ratio ** (i / max(n - 1, 1)))
    tr._iter = None
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, float("inf"), None
    from tqdm.auto import tqdm

    try:
        for i in tqdm(range(n), desc="lr-find", disable=not cfg.progress):
            micro = [tr._next_micro_batch() for _ in range(cfg.gradient_accumulation)]
            out = tr.step(micro)
            loss = out["loss"].item()
            lrs.append(out["lr"])
            losses.append(loss)
            avg = 0.9 * avg + 0.1 * loss
            s = avg / (1 - 0.9 ** (i + 1))  # bias-corrected EMA
            smoothed.append(s)
            best = min(best, s)
            if not math.isfinite(loss) or s > divergence * best:
                diverged = out["lr"]
                break
    finally:
        tr._close_loader()  # workers ignore SIGTERM: never leave them to the interpreter exit
    suggested, steepest, warning = suggest_lr(lrs, smoothed, diverged, cfg.learning_rate)
    res = LRFindResult(lrs, losses, smoothed, suggested, steepest, diverged, None, warning)
    if tr.rank == 0:
        claim_output_dir(tr.out, tr._out_state, overwrite=False)
        tr._write_json(tr.out / "lr_find.json", {k: v for k, v in dataclasses.asdict(res).items() if k != "plot_path"})
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(lrs, losses, alpha=0.4, label="loss")
        ax.plot(lrs, smoothed, lw=2, label="smoothed (EMA 0.9)")
        ax.axvline(suggested, color="g", ls="--", label=f"suggested {suggested:.1e}")
        if steepest:
            ax.axvline(steepest, color="0.5", ls=":", label=f"steepest descent {steepest:.1e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("learning-rate range test" + ("" if diverged else " (never diverged)"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        res.plot_path = tr.out / "lr_find.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(res.plot_path, buf.getvalue())
    tr.close()
    return res


# --- command line -------------------------------------------------------------------------------
def cli_train(config_path: str, overrides: dict[str, str], resume: str | None = None, profile: int = 0,
              overwrite: bool = False) -> int:
    cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg, resume=resume, profile_steps=profile, overwrite=overwrite)
    sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
    try:
        trainer.setup()
        result = trainer.train()
    except TrainingOOM as e:
        print(f"fluxlab: {e}", file=sys.stderr)
        return EXIT_OOM
    except TrainingDiverged as e:
        if trainer.rank == 0:
            print(f"fluxlab: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except RunInterrupted as e:
        if trainer.rank == 0:
            if getattr(trainer, "aborted_during", None) == "start-up":
                print(f"fluxlab: {e} received during start-up: stopped before any step", file=sys.stderr)
            else:
                last = trainer._last_ckpt
                print(f"fluxlab: {e} again: aborted at once at step {trainer.global_step}; "
                      + (f"the last checkpoint is {last}\n  resume with: fluxlab train {config_path}{sets} "
                         f"--resume latest" if last else "no checkpoint of this run was written"), file=sys.stderr)
        return 128 + e.signum
    finally:
        trainer.close()
    code = 128 + trainer.stop_signal if trainer.stop_signal else 0
    if trainer.rank != 0:
        return code
    if result.interrupted:
        print(f"fluxlab: stopped at step {result.steps_done}; checkpoint {result.checkpoint_path}\n"
              f"  resume with: fluxlab train {config_path}{sets} --resume latest", file=sys.stderr)
        return code
    losses = result.losses
    w = max(1, min(10, len(losses) // 4))
    first = float(np.mean(losses[:w])) if losses else float("nan")
    last = float(np.mean(losses[-w:])) if losses else float("nan")
    print(f"fluxlab: trained steps {result.start_step}->{result.steps_done} in {result.wall_s:.1f}s; "
          f"loss (mean of {w}) first {first:.4f} -> last {last:.4f}\n  LoRA: {result.lora_path}\n"
          f"  checkpoint: {result.checkpoint_path}\n  metrics: {trainer.out / 'metrics.jsonl'}")
    if code:
        print(f"fluxlab: {signal.Signals(trainer.stop_signal).name} arrived during the final save, which "
              f"finished: the run is complete", file=sys.stderr)
    return code


def cli_lr_find(config_path: str, overrides: dict[str, str]) -> int:
    cfg = load_config(config_path, overrides)
    res = lr_find(cfg)
    msg = f"fluxlab: suggested learning_rate {res.suggested_lr:.2e}"
    if res.steepest_lr:
        msg += f" (steepest descent at {res.steepest_lr:.2e})"
    if res.diverged_at:
        msg += f"; diverged at {res.diverged_at:.2e}"
    if res.warning:
        print(f"fluxlab: warning: {res.warning}", file=sys.stderr)
    print(msg + (f"\n  plot: {res.plot_path}" if res.plot_path else ""))
    return 0
