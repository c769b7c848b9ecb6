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
import math
import os
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fluxlab import memory
from fluxlab.models import compile_blocks, default_device, default_dtype, load_pipeline

QUANT_MODES = ("none", "nf4", "int8")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}


def min_samples(q: float) -> int:
    """Samples a q-th percentile needs to say more than "the largest sample": n >= 1 / (1 - q/100),
    so that on average one sample lies above it (p90: 10, p99: 100, p99.9: 1000)."""
    return math.ceil(1.0 / (1.0 - q / 100.0) - 1e-9)
STAGES = ("encode", "denoise", "decode")
MiB = 2**20


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


# --- quantization ----------------------------------------------------------------------------
def bnb_config(mode: str, compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers' BitsAndBytesConfig for 'nf4' (4-bit NormalFloat, double-quant) or 'int8'."""
    from diffusers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantize must be one of {QUANT_MODES[1:]} here, got {mode!r}")


def _require_bnb(device: torch.device):
    if device.type != "cuda":
        raise ValueError("quantize='nf4'/'int8' needs a CUDA device (bitsandbytes kernels); "
                         "set quantize='none' on the CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("quantize='nf4'/'int8' needs bitsandbytes: pip install 'fluxlab[quant]'") from e
    return bnb


def quantize_transformer(transformer: torch.nn.Module, mode: str, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every nn.Linear inside the transformer blocks for a bitsandbytes NF4/int8 layer, in place.

    For local checkpoints InferenceSession loads through `from_pretrained(quantization_config=
    BitsAndBytesConfig(...))`; the random-weight presets have no checkpoint, so this applies the
    same config's settings to the layers directly. The blocks hold >99% of the parameters; the
    embedders and final projection stay in `compute_dtype`, as diffusers' quantizer leaves them
    sensitive-layer-wise too. Returns the number of layers replaced.
    """
    device = next(transformer.parameters()).device
    bnb = _require_bnb(device)
    cfg = bnb_config(mode, compute_dtype)
    replaced = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                has_bias = child.bias is not None
                # Weights go through the CPU: older bitsandbytes only quantizes on a CPU->CUDA move.
                w = child.weight.data.to("cpu")
                if mode == "nf4":
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                            compute_dtype=cfg.bnb_4bit_compute_dtype, quant_type="nf4",
                                            compress_statistics=cfg.bnb_4bit_use_double_quant, device="meta")
                    new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                                   compress_statistics=cfg.bnb_4bit_use_double_quant, module=new)
                else:
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                              has_fp16_weights=False, threshold=cfg.llm_int8_threshold,
                                              device="meta")
                    new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                new.weight = new.weight.to(device)  # quantizes
                if has_bias:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, new)
                replaced += 1
    return replaced


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


@dataclass
class StageTimes:
    """Wall seconds of one generation's stages (device synchronized at each boundary)."""
    encode_s: float
    denoise_s: float
    decode_s: float
    steps: int

    @property
    def total_s(self) -> float:
        return self.encode_s + self.denoise_s + self.decode_s

    @property
    def per_step_s(self) -> float:
        return self.denoise_s / self.steps


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 * MAD: sigma of a normal, but a single huge outlier cannot inflate it and hide itself
    (with the plain std, a lone outlier among n samples can never exceed (n-1)/sqrt(n) sigma)."""
    mad = float(np.median(np.abs(x - np.median(x))))
    return 1.4826 * mad if mad > 0 else float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


@dataclass
class LatencyReport:
    """Per-generation latency after warm-up: raw samples, percentiles, 3-sigma outliers, stages."""
    samples_s: list[float]
    stages_s: dict[str, list[float]]
    warmup_s: list[float]
    percentiles_s: dict[str, float]
    mean_s: float
    std_s: float
    outliers: list[int]  # indices into samples_s
    outlier_rule: str = "|x - median| > 3 * 1.4826 * MAD"

    @property
    def n(self) -> int:
        return len(self.samples_s)

    def supported_percentiles_s(self) -> dict[str, float]:
        """The percentiles these n samples support (`min_samples`); the others are interpolations
        between the top samples and are left out of tables, plots and metrics."""
        return {k: v for k, v in self.percentiles_s.items() if self.n >= min_samples(PERCENTILES[k])}

    def percentile_note(self) -> str:
        """What n supports, e.g. "n=6 supports p50; p90 needs n >= 10"."""
        have = list(self.supported_percentiles_s())
        missing = [k for k in self.percentiles_s if k not in have]
        note = f"n={self.n} supports {', '.join(have) or 'no percentile'}"
        if missing:
            note += f"; {missing[0]} needs n >= {min_samples(PERCENTILES[missing[0]])}"
        return note

    def stage_split(self) -> dict[str, dict[str, float]]:
        """Median seconds and share of the median total per stage."""
        total = float(np.median(self.samples_s))
        return {k: {"median_s": float(np.median(v)), "share": float(np.median(v)) / total if total else math.nan}
                for k, v in self.stages_s.items()}

    def metrics(self) -> dict:
        return {"n": self.n, **{f"{k}_s": v for k, v in self.supported_percentiles_s().items()},
                "percentiles_note": self.percentile_note(), "mean_s": self.mean_s,
                "std_s": self.std_s, "outliers": self.outliers, "outlier_rule": self.outlier_rule,
                "warmup_s": self.warmup_s, "stages": self.stage_split()}

    def plot(self, ax=None):
        """Histogram of the samples with the supported percentiles and outliers marked; returns the axes."""
        import matplotlib.pyplot as plt

        from fluxlab.plots import plain_numbers

        ax = ax or plt.subplots(figsize=(7, 3.5), layout="constrained")[1]
        ms = np.asarray(self.samples_s) * 1e3
        ax.hist(ms, bins=min(30, max(5, self.n // 2)), color="#7a9cc6", edgecolor="white")
        for (name, v), style in zip(self.supported_percentiles_s().items(), ("-", "--", "-.", ":", ":")):
            ax.axvline(v * 1e3, color="k", linestyle=style, linewidth=1, label=f"{name} {v * 1e3:.1f} ms")
        if self.outliers:
            ax.plot(ms[self.outliers], np.zeros(len(self.outliers)), "rv", label="outlier (3σ)")
        ax.set_xlabel("generation wall time (ms)")
        ax.set_ylabel("generations")
        ax.set_title(f"latency over {self.n} generations (warm-up excluded)\n{self.percentile_note()}", fontsize=10)
        ax.yaxis.get_major_locator().set_params(integer=True)
        plain_numbers(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        return ax


def summarize_latency(samples_s, stages_s: dict | None = None, warmup_s=None) -> LatencyReport:
    """Aggregate raw per-generation seconds into a LatencyReport (numpy 'linear' percentiles)."""
    x = np.asarray(samples_s, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty 1-D list of latency samples, got shape {x.shape}")
    med, sigma = float(np.median(x)), robust_sigma(x)
    outliers = [int(i) for i in np.nonzero(np.abs(x - med) > 3 * sigma)[0]] if sigma > 0 else []
    return LatencyReport(
        samples_s=x.tolist(), stages_s={k: list(map(float, v)) for k, v in (stages_s or {}).items()},
        warmup_s=list(map(float, warmup_s or [])),
        percentiles_s={k: float(np.percentile(x, q)) for k, q in PERCENTILES.items()},
        mean_s=float(x.mean()), std_s=float(x.std(ddof=1)) if len(x) > 1 else 0.0, outliers=outliers)


@dataclass
class VramStages:
    """Memory at the session's stages, and each budget check (bytes)."""
    metric: str  # "allocated" on CUDA, "rss" on the CPU
    stages: dict[str, dict]
    budgets: dict[str, float]
    checks: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else "fail"

    def value(self, stage: str) -> int | None:
        s = self.stages.get(stage)
        return None if s is None else s["value"]

    def table(self) -> str:
        rows = [f"{'stage':<14}{self.metric + ' MiB':>16}"]
        for k, v in self.stages.items():
            shown = "-" if v["value"] is None else f"{v['value'] / MiB:,.1f}"
            rows.append(f"{k:<14}{shown:>16}")
        rows += [f"budget {c['name']}: {c['value'] / MiB:,.1f} MiB <= {c['budget'] / MiB:,.1f} MiB: "
                 f"{'ok' if c['ok'] else 'OVER'}" for c in self.checks]
        return "\n".join(rows)


@dataclass
class LeakReport:
    """Memory after each of N generations (after warm-up) and the growth verdict."""
    metric: str
    values: list[int]
    growth_bytes: int
    budget_bytes: float
    verdict: str  # "pass" or "leak", by fluxlab.memory.leak_verdict (slope CI and budget)
    peaks: list[int] = field(default_factory=list)  # CUDA: peak allocated during each generation
    slope: dict | None = None  # the leak_verdict behind `verdict` (trend, 99% CI, projection)

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"


@dataclass
class DeterminismReport:
    seed: int
    other_seed: int
    identical: bool  # same seed twice -> bit-identical image
    differs: bool  # a different seed -> a different image
    max_abs_diff_same_seed: float
    nondeterministic_ops: list[str]
    message: str

    @property
    def ok(self) -> bool:
        return self.identical and self.differs


# --- LoRA ------------------------------------------------------------------------------------
LORA_ADAPTER = "lora"


def lora_file(path: str | os.PathLike) -> Path:
    """The LoRA file at `path`: a .safetensors file, or a folder holding `fluxlab train`'s output."""
    from fluxlab.trainer import LORA_FILE

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

            _require_bnb(self.device)
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


def report_dict(obj) -> dict:
    """A report dataclass as a plain dict (for records)."""
    return asdict(obj)
