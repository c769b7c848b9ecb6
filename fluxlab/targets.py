"""Validation targets: one optimization each, open to a researcher's own.

A target says how to make inputs, what the claimed fast path and its baselines are, what the
correctness reference is, and what must be *seen* when the fast path runs (profiler event names,
counters). `notebooks/validation_session.ipynb` runs any target through the same claim engine:

    from fluxlab import targets
    T = targets.define(
        "my_gelu",
        make_inputs=make,              # (shape, device, dtype, seed) -> tuple of positional args
        candidate=my_fast_gelu,        # the claimed fast path
        baselines={"eager": torch.nn.functional.gelu},
        reference=None,                # correctness reference; default: the first baseline
        kernels=[r"my_fast_gelu"],     # regexes on profiler event names (CPU ops, record_function labels, CUDA kernels)
        counters=None,                 # or a zero-argument callable returning counters that must move
    )
    fluxlab notebook run validation_session -p target=mypkg.mymod:T -p shapes='[[4096]]'

`make_inputs` must draw the same values for every dtype from one seed (draw in float64, then
cast), because correctness is judged against the reference run on float64 inputs: the fast path's
error may be at most 2x the reference's own error in the same dtype.

Built-in targets cover every fluxlab fast path (`TARGETS`); `FLUXLAB_DISABLE=<name>` switches a
built-in fast path off and its verdict must then read `did-not-run`.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from fluxlab import bench
from fluxlab.kernels import _common as kernel_switches

Inputs = Callable[[Sequence[int], torch.device, torch.dtype, int], tuple]


@dataclass
class Target:
    name: str
    make_inputs: Inputs
    candidate: Callable[..., Any]
    baselines: dict[str, Callable[..., Any]]
    reference: Callable[..., Any] | None = None
    kernels: tuple[str, ...] = ()
    counters: Callable[[], Mapping[str, int]] | None = None
    still: tuple[str, ...] = ()          # counters that must not move (a cache miss)
    forbid: tuple[str, ...] = ()         # profiler names of the old path, which must not appear
    kernels_on: tuple[str, ...] = ("cpu", "cuda")  # device types where `kernels` can be seen
    devices: tuple[str, ...] = ("cpu", "cuda")     # device types the target runs on
    kind: str = "external"
    description: str = ""
    shape_doc: str = ""
    default_shapes: tuple[tuple[int, ...], ...] = ()
    module: str | None = None            # import that must succeed for the target to be available

    def __post_init__(self):
        if not self.baselines:
            raise ValueError(f"target {self.name!r}: give at least one baseline")
        for k in (*self.kernels, *self.forbid):
            re.compile(k)  # a bad pattern fails here, not after a long run

    @property
    def ref(self) -> Callable[..., Any]:
        return self.reference or next(iter(self.baselines.values()))

    def available(self, device: torch.device | None = None) -> tuple[bool, str]:
        if self.module:
            try:
                importlib.import_module(self.module)
            except ImportError as e:
                return False, f"{self.module} cannot be imported ({e})"
        if device is not None and device.type not in self.devices:
            return False, f"{self.name} runs on {', '.join(self.devices)}, not {device.type}"
        return True, "ok"

    def disabled(self) -> bool:
        """Named in $FLUXLAB_DISABLE (built-in targets only; read at call time)."""
        return self.kind != "external" and self.name.split(".")[0] in kernel_switches.requested_off()

    def expect(self, device: torch.device) -> bench.Expect:
        """What the timed loop must see for the candidate to count as having run."""
        pats = self.kernels if device.type in self.kernels_on else ()
        counted = {}
        if self.counters is not None:
            keys = list(self.counters()) or ["*"]
            counted = {k: 1 for k in keys if k not in self.still}
        if not pats and not counted:
            raise ValueError(f"target {self.name!r} declares no evidence usable on {device.type}: "
                             f"give kernels=[regex, ...] or counters=callable")
        return bench.Expect(counters=counted, still=self.still, kernels=pats, forbid=self.forbid,
                            read=self.counters)

    def inputs(self, shape, device, dtype, seed: int = 0) -> tuple:
        args = self.make_inputs(list(shape), torch.device(device), dtype, seed)
        if not isinstance(args, tuple):
            raise TypeError(f"target {self.name!r}: make_inputs must return a tuple of positional args, "
                            f"got {type(args).__name__}")
        return args

    def check(self, shape, device, dtype, seed: int = 0) -> dict:
        """Correctness against the reference on float64 inputs (fresh inputs, outputs compared
        elementwise); the bound is 2x the reference's own error in `dtype`, with a small floor."""
        args = self.inputs(shape, device, dtype, seed)
        ref64 = _float64(self.ref(*self.inputs(shape, device, torch.float64, seed)))
        err_fast = _max_err(self.candidate(*args), ref64)
        err_ref = _max_err(self.ref(*args), ref64)
        bound = max(2 * err_ref, FLOOR.get(dtype, 1e-5))
        return {"ok": bool(err_fast <= bound), "max_abs_err": err_fast, "reference_err": err_ref, "bound": bound}

    def measure(self, args: tuple, *, baseline: str | None = None, repeats: int = 15, warmup: int = 2,
                device="cpu", claimed: float | None = None, profile_iters: int = 1,
                clock: str = "auto") -> tuple[bench.Measurement, bench.Comparison]:
        """Baseline and candidate timed ABAB, the candidate's evidence checked in that loop, one verdict."""
        device = torch.device(device)
        baseline = baseline or next(iter(self.baselines))
        if baseline not in self.baselines:
            raise KeyError(f"baseline {baseline!r}: {self.name} offers {list(self.baselines)}")
        base, cand = self.baselines[baseline], self.candidate
        m = bench.run({"baseline": lambda: base(*args), "candidate": lambda: cand(*args)}, repeats=repeats,
                      warmup=warmup, device=device, clock=clock, profile_iters=profile_iters,
                      expect={"candidate": self.expect(device)})
        c = bench.compare(m.samples["baseline"], m.samples["candidate"], claimed=claimed,
                          evidence=m.evidence["candidate"])
        return m, c


