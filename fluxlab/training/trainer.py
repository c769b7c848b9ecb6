"""The training loop: `Trainer.step` is one optimizer step, `Trainer.train` the loop around it.
Everything else lives beside it in fluxlab/training/ (objective, loader, setup, state, observe,
signals); see fluxlab/trainer.py for the Python API and the exit codes."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from fluxlab import checkpoints
from fluxlab.caches import PositionIdCache
from fluxlab.config import TrainConfig
from fluxlab.training import loader, objective, observe, setup as build, state
from fluxlab.training.observe import TrainResult
from fluxlab.training.signals import RunSignals


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
        # Set by setup(): where the run happens, and what it trains with.
        self.rank, self.world, self.device, self.dtype, self.autocast = 0, 1, None, None, False
        self.transformer = self.model = None   # model: the transformer, or DDP around it
        self.scheduler = self.optimizer = self.lr_scheduler = None
        self.vae_shift, self.vae_scale, self.vae_scale_factor = 0.0, 1.0, 8
        self.bn: tuple[torch.Tensor, torch.Tensor] | None = None  # FLUX.2: latent batch-norm mean, std [4C]
        self.positions = PositionIdCache()     # img_ids / txt_ids per bucket (LRU)
        self.data: loader.TrainData | None = None  # None after setup(with_data=False)
        self.batches: loader.Batches | None = None  # the training batches and where they stand
        self.patch_report, self.cache_stats = None, {}
        self.setup_s = 0.0
        self.memory: dict[str, float] = {}    # device memory around the encoders' release (GiB; CUDA only)
        self.signals = RunSignals()
        self.ckpt: state.CheckpointManager | None = None
        self.files = observe.RunFiles(self.out, 0)
        self.metrics = observe.Metrics(self.files, cfg.metrics_window)
        self.guard: observe.NonFiniteGuard | None = None
        self._step_start = None                # (epoch, consumed, RNG) where the step in flight began
        self._owns_process_group = False
        self._out_state: str | None = None    # new | owned | legacy, once check_output_dir ran

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, with_data: bool = True) -> "Trainer":
        with self.signals.handling("abort"):  # start-up has nothing to save: a signal stops it at once
            t0, cfg = time.perf_counter(), self.cfg
            # Before anything is read or loaded: may this run write into output_dir? (Timing set-ups
            # without data never write there; `train` checks then, if it ever runs.)
            if with_data:
                self._out_state = state.check_output_dir(self.out, resume=self.resume, overwrite=self.overwrite,
                                                         new_run=self.new_run)
            self._owns_process_group = build.init_distributed(cfg)
            self.rank, self.world = build.rank(), build.world()
            self.signals.rank = self.files.rank = self.rank
            self.device = cfg.resolved_device(int(os.environ.get("LOCAL_RANK", 0)) if self.world > 1 else None)
            self.dtype = cfg.compute_dtype(self.device)
            self.autocast = self.dtype != torch.float32  # base weights in bf16 -> forward under autocast
            # Cheap checks first: the dataset size and the checkpoint to resume, before any model loads.
            dataset = loader.open_dataset(cfg, self.world) if with_data else None
            self.ckpt = state.CheckpointManager(cfg, self.out / "checkpoints", self.resume, self.rank, self.world)
            resume_from = self.ckpt.find()

            # Encoders first: they fill the caches and are freed before the transformer loads, so
            # the two never share the device (a preloaded pipe belongs to the caller: kept whole).
            pipe = self._load_pipeline(with_data)
            # A fresh training table from the config: a pipe that already generated has a shortened,
            # set_timesteps'd table in its scheduler, which the loss must not index.
            self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            self.vae_shift, self.vae_scale, self.vae_scale_factor = build.vae_constants(pipe.vae)
            self.bn = build.latent_bn(pipe)
            if with_data:
                self.data = loader.build_data(cfg, dataset, pipe, self.rank, self.world, self.device)
                self.batches, self.cache_stats = self.data.batches, self.data.cache_stats
                if self.device.type == "cuda":
                    self.memory["encode_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self._pipe is None:  # the VAE stays only in the latent cache, and only if it encodes every step
                self.memory.update(build.release_encoders(pipe, self.device))
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)  # from here: the training peak
            self.transformer = build.load_transformer(cfg, self._pipe, self.device, self.dtype)
            self._pipe = pipe = None
            self.patch_report = build.add_adapter(self.transformer, cfg)
            self.model = build.wrap_ddp(self.transformer, self.device)
            self.optimizer, self.lr_scheduler = build.make_optimizer(cfg, list(self.trainable_parameters().values()))
            self.guard = observe.NonFiniteGuard(self.device)
            self.global_step = self.ckpt.resume(resume_from, self.trainable_parameters(), self.optimizer,
                                                self.lr_scheduler, self.batches)
            self.setup_s = time.perf_counter() - t0
            return self  # the loaded checkpoint's tensors and optimizer state are freed here

    def _load_pipeline(self, with_data: bool):
        return build.load_pipeline(self.cfg, self._pipe, self.device, self.dtype, with_data)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def freeze(self, names) -> int:
        """Freeze trainable parameters by name and drop their Adam state; returns how many."""
        return build.freeze(self.transformer, self.optimizer, names)

    # ---- one step --------------------------------------------------------------------------------
    def generator_for(self, step: int, micro: int) -> torch.Generator:
        return objective.step_generator(self.cfg.seed, step, micro, self.rank)

    def _loss(self, model, mb: dict, g: torch.Generator) -> torch.Tensor:
        """The flow-matching loss of one micro-batch under autocast; `g` draws its x0, noise and t."""
        latent_cache = self.data.latent_cache if self.data else None
        x0, noise, u, embeds, pooled = objective.micro_inputs(mb, g, self.cfg, latent_cache, self.vae_shift,
                                                              self.vae_scale, self.device, self.dtype, bn=self.bn)
        if self.bn is not None:  # FLUX.2: its own packing, 4-axis position ids, no pooled embedding
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                return objective.flux2_flow_matching_loss(
                    model, x0, embeds, noise, u, self.scheduler, guidance_scale=self.cfg.guidance_scale,
                    weighting_scheme=self.cfg.timestep_sampling)
        img_ids, txt_ids = self.positions.get(x0.shape[2], x0.shape[3], embeds.shape[1], self.device, self.dtype)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            return objective.flow_matching_loss(
                model, x0, embeds, pooled, noise, u, self.scheduler, img_ids=img_ids, txt_ids=txt_ids,
                guidance_scale=self.cfg.guidance_scale, weighting_scheme=self.cfg.timestep_sampling,
                vae_scale_factor=self.vae_scale_factor)

    def step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `gradient_accumulation` micro-batches; no data loading.

        Returns dict(loss: 0-dim tensor (mean over micro-batches, detached), lr: float,
        grad_norm: 0-dim tensor or None (only when clipping is on or on logging steps)).
        """
        cfg, step, n = self.cfg, self.global_step, len(micro_batches)
        if cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph modes: a new step, earlier outputs are done
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for k, mb in enumerate(micro_batches):
            self.signals.phase = "forward"
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            with contextlib.nullcontext() if (k == n - 1 or self.world == 1) else self.model.no_sync():
                loss = self._loss(self.model, mb, self.generator_for(step, k))
                self.signals.phase = "backward"
                (loss / n).backward()
            loss_sum += loss.detach()

        params = self.optimizer.param_groups[0]["params"]
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        elif observe.is_log_step(self.cfg, step + 1):  # the norm costs a pass over all grads: logging steps only
            grad_norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
        self.guard.note(step + 1, loss_sum, grad_norm, params)
        self.signals.phase = "optimizer"   # from here until the step ends a checkpoint would be inconsistent
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.global_step += 1
        self.signals.phase = "idle"
        return {"loss": loss_sum / n, "lr": lr, "grad_norm": grad_norm}

    def random_batch(self, batch_size: int = 1, resolution: int = 1024, seq_len: int | None = None,
                     device=None) -> dict:
        """A micro-batch of the model's real input shapes with random values (benchmarks)."""
        return objective.random_batch(self.transformer.config, self.cfg, self.vae_scale_factor,
                                      device or self.device, batch_size, resolution, seq_len)

    # ---- the loop ---------------------------------------------------------------------------------
    def bucket_of(self, mb: dict) -> str:
        """The micro-batch's aspect bucket in pixels, "HxW" (a batch never mixes buckets)."""
        h, w = mb["mean"].shape[-2:] if "mean" in mb else mb["pixels"].shape[-2:]
        f = self.vae_scale_factor if "mean" in mb else 1
        return f"{h * f}x{w * f}"

    def next_micro_batch(self) -> dict:
        """The next batch from the bucketed loader, crossing epochs."""
        return self.batches.next()

    def train(self) -> TrainResult:
        with self.signals.handling("finish"):  # a signal finishes the step, then checkpoints
            try:
                return self._train()
            finally:
                if self.batches:
                    self.batches.close()

    def _train(self) -> TrainResult:
        cfg, is_main = self.cfg, self.rank == 0
        t_start, start_step = time.perf_counter(), self.global_step
        compiled_before = observe.compile_counts()
        result = TrainResult(final_loss=float("nan"), losses=[], lora_path=None, steps_done=self.global_step,
                             start_step=start_step, output_dir=self.out, patch_report=self.patch_report,
                             cache_stats=self.cache_stats)
        if is_main:
            for note in state.begin_run(cfg, self.out, self._out_state, resume=self.resume, overwrite=self.overwrite):
                state.say(self.rank, f"fluxlab: {note}")
            self._out_state = "owned"
            self.metrics.trim(start_step)
            self.files.note(self.out / "config.yaml")
        self.metrics.start(cfg.steps, start_step, cfg.progress and is_main)
        profiler = (observe.Profiler(self.files, self.device, self.profile_steps, cfg.steps - start_step)
                    if self.profile_steps and is_main else None)
        last_ckpt = self.ckpt.last  # a run resumed at its last step trains nothing: that one stands
        try:
            start, n = self.batches.position, cfg.gradient_accumulation
            micro, wait = self.batches.fetch(n) if self.global_step < cfg.steps else ([], 0.0)
            while self.global_step < cfg.steps:
                # Where this step starts: a checkpoint written after an OOM in it must resume here,
                # not after the batches and random draws the failed step already took.
                self._step_start = (*start, checkpoints.capture_rng_state())
                t0 = time.perf_counter()
                try:
                    out = self.step(micro)
                except torch.OutOfMemoryError as e:
                    raise observe.oom_error(self, e) from None
                step, start = self.global_step, self.batches.position  # where the next step starts
                row = {"step": step, "epoch": start[0], "bucket": self.bucket_of(micro[0]), "loss": out["loss"],
                       "lr": out["lr"], "data_wait_s": wait}
                if step < cfg.steps:  # the next batches, fetched while this step's kernels still run
                    micro, wait = self.batches.fetch(n)
                row["step_time_s"] = time.perf_counter() - t0
                if observe.is_log_step(self.cfg, step) and out["grad_norm"] is not None:
                    row["grad_norm"] = out["grad_norm"]
                if cfg.validation_every and step % cfg.validation_every == 0 and is_main:
                    row["val_loss"] = result.val_losses[step] = objective.validation_loss(
                        self._loss, self.transformer, self.data.val_items, cfg.seed)
                if profiler is not None:
                    profiler.step(step)
                self.metrics.add(row, result, flush=observe.is_log_step(self.cfg, step))
                if observe.is_log_step(self.cfg, step):
                    self._check_finite()
                stop = build.agree(self.signals.stop_requested, self.device)  # every DDP rank stops together
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps or stop:
                    self.metrics.flush(result)
                    last_ckpt = self.save_checkpoint(start)
                if stop:
                    result.interrupted = True
                    break
            self.signals.phase = "final save"  # a signal from here on lets the final writes finish
        finally:
            self.metrics.close(result)
            if profiler is not None:
                profiler.stop()
        result.checkpoint_path, result.steps_done = last_ckpt, self.global_step
        if not result.interrupted:
            self._check_finite()
            result.lora_path = self.save_lora()
            result.adapter_sha256_per_rank = build.gather(state.adapter_digest(self.trainable_parameters()))
            if is_main and not self.signals.stop_requested:  # asked to stop: the curves can wait
                self._plot_curves()
        result.cache_stats = {**self.cache_stats, "position": self.positions.stats(), "position_by_bucket": {
            f"{h * self.vae_scale_factor}x{w * self.vae_scale_factor}": dict(n) for (h, w), n in self.positions.by_size.items()}}
        result.compile = observe.compile_counts(since=compiled_before)
        if self.device.type == "cuda":
            self.memory["train_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        result.memory, result.setup_s = dict(self.memory), self.setup_s
        result.writes_per_rank = build.gather(list(self.files.written))
        result.wall_s = time.perf_counter() - t_start
        if is_main:
            self.files.summary(result)
        build.barrier()
        return result

    def close(self) -> None:
        if self.batches:  # the workers ignore SIGTERM: never leave them to the interpreter's exit
            self.batches.close()
        if self._owns_process_group:
            build.destroy_distributed()
            self._owns_process_group = False

    # ---- files (rank 0 alone writes) -------------------------------------------------------------
    def save_lora(self) -> Path | None:
        """Write <output_dir>/pytorch_lora_weights.safetensors (diffusers format) from rank 0."""
        if self.rank != 0:
            return self.out / state.LORA_FILE
        return self.files.note(state.save_adapter(self.transformer, self.cfg.adapter, self.out))

    def save_checkpoint(self, position: tuple[int, int] | None = None) -> Path:
        """Every rank calls this; rank 0 writes and prunes. `position`: the (epoch, consumed) it
        records (the next step's batches may be fetched already), by default the current one.
        Raises TrainingDiverged instead of writing a checkpoint of non-finite weights."""
        self._check_finite()
        sampler = self.batches.state_dict(position or self.batches.position) if self.batches else {}
        val = self.metrics.history["val_loss"][-1] if self.metrics.history["val_loss"] else None
        path = self.ckpt.save(self.global_step, self.trainable_parameters(), self.optimizer, self.lr_scheduler,
                              sampler, val, build.gather)
        if self.rank == 0:
            self.files.note(path)
        build.barrier()
        return path

    def _check_finite(self) -> None:
        self.guard.check(list(self.trainable_parameters().values()), self.global_step, self.cfg, self.ckpt.last)

    def _plot_curves(self) -> None:
        observe.plot_curves(self.files)
