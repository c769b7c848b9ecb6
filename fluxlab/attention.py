"""Attention for FLUX: the fastest SDPA backend that works, and proof of which kernel ran.

Why cuDNN's backward fails inside FLUX training (torch 2.11+cu130, cuDNN 9.19, H100 and H200)
------------------------------------------------------------------------------------------------
Two grad_out layouts meet in one backward pass, and PyTorch's cuDNN SDPA backward reuses one
cached execution graph for both.

* FLUX's single-stream block computes ``proj_out(torch.cat([attn_output, mlp_hidden], dim=2))``,
  so the grad_out its attention receives is a *slice* of the concatenation's gradient: viewed as
  ``[B, H, S, D]`` it has strides ``(S*15360, 128, 15360, 1)`` (row stride H*D + mlp_dim).
* The double-stream block splits the attention output with ``split_with_sizes`` and ``.contiguous()``,
  so its grad_out is dense: strides ``(S*3072, 128, 3072, 1)``.

The cache key of the cuDNN backward graph does not distinguish these two grad_out strides. Backward
runs the 38 single blocks first (sliced grads), then the first double block hands a dense grad to
a graph built for the sliced one: ``mha_graph.execute(...).is_good()`` is false (an illegal memory
access without CUDA_LAUNCH_BLOCKING). ``python -m benchmarks.cudnn_probe`` shows it in isolation at the
FLUX shape: each layout alone is correct (grad error vs flash 3.2e-3, bf16 noise); sliced-then-dense
fails exactly like training; **dense-then-sliced does not fail but returns wrong gradients**
(relative error 1.41 against flash), which is worse than a crash. Isolated tests never mixed grad
layouts in one process, and forcing q/k/v contiguous cannot help: the culprit is grad_out. Output
and committed evidence: ``benchmarks/results/cudnn_probe_h200.json``.

The fix here: on the cuDNN path the attention output passes through ``_DenseGrad``, an identity
whose backward makes the incoming gradient contiguous, so every backward call sees one layout
(a 28 MB copy per single block at 1024², far cheaper than falling back to flash: cuDNN runs the
FLUX step's attention in 93 ms against flash's 175). Every choice is counted, every fallback
records why, and :func:`kernel_names` / :func:`classify_kernels` prove which kernel ran.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

BACKENDS = ("cudnn", "flash", "efficient", "math")
_counts: Counter = Counter()
_fallbacks: dict[str, str] = {}


def counters() -> dict[str, int]:
    """How many attention calls each backend served (``attention.<backend>``)."""
    return {f"attention.{k}": v for k, v in _counts.items()}


def fallbacks() -> dict[str, str]:
    """Why a requested backend was not used, keyed by the requested backend."""
    return dict(_fallbacks)


def reset_counters() -> None:
    _counts.clear()
    _fallbacks.clear()


def resolve(backend: str, query: torch.Tensor) -> str:
    """Pick the backend for these inputs. ``auto`` prefers cuDNN (fastest on Hopper), then flash.

    A requested backend the inputs cannot use falls back to the next, and the reason is kept.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"attention_backend {backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    order = list(BACKENDS) if backend == "auto" else [backend, *[b for b in BACKENDS if b != backend]]
    for name in order:
        reason = _unsupported(name, query)
        if reason is None:
            return name
        if name == backend:
            _fallbacks[backend] = reason
    return "math"


def _unsupported(name: str, q: torch.Tensor) -> str | None:
    if name == "math":
        return None
    if q.device.type != "cuda":
        return f"{name} needs a CUDA device, got {q.device.type}"
    if name in ("cudnn", "flash") and q.dtype not in (torch.float16, torch.bfloat16):
        return f"{name} needs fp16/bf16, got {q.dtype}"
    if name == "cudnn":
        if torch.cuda.get_device_capability(q.device) < (9, 0):
            return "cuDNN attention is only fast on sm90+ here"
        if q.shape[-1] > 128:
            return f"cuDNN attention head_dim {q.shape[-1]} > 128"
    return None


