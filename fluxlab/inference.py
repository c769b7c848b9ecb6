"""Inference verification sessions: latency percentiles, VRAM stages, leaks, determinism.

`InferenceSession` wraps a FluxPipeline (any preset or local folder) with the options a team
weighs before shipping: fluxlab kernels, regional `torch.compile`, fused QKV, NF4/int8 through
bitsandbytes. Each generation is split into the pipeline's own stages, timed with a device
synchronize at every boundary:

    encode_prompt (CLIP + T5) -> pipeline denoising loop (output_type="latent") -> VAE decode

The library measures and reports; it asserts nothing about speed. Verdicts here are about
correctness (bit-identical seeds) and budgets the caller passes in (memory, leak growth).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from fluxlab import memory
from fluxlab.measure.reports import (MiB, PERCENTILES, STAGES, DeterminismReport, LatencyReport,  # noqa: F401
                                    LeakReport, StageTimes, VramStages, min_samples, report_dict, robust_sigma,
                                    summarize_latency)
from fluxlab.models import compile_blocks, default_device, default_dtype, load_pipeline
# Quantization lives below training and inference (fluxlab.quant); the names stay importable here.
from fluxlab.quant import QUANT_MODES, require_bnb, bnb_config, quantize_transformer  # noqa: F401


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than a text encoder accepts; the message names the dropped text."""


# --- prompts ---------------------------------------------------------------------------------
def _dropped_text(tokenizer, prompt: str, max_len: int) -> tuple[int, str]:
    """(token count, decoded text that truncation to `max_len` drops), ("", if nothing).

    Mirrors diffusers' FluxPipeline._get_*_prompt_embeds: the tokenizer keeps max_len - 1 tokens
    plus the end token, so what goes is ids[max_len - 1 : -1] (the last id is the end token).
    diffusers' own T5 message slices with CLIP's length, so we compute it ourselves.
    """
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    if len(ids) <= max_len:
        return len(ids), ""
    return len(ids), tokenizer.decode(ids[max_len - 1:-1], skip_special_tokens=True)


def check_prompt(prompt, tokenizer, tokenizer_2, max_len: int = 512) -> tuple[str, list[str]]:
    """Validate a prompt and warn (PromptTruncationWarning) about text the encoders will drop.

    Returns (prompt, warning messages). CLIP takes `tokenizer.model_max_length` (77) tokens, T5
    takes `max_len` (the pipeline's max_sequence_length). Raises TypeError for a non-string
    prompt and ValueError for an empty one, since both would otherwise fail deep inside a
    tokenizer or silently generate from nothing.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__} ({prompt!r:.80}); "
                        f"pass one prompt per generate() call")
    if not prompt.strip():
        raise ValueError("prompt is empty (or only whitespace); FLUX needs text to condition on. "
                         "Pass a non-empty prompt.")
    messages = []
    for name, tok, limit in (("CLIP", tokenizer, tokenizer.model_max_length), ("T5", tokenizer_2, max_len)):
        with _quiet("transformers.tokenization_utils_base"):  # its "longer than max" note adds nothing
            n, dropped = _dropped_text(tok, prompt, limit)
        if dropped:
            messages.append(f"prompt is {n} {name} tokens, longer than {name}'s {limit}; "
                            f"{name} drops: {dropped!r}")
    for msg in messages:
        warnings.warn(msg, PromptTruncationWarning, stacklevel=2)
    return prompt, messages


@contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR):
    """Temporarily raise a logger's level (for messages we replace with better ones)."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def shared_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A second FluxTransformer2DModel whose parameters are the *same tensors* as `transformer`'s.

    Lets a benchmark hold stock and optimized variants of one model (patched processors, compiled
    blocks, fused QKV) without a second copy of 24 GB, and so interleave them in one process.
    """
    cls = type(transformer)
    with torch.device("meta"):
        twin = cls(**transformer.config)
    # assign=True: share, don't copy.
    # Extra tensors of the source (fused to_qkv, anything a patch added) are simply not used.
    missing, _ = twin.load_state_dict(transformer.state_dict(), assign=True, strict=False)
    if missing:
        raise ValueError(f"shared_copy: the source lacks {len(missing)} stock {cls.__name__} tensors "
                         f"(e.g. {missing[:3]}); was it quantized or patched with renamed weights?")
    return twin.eval().requires_grad_(False)


def kernels_available() -> bool:
    """Whether fluxlab.kernels provides patch() on this checkout."""
    try:
        from fluxlab import kernels
    except ImportError:
        return False
    return callable(getattr(kernels, "patch", None))


# --- measurements ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- LoRA ------------------------------------------------------------------------------------
LORA_ADAPTER = "lora"


def lora_file(path: str | os.PathLike) -> Path:
    """The LoRA file at `path`: a .safetensors file, or a folder holding `fluxlab train`'s output."""
    # The name diffusers' save_lora_weights writes, which is what `fluxlab train` leaves in its output_dir.
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_FILE

    p = Path(path)
    if p.is_dir():
        p = p / LORA_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no LoRA there; pass a .safetensors file or a training output_dir "
                                f"holding {LORA_FILE} (`fluxlab train CONFIG` writes it at the end)")
    return p