def define(name: str, *, make_inputs: Inputs, candidate: Callable, baselines: dict[str, Callable],
           reference: Callable | None = None, kernels: Sequence[str] | None = None,
           counters: Callable[[], Mapping[str, int]] | None = None, **meta) -> Target:
    """A validation target for your own optimization (see the module docstring). `kernels` are
    regexes fully matched against profiler event names; `counters` returns counters each of which
    must move at least once per timed call. At least one of the two is required."""
    if not kernels and counters is None:
        raise ValueError(f"target {name!r}: give kernels=[regex, ...] or counters=callable, or nothing "
                         f"could show that the fast path ran")
    return Target(name=name, make_inputs=make_inputs, candidate=candidate, baselines=dict(baselines),
                  reference=reference, kernels=tuple(kernels or ()), counters=counters, **meta)


# --- correctness helpers ---------------------------------------------------------------------------
FLOOR = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _flat(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _float64(out) -> list[torch.Tensor]:
    return [t.detach().double() for t in _flat(out)]


def _max_err(out, ref64: list[torch.Tensor]) -> float:
    outs = _flat(out)
    if len(outs) != len(ref64):
        raise ValueError(f"candidate returned {len(outs)} tensor(s), the reference {len(ref64)}")
    return max(float((o.detach().double() - r.to(o.device)).abs().max()) for o, r in zip(outs, ref64))


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def _cast(device, dtype, *tensors) -> tuple:
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in tensors)