class _DenseGrad(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _attend(name: str, q, k, v, grad: bool) -> torch.Tensor:
    """One backend's aten op, called directly: it runs that kernel or raises, never silently another."""
    aten = torch.ops.aten
    if name == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, grad)[0]
    if name == "flash":
        return aten._scaled_dot_product_flash_attention(q, k, v)[0]
    if name == "efficient":
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, grad)[0]
    return F.scaled_dot_product_attention(q, k, v)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention on diffusers' layout. q, k, v: [B, S, H, D] -> [B, S, H, D]."""
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        # F.scaled_dot_product_attention is autocast to low precision; the aten ops called below
        # are not, so cast here (fp32 q/k/v, e.g. from bitsandbytes layers, would miss cuDNN).
        dt = torch.get_autocast_dtype(dev)
        query, key, value = (x.to(dt) for x in (query, key, value))
    chosen = resolve(backend, query)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))      # [B, H, S, D]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out = _attend(chosen, q, k, v, grad).transpose(1, 2)             # [B, S, H, D]
    if chosen == "cudnn" and grad:
        out = _DenseGrad.apply(out)
    if not torch.compiler.is_compiling():  # compiled runs are proven by profiler kernel names instead
        _counts[chosen] += 1
    return out


def projections(attn, hidden_states, encoder_hidden_states=None):
    """q, k, v [B, S, H*D] and the text stream's (or None), as diffusers' `_get_qkv_projections`
    computes them; through the fused groups when `fluxlab.fusion.fuse_projections` added them."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    fused = getattr(attn, "fl_qkv", None)
    if fused is None:
        return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = fused(hidden_states)
    eq = ek = ev = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        added = getattr(attn, "fl_added", None)
        eq, ek, ev = (added(encoder_hidden_states) if added is not None else
                      (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states)))
    return q, k, v, eq, ek, ev


class FluxlabAttnProcessor:
    """FLUX attention through :func:`sdpa`.

    Adapted from diffusers 0.42.1 ``FluxAttnProcessor``: same projections, RMS norms and RoPE
    (diffusers' own helpers); only the attention call differs. :meth:`qk` is the one step a
    subclass replaces (fluxlab.kernels' fused qk_norm_rope processor does).
    """

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def qk(self, attn, q, k, v, ctx, rotary):
        """Norms, text+image concatenation and RoPE.

        q, k, v: [B, S_img, H, D]; ctx: (q, k, v) of the text stream [B, S_txt, H, D] or None;
        returns the joint q, k, v: [B, S, H, D].
        """
        from diffusers.models.embeddings import apply_rotary_emb

        q, k = attn.norm_q(q), attn.norm_k(k)
        if ctx is not None:
            eq, ek, ev = ctx
            q, k, v = (torch.cat(p, dim=1) for p in ((attn.norm_added_q(eq), q), (attn.norm_added_k(ek), k), (ev, v)))
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q, k, v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("FluxlabAttnProcessor does not take an attention mask")
        q, k, v, eq, ek, ev = projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))       # [B, S_img, H, D]
        ctx = None
        if attn.added_kv_proj_dim is not None:
            ctx = tuple(t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))  # [B, S_txt, H, D]
        q, k, v = self.qk(attn, q, k, v, ctx, image_rotary_emb)                    # [B, S, H, D]
        out = sdpa(q, k, v, self.backend).flatten(2, 3).to(q.dtype)                # [B, S, H*D]
        if encoder_hidden_states is None:
            return out
        s_txt = encoder_hidden_states.shape[1]
        ctx_out, out = out.split_with_sizes([s_txt, out.shape[1] - s_txt], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(ctx_out.contiguous())


def install(transformer, backend: str = "auto") -> int:
    """Route every FLUX attention module of `transformer` through :func:`sdpa`. Returns the count."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    resolve(backend, torch.empty(0))  # validates the name up front
    mods = [m for m in transformer.modules() if isinstance(m, FluxAttention)]
    for m in mods:
        m.set_processor(FluxlabAttnProcessor(backend))
    return len(mods)


def classify_kernels(names) -> set[str]:
    """Which attention backends a list of profiler kernel names shows (anchored patterns, so an
    inductor kernel named after the cuDNN op does not count as cuDNN)."""
    from fluxlab.measure.evidence import attention_backends

    return attention_backends(names)


def kernel_names(fn, *args, **kwargs) -> list[str]:
    """Run ``fn`` under torch.profiler and return the CUDA kernel names it launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(*args, **kwargs)
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