def load_lora(pipe, path: str | os.PathLike, scale: float = 1.0) -> Path:
    """Load a diffusers-format LoRA into `pipe` with stock `load_lora_weights` and set its scale.

    The file's adapter metadata gives the trained alpha / rank; `scale` multiplies on top
    (1: as trained, 0: the base model). Returns the file loaded.
    """
    p = lora_file(path)
    with _quiet("diffusers.loaders.lora_base"):  # "no LoRA keys for CLIPTextModel": none are trained
        pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=LORA_ADAPTER)
    pipe.set_adapters([LORA_ADAPTER], adapter_weights=[float(scale)])
    return p


def generate_flux2(model: str, prompt: str, seed: int, *, device=None, steps: int = 4, size: int = 64,
                   guidance: float = 4.0, max_sequence_length: int = 512, lora: str | os.PathLike | None = None,
                   lora_scale: float = 1.0) -> torch.Tensor:
    """One FLUX.2 [klein] image [3, size, size] in [0, 1] through the stock Flux2KleinPipeline (the
    tiny preset or a folder), with a trained LoRA loaded by `load_lora`. InferenceSession's
    measurements (stage times, memory, leaks) are FLUX.1-only for now."""
    device = torch.device(device or default_device())
    pipe = load_pipeline(model, device, default_dtype(device))
    pipe.set_progress_bar_config(disable=True)
    if lora:
        load_lora(pipe, lora, lora_scale)
    gen = torch.Generator("cpu").manual_seed(int(seed))  # the same seed gives the same noise on every device
    out = pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
               generator=gen, max_sequence_length=max_sequence_length, output_type="pt").images  # [1, 3, H, W]
    return out[0]