def _angles(g: torch.Generator, S: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    ang = _randn(g, S, D // 2).repeat_interleave(2, dim=1)  # [S, D]
    return ang.cos(), ang.sin()


def _family_counter(family: str) -> Callable[[], dict]:
    return lambda: {family: kernel_switches.family_totals()[family]}


# --- built-in kernel targets -----------------------------------------------------------------------
def _rope_inputs(shape, device, dtype, seed):
    B, S, H, D = shape
    g = torch.Generator().manual_seed(seed)
    return _cast(device, dtype, _randn(g, B, S, H, D), *_angles(g, S, D))  # x [B, S, H, D], cos/sin [S, D]


def _qk_inputs(shape, device, dtype, seed):
    B, S, H, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k = _randn(g, B, S, H, D), _randn(g, B, S, H, D)               # [B, S, H, D]
    wq, wk = 1 + 0.1 * _randn(g, D), 1 + 0.1 * _randn(g, D)           # [D]
    return _cast(device, dtype, q, k, wq, wk, *_angles(g, S, D))


def _adaln_inputs(shape, device, dtype, seed):
    B, S, C = shape
    g = torch.Generator().manual_seed(seed)
    return _cast(device, dtype, _randn(g, B, S, C), 0.1 * _randn(g, B, C), 0.1 * _randn(g, B, C))  # x, scale, shift


def _adaln_gated_inputs(shape, device, dtype, seed):
    B, S, C = shape
    g = torch.Generator().manual_seed(seed)
    return _cast(device, dtype, _randn(g, B, S, C), _randn(g, B, S, C),                     # residual, x [B, S, C]
                 *(0.1 * _randn(g, B, C) for _ in range(3)))                                # gate, scale, shift [B, C]


def _sparse_inputs(shape, device, dtype, seed):
    out_f, in_f, k = shape
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(out_f * in_f, generator=g)[:k].to(torch.int32)  # [K] unique flat indices
    return _cast(device, dtype, _randn(g, out_f, in_f), 0.01 * _randn(g, k), index)


def _kernel_target(name, family, make, fast, reference, description, shape_doc, shapes, **kw) -> Target:
    return Target(name=name, make_inputs=make, candidate=fast, baselines={"reference": reference},
                  kernels=(bench.family_pattern(family),), kernels_on=("cuda",), counters=_family_counter(family),
                  kind="kernel", description=description, shape_doc=shape_doc, default_shapes=shapes,
                  module=f"fluxlab.kernels.{family}", **kw)


def _kernel_targets() -> list[Target]:
    from fluxlab.kernels import adaln, qk_norm_rope, rope, sparse_delta

    return [
        _kernel_target("rope", "rope", _rope_inputs, rope.apply_rope, rope.reference,
                       "fused RoPE (fluxlab.kernels.rope.apply_rope)", "[B, S, H, D]", ((1, 64, 2, 16),)),
        _kernel_target("qk_norm_rope", "qk_norm_rope", _qk_inputs, qk_norm_rope.qk_norm_rope, qk_norm_rope.reference,
                       "fused RMSNorm(q, k) + RoPE + transpose", "[B, S, H, D]", ((1, 64, 2, 16),)),
        _kernel_target("adaln", "adaln", _adaln_inputs, adaln.modulate, adaln.reference,
                       "fused LayerNorm * (1 + scale) + shift", "[B, S, C]", ((1, 64, 48),)),
        _kernel_target("adaln.gated", "adaln", _adaln_gated_inputs, adaln.gated_residual_modulate,
                       adaln.reference_gated, "fused residual + gate * x, then adaLN", "[B, S, C]", ((1, 64, 48),)),
        _kernel_target("sparse_delta", "sparse_delta", _sparse_inputs, sparse_delta.sparse_delta,
                       sparse_delta.reference, "W + scatter(theta) for the sparse-delta adapter",
                       "[out_features, in_features, K]", ((64, 48, 300),)),
    ]


# --- attention: fluxlab's cuDNN path (with the dense-gradient fix) against stock SDPA ----------------
def _attention_inputs(shape, device, dtype, seed):
    B, S, H, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (_randn(g, B, S, H, D) for _ in range(4))  # [B, S, H, D], diffusers' layout
    return _cast(device, dtype, q, k, v, grad)


def _fwd_bwd(attend: Callable, q, k, v, grad):
    """Forward and backward of one attention call -> (out, dq, dk, dv), each [B, S, H, D]."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out.detach(), dq, dk, dv


def _stock_sdpa(backend: str | None):
    def attend(q, k, v):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        tq, tk, tv = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if backend is None:
            return F.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2)
    return lambda *a: _fwd_bwd(attend, *a)


def _fluxlab_attention(q, k, v, grad):
    from fluxlab import attention

    backend = "flash" if TARGETS["attention"].disabled() else "cudnn"
    return _fwd_bwd(lambda a, b, c: attention.sdpa(a, b, c, backend=backend), q, k, v, grad)


def _attention_target() -> Target:
    cudnn = bench.ATTENTION_KERNELS["cudnn"]
    return Target(name="attention", make_inputs=_attention_inputs, candidate=_fluxlab_attention,
                  baselines={"flash": _stock_sdpa("FLASH_ATTENTION"), "stock": _stock_sdpa(None)},
                  reference=_stock_sdpa("MATH"), kernels=(cudnn[0], cudnn[2]),
                  forbid=bench.ATTENTION_KERNELS["flash"], kernels_on=("cuda",), devices=("cuda",),
                  kind="attention", description="fluxlab.attention.sdpa on cuDNN (dense grad_out) vs stock SDPA, fwd+bwd",
                  shape_doc="[B, S, H, D]", default_shapes=((1, 4608, 24, 128),), module="fluxlab.attention")


# --- caches: the cache must serve every timed call (hits move, misses stay still) --------------------
_STATE: dict[str, Any] = {}


def _cache_counters(name: str) -> Callable[[], dict]:
    # Only hits and misses: entry and byte counts do not move on a hit.
    return lambda: {k: _STATE[name].stats()[k] if name in _STATE else 0 for k in ("hits", "misses")}


def _position_inputs(shape, device, dtype, seed):
    from fluxlab.caches import PositionIdCache

    h, w, text_len = shape  # latent height/width (before 2x2 packing) and text length
    cache = _STATE.setdefault("position_ids", PositionIdCache())
    cache.get(h, w, text_len, device, dtype)  # warm: the candidate times hits
    return cache, h, w, text_len, device, dtype


def _position_uncached(cache, h, w, text_len, device, dtype):
    from diffusers import FluxPipeline

    return (FluxPipeline._prepare_latent_image_ids(None, h // 2, w // 2, device, dtype),  # [h/2*w/2, 3]
            torch.zeros(text_len, 3, device=device, dtype=dtype))                         # [text_len, 3]


def _position_cached(cache, h, w, text_len, device, dtype):
    if TARGETS["position_ids"].disabled():
        return _position_uncached(cache, h, w, text_len, device, dtype)
    return cache.get(h, w, text_len, device, dtype)


def use_model(name: str = "tiny") -> None:
    """The pipeline the cache targets (text_embeddings, latents) encode with: `tiny` (on the CPU in
    fp32, whatever the device) or a real-shape preset / FLUX folder, loaded without its transformer
    on the target's device (`flux1-dev-full`: FLUX's VAE and T5-XXL at real scale)."""
    if _STATE.get("model", "tiny") != name:
        for key in [k for k in _STATE if k == "pipe" or k.startswith(("text_embeddings", "latents"))]:
            del _STATE[key]
        _STATE["model"] = name


def _pipe(device, dtype):
    if "pipe" not in _STATE:
        from fluxlab import models

        name = _STATE.get("model", "tiny")
        if name == "tiny":
            device, dtype = "cpu", torch.float32
        _STATE["pipe"] = models.load_pipeline(name, device=device, dtype=dtype, transformer=False)
    return _STATE["pipe"]


def _text_inputs(shape, device, dtype, seed):
    from fluxlab.caches import TextEmbeddingCache

    (max_len,) = shape
    key = f"text_embeddings:{max_len}"
    if key not in _STATE:
        _STATE[key] = TextEmbeddingCache(tempfile.mkdtemp(prefix="fluxlab-text-"), _pipe(device, dtype), max_len)
    _STATE["text_embeddings"] = cache = _STATE[key]
    caption = f"a large red circle at the center, seed {seed}"
    cache.get(caption)  # warm
    return cache, caption


@torch.no_grad()
def _text_uncached(cache, caption):
    device = next(cache.pipe.text_encoder_2.parameters()).device
    embeds, pooled, _ = cache.pipe.encode_prompt(caption, device=device, max_sequence_length=cache.max_sequence_length)
    return embeds[0].cpu(), pooled[0].cpu()  # [S, D], [D_pool], on the CPU as the cache serves them


def _text_cached(cache, caption):
    return _text_uncached(cache, caption) if TARGETS["text_embeddings"].disabled() else cache.get(caption)


def _latent_inputs(shape, device, dtype, seed):
    from fluxlab.caches import LatentCache

    h, w = shape  # pixels
    if "latents_cache" not in _STATE:
        _STATE["latents_cache"] = LatentCache(tempfile.mkdtemp(prefix="fluxlab-latents-"), _pipe(device, dtype).vae)
    _STATE["latents"] = cache = _STATE["latents_cache"]
    g = torch.Generator().manual_seed(seed)
    pixels = (2 * torch.rand(3, h, w, generator=g) - 1).float()  # [3, H, W] in [-1, 1]
    sha = f"seed{seed}-{h}x{w}"
    preprocess = {"bucket": [h, w], "center_crop": True, "random_flip": False}
    cache.get(sha, preprocess, lambda: pixels)  # warm
    return cache, sha, preprocess, pixels


def _latent_uncached(cache, sha, preprocess, pixels):
    out = cache._encode(lambda: pixels)
    return out["mean"], out["logvar"]  # [16, H/8, W/8] each


def _latent_cached(cache, sha, preprocess, pixels):
    if TARGETS["latents"].disabled():
        return _latent_uncached(cache, sha, preprocess, pixels)
    return cache.get(sha, preprocess, lambda: pixels)


def _cache_target(name, make, fast, slow, description, shape_doc, shapes) -> Target:
    return Target(name=name, make_inputs=make, candidate=fast, baselines={"uncached": slow},
                  counters=_cache_counters(name), still=("misses",), kind="cache", description=description,
                  shape_doc=shape_doc, default_shapes=shapes, module="fluxlab.caches")


# --- torch.compile of one FLUX single-stream block ------------------------------------------------------
_COMPILED: dict[int, Callable] = {}


def _compile_inputs(shape, device, dtype, seed):
    from fluxlab import models

    B, S, T = shape  # batch, image tokens, text tokens
    key = f"compile_block:{seed}"
    if key not in _STATE:  # built once in float64, cast per dtype: every dtype holds the same weights
        _STATE[key] = models.build_transformer("tiny", "cpu", torch.float64, seed=seed)
    tr = _STATE[key]
    block = copy.deepcopy(tr.single_transformer_blocks[0]).to(device, dtype)
    inner = tr.config.num_attention_heads * tr.config.attention_head_dim
    g = torch.Generator().manual_seed(seed)
    hidden, text, temb = _cast(device, dtype, _randn(g, B, S, inner), _randn(g, B, T, inner), _randn(g, B, inner))
    return block, hidden, text, temb  # [B, S, C], [B, T, C], [B, C]


@torch.no_grad()
def _eager_block(block, hidden, text, temb):
    return block(hidden, text, temb)


@torch.no_grad()
def _compiled_block(block, hidden, text, temb):
    if TARGETS["compile"].disabled():
        return block(hidden, text, temb)
    fn = _COMPILED.setdefault(id(block), torch.compile(block))
    return fn(hidden, text, temb)


def _builtin_targets() -> list[Target]:
    return [
        *_kernel_targets(),
        _attention_target(),
        _cache_target("position_ids", _position_inputs, _position_cached, _position_uncached,
                      "PositionIdCache vs FluxPipeline._prepare_latent_image_ids", "[latent_h, latent_w, text_len]",
                      ((64, 64, 512),)),
        _cache_target("text_embeddings", _text_inputs, _text_cached, _text_uncached,
                      "TextEmbeddingCache vs encode_prompt (targets.use_model: tiny by default)", "[max_sequence_length]", ((32,),)),
        _cache_target("latents", _latent_inputs, _latent_cached, _latent_uncached,
                      "LatentCache vs VAE encode (targets.use_model: tiny by default)", "[height, width] in pixels", ((64, 64),)),
        Target(name="compile", make_inputs=_compile_inputs, candidate=_compiled_block, baselines={"eager": _eager_block},
               kernels=(r"Torch-Compiled Region: \d+/\d+",), kind="compile",
               description="torch.compile of one FLUX single-stream block", shape_doc="[B, image tokens, text tokens]",
               default_shapes=((1, 64, 16),)),
    ]


TARGETS: dict[str, Target] = {t.name: t for t in _builtin_targets()}


def get(name: str) -> Target:
    if name not in TARGETS:
        hint = difflib.get_close_matches(name, list(TARGETS), n=1)
        raise KeyError(f"unknown target {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                       + f" (targets: {', '.join(TARGETS)}; or package.module:ATTR for your own)")
    return TARGETS[name]


def resolve(spec: str) -> Target:
    """A built-in target's name, or `package.module:ATTR` naming a Target made with `define`."""
    if ":" not in spec:
        return get(spec)
    module, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"target {spec!r}: cannot import {attr!r} from {module!r} ({e}); is the module on "
                       f"PYTHONPATH?") from e
    if not isinstance(obj, Target):
        raise KeyError(f"target {spec!r} is a {type(obj).__name__}, not a Target made with fluxlab.targets.define")
    return obj


def resolve_device(device: str) -> torch.device:
    from fluxlab.models import default_device

    return torch.device(default_device() if device == "auto" else device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        from fluxlab.models import default_dtype

        return default_dtype(device)
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}: choose auto, {', '.join(names)}")
    return names[dtype]


def preflight(target: Target, device: torch.device) -> dict:
    """Environment, import and device checks before anything is measured."""
    from fluxlab import env

    ok, why = target.available(device)
    info = {"target": target.name, "kind": target.kind, "available": ok, "why": why,
            "device": str(device), "device_ok": device.type != "cuda" or torch.cuda.is_available(),
            "disabled_by_env": target.disabled(), "evidence": target.expect(device).to_dict() if ok else None}
    if target.kind == "kernel" and ok:
        info.update(have_triton=kernel_switches.HAVE_TRITON, triton_interpret=kernel_switches.interpreting())
    with_env = {k: v for k, v in env.environment().items() if k in ("torch", "triton", "diffusers", "device_name",
                                                                    "triton_mode", "python")}
    return {**info, **with_env}


__all__ = ["Target", "TARGETS", "define", "get", "resolve", "resolve_device", "resolve_dtype", "preflight",
           "use_model"]
