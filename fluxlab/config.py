"""TrainConfig: the one typed configuration of a training run.

Loaded from YAML, then `--set key=value` overrides, each cast to its field's type. Unknown keys
are rejected with a "did you mean". Invalid combinations raise `ConfigError` (a `ValueError`)
naming the field to change, before any model is loaded. Checks that need the dataset size
(batch size x accumulation x world size) live in `TrainConfig.check_dataset_size`, which the
trainer calls right after reading the dataset and before it loads the model.

    cfg = load_config("configs/tiny.yaml", {"steps": "10", "learning_rate": "3e-4"})
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxlab.errors import UserError, UserFileNotFound

# FLUX's attention projections: both stream-pairs of the double blocks, and q/k/v of the single
# blocks (their output projection is fused with the MLP in `proj_out`, so it is not listed).
FLUX_ATTENTION_MODULES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
TIMESTEP_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


class ConfigError(UserError, ValueError):
    """A config value or combination the user must change; the message names the field."""


class ConfigWarning(UserWarning):
    """A setting that works but probably not as meant; shown as one `fluxlab: warning:` line."""


_format_warning = warnings.formatwarning


def _one_line(message, category, filename, lineno, line=None) -> str:
    # A ConfigWarning is about the user's config, not about the line of fluxlab that noticed it:
    # no "file.py:123: UserWarning" and no echoed source line.
    if issubclass(category, ConfigWarning):
        return f"fluxlab: warning: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _one_line


def default_cache_dir() -> Path:
    """$FLUXLAB_HOME/cache (default ~/.cache/fluxlab/cache): where `train` and `cache` keep caches."""
    return Path(os.environ.get("FLUXLAB_HOME", Path.home() / ".cache" / "fluxlab")) / "cache"


@dataclass(kw_only=True)
class TrainConfig:
    # --- what to train on ---------------------------------------------------------------------
    model: str = "tiny"
    """A preset (tiny, flux1-dev, flux1-schnell) or a folder saved with FluxPipeline.save_pretrained."""
    data: str = "data/shapes"
    """Folder of image + caption (.txt) pairs (see `fluxlab data validate`). The default is the
    synthetic set `fluxlab data shapes data/shapes --n 64 --seed 0` writes (`make demo` runs it)."""
    output_dir: str = "runs/train"
    """LoRA, checkpoints/, metrics.jsonl and curves land here."""
    cache_dir: str = ""
    """Where the latent and text-embedding caches live (content-addressed, shared between runs);
    empty means $FLUXLAB_HOME/cache (default ~/.cache/fluxlab/cache)."""
    resolution: int = 64
    """Target pixel area is resolution^2; aspect buckets keep it near that. Multiple of 16."""
    center_crop: bool = True
    """Crop to the bucket from the centre (else a seeded random crop per epoch)."""
    random_flip: bool = False
    """Seeded horizontal flips per epoch. Latents then cannot be cached: the VAE encodes every step."""
    max_sequence_length: int = 512
    """T5 tokens per caption (FLUX.1-dev: 512; the tiny preset trains fine with 32)."""

    # --- run length and reproducibility -------------------------------------------------------
    steps: int = 100
    """Optimizer steps in total (a resumed run continues up to this number)."""
    seed: int = 0
    """Seeds LoRA init, data order, noise and timesteps; everything random derives from it."""
    batch_size: int = 1
    """Images per micro-batch per process."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""

    # --- adapter ------------------------------------------------------------------------------
    adapter: str = "lora"
    """`lora` (peft) or `sparse` (fluxlab.kernels.sparse_delta)."""
    rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 0.0
    """LoRA alpha (the adapter's scale is alpha / rank); 0 means alpha = rank, scale 1 at any rank.
    This differs from diffusers' train_dreambooth_lora_flux.py, whose --lora_alpha defaults to 4 for
    every rank (scale 4 / rank): set lora_alpha=4 to train as that script does. The saved LoRA
    records alpha and rank, so `load_lora_weights` loads it at the trained scale either way."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input path."""
    target_modules: list[str] = field(default_factory=lambda: list(FLUX_ATTENTION_MODULES))
    """Module-name suffixes that get adapters. --set takes a comma-separated list."""
    sparse_density: float = 0.01
    """Fraction of weights the sparse adapter trains (adapter=sparse only)."""

    # --- optimizer ----------------------------------------------------------------------------
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "constant"
    """constant | linear | cosine (decay to 0 at `steps`), each after `lr_warmup_steps` of linear
    warm-up. Unlike diffusers' script, whose `constant` ignores --lr_warmup_steps, fluxlab's
    `constant` warms up first: it is diffusers' `constant_with_warmup` (and equals its `constant`
    when lr_warmup_steps=0)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay (diffusers' script default for the transformer)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""

    # --- objective (flow matching as diffusers' train_dreambooth_lora_flux.py) -----------------
    timestep_sampling: str = "none"
    """Weighting scheme: none (uniform) | logit_normal | mode | sigma_sqrt | cosmap."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Std of the logit-normal timestep density."""
    mode_scale: float = 1.29
    """Scale of the mode timestep density."""
    guidance_scale: float = 3.5
    """Guidance value fed to models with guidance embeddings (FLUX.1-dev)."""

    # --- precision and speed ------------------------------------------------------------------
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N. Under torchrun: cuda:LOCAL_RANK."""
    mixed_precision: str = "auto"
    """auto (bf16 where supported, else fp32) | no (fp32 everywhere) | bf16."""
    quantize: str = "none"
    """QLoRA base weights: none | nf4 | int8 (bitsandbytes, GPU only)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward: less memory, ~30% more time."""
    compile: bool = False
    """Regional torch.compile of every transformer block (fluxlab.models.compile_blocks, fullgraph)."""
    fuse_projections: bool = False
    """Fuse q/k/v (and add_q/k/v) into one base GEMM and one LoRA GEMM pair each (fluxlab.fusion);
    lossless: the same math in another summation order."""
    compile_mode: str = "default"
    """torch.compile mode with compile=true: default | reduce-overhead (CUDA graphs) |
    max-autotune-no-cudagraphs (inductor tunes its GEMMs) | max-autotune (both)."""
    use_kernels: bool = False
    """Patch the transformer with fluxlab's Triton kernels (fluxlab.kernels.patch)."""
    attention_backend: str = "auto"
    """SDPA backend through fluxlab.attention: auto (cuDNN with the grad-layout fix on Hopper, then
    flash, efficient, math), cudnn, flash, efficient or math. A backend the inputs cannot use falls
    back and the reason is recorded (fluxlab.attention.fallbacks())."""

    # --- data loading -------------------------------------------------------------------------
    num_workers: int = 2
    """DataLoader worker processes (0 loads in the training process)."""
    pin_memory: bool = True
    """Page-locked batches for faster host-to-GPU copies (ignored on the CPU)."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead (needs num_workers > 0)."""
    persistent_workers: bool = True
    """Keep workers alive across epochs (needs num_workers > 0)."""

    # --- logging, validation, checkpoints -----------------------------------------------------
    log_every: int = 10
    """Steps between log lines, progress-bar updates and gradient-norm measurements."""
    metrics_window: int = 1000
    """Length of the in-memory metric deques; the full history goes to metrics.jsonl."""
    validation_every: int = 0
    """Steps between validation losses on a fixed held-out batch; 0 turns validation off."""
    validation_size: int = 2
    """Images held out of training for the validation batch (used when validation_every > 0)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 writes one only at the end (and on interrupt)."""
    keep_last: int = 3
    """Checkpoints kept besides the best-by-validation one; 0 keeps all."""
    progress: bool = True
    """Show a tqdm progress bar."""

    # --- lr-find ------------------------------------------------------------------------------
    lr_find_min: float = 1e-7
    """Start of the `fluxlab lr-find` exponential sweep."""
    lr_find_max: float = 1.0
    """End of the sweep."""
    lr_find_steps: int = 60
    """Steps of the sweep (it stops early when the loss diverges)."""

    def __post_init__(self) -> None:
        if not self.cache_dir:  # derived: one shared, content-addressed cache per machine
            self.cache_dir = str(default_cache_dir())
        self.validate()

    # Derived values -----------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(self.rank)

    def resolved_device(self, local_rank: int | None = None) -> torch.device:
        from fluxlab.env import default_device

        dev = torch.device(default_device() if self.device == "auto" else self.device)
        if dev.type == "cuda" and (local_rank is not None or self.device == "auto"):
            return torch.device("cuda", local_rank or 0)
        return dev

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of base weights and autocast: fp32 on the CPU, bf16 where supported."""
        from fluxlab.env import default_dtype

        # "auto" on a GPU without bf16 gives fp32 (validate() refused an explicit "bf16" there).
        return torch.float32 if self.mixed_precision == "no" else default_dtype(device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Checks -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse bad values and combinations up front, naming the field to change."""
        def need(cond: bool, field_name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{field_name}: {msg}")

        # Every float must be finite: `--set learning_rate=inf` or `guidance_scale=nan` would train
        # to a NaN LoRA whose checkpoints verify.
        for name, typ in field_types().items():
            if typ is float:
                v = getattr(self, name)
                need(math.isfinite(v), name, f"must be a finite number, got {v}")
        need(bool(self.output_dir.strip()), "output_dir", "must not be empty; name the run's folder")
        need(bool(self.data.strip()), "data", "must not be empty; name the dataset folder")
        for name in ("steps", "batch_size", "gradient_accumulation", "rank", "resolution", "log_every",
                     "max_sequence_length", "metrics_window", "prefetch_factor", "lr_find_steps"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "checkpoint_every", "keep_last", "validation_every", "lr_warmup_steps",
                     "max_grad_norm", "weight_decay", "lora_alpha"):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        need(self.resolution % 16 == 0, "resolution",
             f"must be a multiple of 16 (VAE /8, then 2x2 packing), got {self.resolution}")
        need(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        need(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        need(0 < self.sparse_density <= 1, "sparse_density", f"must be in (0, 1], got {self.sparse_density}")
        need(self.adapter in ("lora", "sparse"), "adapter", f"choose lora or sparse, got {self.adapter!r}")
        need(self.lr_scheduler in ("constant", "linear", "cosine"), "lr_scheduler",
             f"choose constant, linear or cosine, got {self.lr_scheduler!r}")
        need(self.timestep_sampling in TIMESTEP_SCHEMES, "timestep_sampling",
             f"choose one of {', '.join(TIMESTEP_SCHEMES)}, got {self.timestep_sampling!r}")
        need(self.logit_std > 0, "logit_std", f"must be > 0, got {self.logit_std}")
        for name in ("adam_beta1", "adam_beta2"):
            need(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        need(self.adam_epsilon > 0, "adam_epsilon", f"must be > 0, got {self.adam_epsilon}")
        need(self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        need(self.mode_scale >= 0, "mode_scale", f"must be >= 0, got {self.mode_scale}")
        need(self.mixed_precision in ("auto", "no", "bf16"), "mixed_precision",
             f"choose auto, no or bf16, got {self.mixed_precision!r}")
        need(self.quantize in ("none", "nf4", "int8"), "quantize",
             f"choose none, nf4 or int8, got {self.quantize!r}")
        need(bool(self.target_modules), "target_modules", "list at least one module-name suffix")
        need(self.compile_mode in COMPILE_MODES, "compile_mode",
             f"choose one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        # Measured on an H200 (torch 2.11): regional compile with fullgraph fails to trace the
        # Triton launchers, and inductor already fuses the same elementwise ops. One or the other.
        need(not (self.use_kernels and self.compile), "use_kernels",
             "use_kernels and compile cannot be combined (torch.compile cannot trace fluxlab's Triton "
             "launchers, and inductor already fuses those ops): set use_kernels=false or compile=false")
        need(self.validation_size >= 1 or self.validation_every == 0, "validation_size",
             "must be >= 1 when validation_every > 0")
        need(0 < self.lr_find_min < self.lr_find_max, "lr_find_min",
             f"need 0 < lr_find_min < lr_find_max, got {self.lr_find_min} and {self.lr_find_max}")
        if self.adapter == "sparse":
            need(self.quantize == "none", "quantize", "the sparse adapter needs unquantized base weights; "
                 "set quantize=none or adapter=lora")

        try:
            device = self.resolved_device()
        except RuntimeError as e:
            raise ConfigError(f"device: {e}; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: CUDA was requested but torch sees no GPU; set device=cpu or auto")
        if self.mixed_precision == "bf16":
            need(device.type == "cuda", "mixed_precision",
                 "bf16 is only used on a GPU (fluxlab trains in fp32 on the CPU); set mixed_precision=auto or no")
            need(torch.cuda.is_bf16_supported(), "mixed_precision",
                 f"this GPU ({torch.cuda.get_device_name(device)}) does not support bf16; set mixed_precision=no")
        if self.quantize != "none":
            need(device.type == "cuda", "quantize",
                 f"{self.quantize} base weights (bitsandbytes) need a CUDA GPU; set quantize=none on the CPU")
        if self.lr_warmup_steps > self.steps:
            warnings.warn(f"lr_warmup_steps ({self.lr_warmup_steps}) > steps ({self.steps}): the learning rate "
                          f"never reaches learning_rate", ConfigWarning, stacklevel=2)
        if self.use_kernels and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            # Interpreted on purpose (tests, CI notebooks) is not worth a warning; forgetting it is.
            warnings.warn("use_kernels on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter, slow) set "
                          "before fluxlab starts; set it, or use_kernels=false", ConfigWarning, stacklevel=2)

    def check_dataset_size(self, n_images: int, world_size: int = 1) -> None:
        """Refuse a run whose optimizer step needs more images than the dataset holds."""
        held_out = self.validation_size if self.validation_every > 0 else 0
        n_train = n_images - held_out
        if held_out and n_train < 1:
            raise ConfigError(f"validation_size: holding out {held_out} of {n_images} images leaves none to "
                              f"train on; lower validation_size or set validation_every=0")
        per_step = self.batch_size * self.gradient_accumulation * world_size
        if per_step > n_train:
            raise ConfigError(
                f"gradient_accumulation: one optimizer step needs batch_size ({self.batch_size}) x "
                f"gradient_accumulation ({self.gradient_accumulation}) x processes ({world_size}) = {per_step} "
                f"images, but the training set has {n_train}"
                + (f" ({held_out} held out for validation)" if held_out else "")
                + "; lower batch_size or gradient_accumulation, or add images")


# --- loading and overrides ----------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it), for `--help`-style listings."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def cast_value(key: str, value: Any, typ: Any) -> Any:
    """Cast a YAML or --set value to the field's type; a ConfigError names the field otherwise."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{key}: expected {expected}, got {value!r}")

    if typing.get_origin(typ) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings (comma-separated with --set)")
        return list(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:  # "1e3" style
                    f = float(value)
                except ValueError:
                    raise bad("an integer") from None
                if f.is_integer():
                    return int(f)
        raise bad("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string; accept it
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad("a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise TypeError(f"{key}: unsupported field type {typ}")  # internal: a field type cast_value lacks


def _check_keys(keys, where: str) -> None:
    known = list(field_types())
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {key!r} in {where}{hint}")


def config_from_dict(values: dict[str, Any], overrides: dict[str, str] | None = None,
                     where: str = "config") -> TrainConfig:
    """Build a TrainConfig from a dict (YAML) plus string overrides (`--set`), casting each value."""
    types = field_types()
    values = dict(values or {})
    _check_keys(values, where)
    _check_keys(overrides or {}, "--set")
    merged = {**values, **(overrides or {})}
    return TrainConfig(**{k: cast_value(k, v, types[k]) for k, v in merged.items()})


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Read a YAML config and apply `--set` overrides. `path=None` starts from the defaults."""
    import yaml

    values: dict[str, Any] = {}
    where = "--set"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserFileNotFound(f"{path}: config file not found")
        try:
            # safe_load: a tag such as !!python/object is refused, never constructed or run.
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start}); save the config as UTF-8") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of key: value")
        where = str(path)
    return config_from_dict(values, overrides, where=where)


def _yaml_problem(e) -> str:
    """One line for a YAML error: where, what, and for a refused tag that nothing ran."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "could not determine a constructor for the tag" in str(e):
        tag = problem.split("tag", 1)[-1].strip().strip("'")
        return f"{where}unsafe YAML tag {tag} refused (nothing was run); configs hold plain values only"
    return f"{where}YAML syntax error: {problem}; fix the file (a missing colon, quote or indent?)"


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    from fluxlab._atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