# --- the session -----------------------------------------------------------------------------
class InferenceSession:
    """One pipeline plus its options; generates, and measures latency, memory, leaks, determinism.

    Loading is lazy, so `vram_stages()` can measure the baseline before the model exists.
    `pipe` reuses an already-built pipeline (e.g. a second session sharing text encoders and VAE).
    """

    def __init__(self, model: str = "tiny", device: str | None = None, dtype: torch.dtype | None = None, *,
                 kernels: bool = False, compile: bool = False, quantize: str = "none", fuse_qkv: bool = False,
                 steps: int = 4, size: int = 64, guidance: float = 3.5, max_sequence_length: int = 512,
                 compile_mode: str | None = None, compile_backend: str = "inductor", pipe=None, seed: int = 0,
                 lora: str | os.PathLike | None = None, lora_scale: float = 1.0):
        self.device = torch.device(device or default_device())
        self.dtype = dtype or default_dtype(self.device)
        if quantize not in QUANT_MODES:
            raise ValueError(f"quantize must be one of {QUANT_MODES}, got {quantize!r}")
        if quantize != "none" and self.device.type != "cuda":
            raise ValueError(f"quantize={quantize!r} needs a CUDA device (bitsandbytes); got device={self.device}. "
                             f"Set quantize='none' on the CPU.")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not (isinstance(size, int) and size > 0 and size % 16 == 0):
            raise ValueError(f"size must be a positive multiple of 16 (VAE /8, then 2x2 packing), got {size!r}")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512 (FLUX's T5 limit), got {max_sequence_length}")
        if lora:
            lora_file(lora)  # a wrong path fails here, before minutes of loading
            if fuse_qkv:
                raise ValueError("lora and fuse_qkv cannot be combined (fusing would drop the LoRA on q/k/v); "
                                 "set fuse_qkv=False")
        self.lora, self.lora_scale = (str(lora) if lora else None), float(lora_scale)
        self.model, self.kernels, self.compile, self.quantize = str(model), kernels, compile, quantize
        self.fuse_qkv, self.compile_mode, self.compile_backend, self.seed = fuse_qkv, compile_mode, compile_backend, seed
        self.steps, self.size, self.guidance, self.max_sequence_length = steps, size, guidance, max_sequence_length
        self.pipe = pipe
        self.patch_report = None
        self.quantized_layers = 0
        self.compiled_blocks = 0
        self._prepared = False

    # options as a flat dict, for records
    def params(self) -> dict:
        return {"model": self.model, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "kernels": self.kernels, "compile": self.compile, "compile_mode": self.compile_mode,
                "compile_backend": self.compile_backend,
                "quantize": self.quantize, "fuse_qkv": self.fuse_qkv, "steps": self.steps, "size": self.size,
                "guidance": self.guidance, "max_sequence_length": self.max_sequence_length,
                # only with a LoRA, so records without one keep their series key
                **({"lora": self.lora, "lora_scale": self.lora_scale} if self.lora else {})}

    def load(self):
        """Build or load the pipeline and apply the options (quantize, fuse, kernels, compile)."""
        if self._prepared:
            return self.pipe
        if self.pipe is None:
            self.pipe = self._load_pipeline()
        pipe = self.pipe
        pipe.set_progress_bar_config(disable=True)
        tr = pipe.transformer
        if self.quantize != "none" and not getattr(tr, "is_quantized", False) and not self.quantized_layers:
            self.quantized_layers = quantize_transformer(tr, self.quantize, self.dtype)
        if self.lora:  # before kernels / compile, which must see the LoRA layers
            load_lora(pipe, self.lora, self.lora_scale)
        if self.fuse_qkv:
            with torch.no_grad():
                tr.fuse_qkv_projections()
        if self.kernels:
            if not kernels_available():
                raise ImportError("kernels=True, but fluxlab.kernels has no patch() on this checkout; "
                                  "set kernels=False")
            from fluxlab import kernels

            self.patch_report = kernels.patch(tr)
        if self.compile:
            # bitsandbytes layers graph-break, so fullgraph only for unquantized blocks.
            kw = {"fullgraph": self.quantize == "none", "backend": self.compile_backend}
            if self.compile_mode:
                kw["mode"] = self.compile_mode
            self.compiled_blocks = compile_blocks(tr, **kw)
        self._prepared = True
        return pipe

    def _load_pipeline(self):
        if self.quantize != "none" and self.model not in ("tiny", "flux1-dev", "flux1-schnell"):
            # A real checkpoint: the documented diffusers path, quantizing while loading.
            from diffusers import FluxPipeline, FluxTransformer2DModel

            require_bnb(self.device)
            tr = FluxTransformer2DModel.from_pretrained(
                self.model, subfolder="transformer", quantization_config=bnb_config(self.quantize, self.dtype),
                torch_dtype=self.dtype, local_files_only=True)
            self.quantized_layers = -1  # counted by diffusers, not by us
            pipe = FluxPipeline.from_pretrained(self.model, transformer=tr, torch_dtype=self.dtype,
                                                local_files_only=True)
            return pipe.to(self.device)
        return load_pipeline(self.model, self.device, self.dtype, seed=self.seed)

    def close(self) -> None:
        """Drop the pipeline and give cached device memory back."""
        self.pipe, self._prepared = None, False
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one generation --
    def _check_out(self, out: torch.Tensor) -> None:
        want = (3, self.size, self.size)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor of shape {want}, got {type(out).__name__}")
        if tuple(out.shape) != want:
            raise ValueError(f"out has shape {tuple(out.shape)}, but this session makes images of shape {want} "
                             f"([3, size, size]); allocate torch.empty{want}")
        if not (out.is_floating_point() or out.dtype == torch.uint8):
            raise ValueError(f"out must be a floating or uint8 tensor, got {out.dtype}")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, S, 64] -> images [B, 3, H, W] in [0, 1], with the pipeline's own helpers."""
        pipe = self.pipe
        lat = pipe._unpack_latents(latents, self.size, self.size, pipe.vae_scale_factor)  # [B, 16, H/8, W/8]
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in ~[-1, 1]
        return pipe.image_processor.denormalize(img)  # (x / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, StageTimes]:
        """One image [3, H, W] (float in [0, 1], or written into `out`) and its stage times."""
        pipe = self.load()
        prompt, _ = check_prompt(prompt, pipe.tokenizer, pipe.tokenizer_2, self.max_sequence_length)
        if out is not None:
            self._check_out(out)  # before the work, so a bad buffer costs nothing
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        with _quiet("diffusers.pipelines.flux.pipeline_flux"):  # check_prompt already said what is dropped
            prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=dev,
                                                          max_sequence_length=self.max_sequence_length)
        # prompt_embeds [1, T5 len, 4096], pooled [1, 768] (real shapes)
        _sync(dev)
        t1 = time.perf_counter()
        # CPU generator: the same seed gives the same noise on every device.
        gen = torch.Generator("cpu").manual_seed(int(seed))
        latents = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=self.size, width=self.size,
                       num_inference_steps=self.steps, guidance_scale=self.guidance, generator=gen,
                       output_type="latent", max_sequence_length=self.max_sequence_length).images  # [1, S_img, 64]
        _sync(dev)
        t2 = time.perf_counter()
        image = self.decode(latents)[0]  # [3, H, W]
        if out is not None:
            out.copy_(image.mul(255).round() if out.dtype == torch.uint8 else image)
            image = out
        _sync(dev)
        t3 = time.perf_counter()
        return image, StageTimes(t1 - t0, t2 - t1, t3 - t2, self.steps)

    def refusals(self, prompts) -> dict[str, str]:
        """What generate() says to each prompt in `prompts`: its error ("Type: message"), or "accepted"."""
        out = {}
        for p in prompts:
            try:
                self.generate(p, self.seed)
                out[repr(p)] = "accepted"
            except (TypeError, ValueError) as e:
                out[repr(p)] = f"{type(e).__name__}: {e}"
        return out

    # -- measurements --
    def latency(self, prompts, seeds, warmup: int = 2, progress: bool = False) -> LatencyReport:
        """Time one generation per seed (prompts cycle), after `warmup` untimed-in-stats generations."""
        return latency_interleaved({"session": self}, prompts, seeds, warmup, progress)["session"]

    def _metric(self) -> str:
        return "allocated" if self.device.type == "cuda" else "rss"

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def vram_stages(self, budgets: dict | None = None, prompt: str = "a red circle", seed: int = 0) -> VramStages:
        """Memory at baseline (before loading), loaded, peak during one generation, after cleanup,
        read by fluxlab.memory's one sampler and stage profiler.

        `budgets` maps stage name (loaded, peak, after_cleanup, or `cleanup_leftover` = after_cleanup
        minus loaded) to bytes. On the CPU the metric is RSS, and the peak is the kernel's high-water
        mark since the stage began (where /proc allows resetting it; else bounded by start and end).
        """
        dev, metric = self.device, self._metric()
        gc.collect()
        _sync(dev)
        stages = {"baseline": ({"value": None, "note": "session was already loaded; no baseline"} if self._prepared
                               else {**memory.sample(dev), "value": memory.sample(dev)[metric]})}
        profile = memory.stage_profile(device=dev)
        with profile.stage("load"):
            self.load()
        with profile.stage("generate"):
            image, _ = self.generate(prompt, seed)
            del image
        with profile.stage("cleanup"):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        gen = profile["generate"]
        stages["loaded"] = {**memory.sample(dev), "value": profile["load"].end}
        stages["peak"] = {"value": gen.peak, "peak_exact": gen.peak_exact}
        stages["after_cleanup"] = {**memory.sample(dev), "value": profile["cleanup"].end}
        derived = {"cleanup_leftover": stages["after_cleanup"]["value"] - stages["loaded"]["value"]}
        checks = []
        for name, budget in (budgets or {}).items():
            if name in derived:
                value = derived[name]
            elif name in stages and stages[name]["value"] is not None:
                value = stages[name]["value"]
            else:
                raise ValueError(f"unknown budget {name!r}; budgets can name {[*stages, *derived]}")
            checks.append({"name": name, "value": int(value), "budget": float(budget), "ok": value <= budget})
        return VramStages(metric=metric, stages=stages, budgets=dict(budgets or {}), checks=checks)

    def leak_test(self, n: int = 10, budget_bytes: float = 50 * MiB, warmup: int = 2,
                  prompt: str = "a red circle", progress: bool = False) -> LeakReport:
        """Memory after each of `n` generations following `warmup`, judged by fluxlab's one leak
        rule (`fluxlab.memory.leak_verdict`): a leak is a slope whose 99% CI excludes 0 AND whose
        growth projected over the `n` generations exceeds `budget_bytes`. gc runs before each
        reading, so only memory that something still references counts.
        """
        if n < 3:
            raise ValueError(f"leak_test needs n >= 3 generations to fit a trend, got {n}")
        from tqdm.auto import tqdm

        for i in range(warmup):
            self.generate(prompt, i)
        metric, values, peaks = self._metric(), [], []
        for i in tqdm(range(n), desc="leak test", disable=not progress):
            self._reset_peak()
            image, _ = self.generate(prompt, warmup + i)
            del image
            gc.collect()
            _sync(self.device)
            now = memory.sample(self.device)
            values.append(int(now[metric]))
            if now["peak"] is not None:
                peaks.append(int(now["peak"]))
        trend = memory.leak_verdict(values, warmup=0, horizon=n, budget_bytes=budget_bytes)
        return LeakReport(metric=metric, values=values, growth_bytes=values[-1] - values[0],
                          budget_bytes=float(budget_bytes), verdict="leak" if trend.leak else "pass", peaks=peaks,
                          slope=trend.to_dict())

    def determinism(self, seed: int = 0, other_seed: int = 1, prompt: str = "a red circle") -> DeterminismReport:
        """Same seed twice must be bit-identical, a different seed must differ.

        On a mismatch, the pair is rerun under torch.use_deterministic_algorithms(warn_only=True)
        to collect torch's own warnings naming the non-deterministic ops.
        """
        a = self.generate(prompt, seed)[0].detach().cpu().clone()
        b = self.generate(prompt, seed)[0].detach().cpu().clone()
        c = self.generate(prompt, other_seed)[0].detach().cpu().clone()
        identical, differs = torch.equal(a, b), not torch.equal(a, c)
        diff = float((a.double() - b.double()).abs().max())
        ops: list[str] = []
        if not identical:
            ops = self._nondeterministic_ops(prompt, seed)
        if identical and differs:
            msg = f"seed {seed} twice: bit-identical; seed {other_seed}: different image"
        else:
            parts = []
            if not identical:
                parts.append(f"seed {seed} twice gave different images (max |diff| {diff:.3g}); "
                             + (f"torch names non-deterministic op(s): {', '.join(ops)}" if ops else
                                "torch named no non-deterministic op (look for atomics in custom kernels, "
                                "or set CUBLAS_WORKSPACE_CONFIG=:4096:8)"))
            if not differs:
                parts.append(f"seeds {seed} and {other_seed} gave the same image: the seed does not reach the noise")
            msg = "; ".join(parts)
        return DeterminismReport(seed, other_seed, identical, differs, diff, ops, msg)

    def _nondeterministic_ops(self, prompt: str, seed: int) -> list[str]:
        was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.generate(prompt, seed)
        finally:
            torch.use_deterministic_algorithms(was, warn_only=was_warn)
        ops = []
        for w in caught:
            text = str(w.message)
            m = re.match(r"\s*(\S+) does not have a deterministic implementation", text)
            name = m.group(1) if m else (text.splitlines()[0][:120] if "determinis" in text.lower() else None)
            if name and name not in ops:
                ops.append(name)
        return ops


def latency_interleaved(sessions: dict, prompts, seeds, warmup: int = 2,
                        progress: bool = False) -> dict[str, LatencyReport]:
    """Like InferenceSession.latency for several sessions, alternating them per seed (ABAB), so
    drift (clocks, thermals, other load) hits each alike. Returns one LatencyReport per name."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = list(seeds)
    if not prompts or not seeds:
        raise ValueError("latency_interleaved() needs at least one prompt and one seed")
    from tqdm.auto import tqdm

    warm = {k: [] for k in sessions}
    for i in range(warmup):
        for name, s in sessions.items():
            warm[name].append(s.generate(prompts[i % len(prompts)], seeds[i % len(seeds)])[1].total_s)
    totals = {k: [] for k in sessions}
    stages = {k: {st: [] for st in STAGES} for k in sessions}
    for i, seed in enumerate(tqdm(seeds, desc="latency", disable=not progress)):
        for name, s in sessions.items():
            t = s.generate(prompts[i % len(prompts)], seed)[1]
            totals[name].append(t.total_s)
            for st in STAGES:
                stages[name][st].append(getattr(t, f"{st}_s"))
    return {k: summarize_latency(totals[k], stages[k], warm[k]) for k in sessions}


def to_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] (or uint8) -> PIL.Image."""
    from PIL import Image

    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        x = x.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())
