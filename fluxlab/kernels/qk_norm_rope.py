"""RMSNorm of q and of k (each with its weight), then RoPE, in one pass, written in the
[B, H, S, D] layout `F.scaled_dot_product_attention` consumes.

What it replaces in `FluxAttnProcessor`: `attn.norm_q(q)`, `attn.norm_k(k)` (torch.nn.RMSNorm over
the head dim), for the double blocks also `norm_added_q/k` on the text stream and the
`torch.cat([text, image], dim=1)`, then `apply_rotary_emb` over the joint sequence and the
transpose to [B, H, S, D]. The text stream ("context") is written at sequence offset 0, the image
stream after it, straight into one joint buffer, so the concatenation costs nothing.

Layers: `_fl_qk_norm_rope_fwd_kernel` / `_fl_qk_norm_rope_bwd_kernel` (Triton) -> `launch_fwd` / `launch_bwd` (one launch per stream)
-> `QKNormRopeFunction` -> `qk_norm_rope`; `reference` beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common as C
from . import rope
from ._common import tl, triton

FAMILY = "qk_norm_rope"


# --- Triton -----------------------------------------------------------------------------------
# Why this layout: the first version had rope.py's structure (one row = one head, even/odd channels
# through stride-2 scalar 16-bit loads and stores, cos/sin re-read per head, int64 div/mod per row)
# and ran at 0.23 TB/s. Now a program owns a [BLOCK_T tokens, BLOCK_H heads, D] tile of one batch
# (grid: token blocks, head blocks, B): q and k rows are read whole and contiguously, the RMS is a
# reduction along the row in registers, the RoPE pair swap is a reshape + split/join in registers,
# cos/sin are loaded once per token and shared by the heads and by q and k, and each head's
# BLOCK_T rows land contiguously in the [B, H, S_joint, D] output (BLOCK_T * D * 2 bytes per run).
if C.HAVE_TRITON:
    from .rope import load_cos_sin, rope_apply

    @triton.jit
    def _tile(S, H, S_joint, seq_off, D: tl.constexpr, BIG: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (i, j, b): tokens i*BLOCK_T.. and heads j*BLOCK_H.. of batch b of a contiguous
        # stream [B, S, H, D]; token s goes to out[b, h, seq_off + s, :] of the contiguous
        # [B, H, S_joint, D] output.
        s = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]  # [BT, 1, 1]
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]  # [1, BH, 1]
        d = tl.arange(0, BLOCK_D)[None, None, :]  # [1, 1, BD]
        b = tl.program_id(2)
        if BIG:
            b = b.to(tl.int64)
        pos = seq_off + s  # position in the joint sequence
        tmask = (s < S) & (d < D)  # [BT, 1, BD]
        mask = tmask & (h < H)
        x_off = ((b * S + s) * H + h) * D + d
        o_off = ((b * H + h) * S_joint + pos) * D + d
        return d, pos, tmask, mask, x_off, o_off

    @triton.jit
    def _rstd(x, D: tl.constexpr, eps):
        # RMSNorm: r = 1 / sqrt(mean_d(x_d^2) + eps), per row  -> [BT, BH, 1]
        return (1.0 / tl.sqrt(tl.sum(x * x, axis=2) / D + eps))[:, :, None]

    @triton.jit
    def _fwd_one(x_ptr, w_ptr, o_ptr, x_off, o_off, mask, d, c, sn, eps, D: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(ACC)  # [1, 1, BD]
        y = rope_apply(x * _rstd(x, D, eps) * w, c, sn, BLOCK_T, BLOCK_H, BLOCK_D, False)
        tl.store(o_ptr + o_off, y.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fl_qk_norm_rope_fwd_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
                    S, H, S_joint, seq_off, eps, D: tl.constexpr, ACC: tl.constexpr, BIG: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # Per row (one head of one token) of a stream, for x in (q, k):
        #   n = x * r * w,  r = 1/sqrt(mean_d x^2 + eps)      (torch.nn.RMSNorm, in fp32)
        #   y = rope(n) at joint position seq_off + s          (rope.rope_apply)
        # y lands in the joint [B, H, S_joint, D] buffer, the layout SDPA takes.
        d, pos, tmask, mask, x_off, o_off = _tile(S, H, S_joint, seq_off, D, BIG, BLOCK_T, BLOCK_H, BLOCK_D)
        c, sn = load_cos_sin(cos_ptr, sin_ptr, pos, d, tmask, D, ACC)
        _fwd_one(q_ptr, wq_ptr, qo_ptr, x_off, o_off, mask, d, c, sn, eps, D, ACC, BLOCK_T, BLOCK_H, BLOCK_D)
        _fwd_one(k_ptr, wk_ptr, ko_ptr, x_off, o_off, mask, d, c, sn, eps, D, ACC, BLOCK_T, BLOCK_H, BLOCK_D)

    @triton.jit
    def _bwd_one(x_ptr, w_ptr, g_ptr, dx_ptr, dw_ptr, x_off, o_off, mask, d, c, sn, eps, pid,
                 D: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr):
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(ACC)  # [1, 1, BD]
        g = tl.load(g_ptr + o_off, mask=mask, other=0.0).to(ACC)
        dn = rope_apply(g, c, sn, BLOCK_T, BLOCK_H, BLOCK_D, True)
        r = _rstd(x, D, eps)
        gw = dn * w
        dot = (tl.sum(gw * x, axis=2) / D)[:, :, None]  # [BT, BH, 1]
        dx = r * gw - x * (r * r * r) * dot
        tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dd = tl.arange(0, BLOCK_D)
        tl.store(dw_ptr + pid * D + dd, tl.sum(tl.sum(dn * x * r, axis=1), axis=0), mask=dd < D)  # [BD]

    @triton.jit
    def _fl_qk_norm_rope_bwd_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, gq_ptr, gk_ptr,
                    dq_ptr, dk_ptr, dwq_ptr, dwk_ptr,
                    S, H, S_joint, seq_off, eps, D: tl.constexpr, ACC: tl.constexpr, BIG: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # With g the output gradient:  dn = rope^T(g);  gw = dn * w
        #   dx = r * gw - x * r^3 * mean_d(gw * x)
        #   dw = sum over rows of dn * x * r   (two-stage: this program writes the sum over its tile
        #        to row `pid` of dw [n_programs, D]; the host sums those rows)
        d, pos, tmask, mask, x_off, o_off = _tile(S, H, S_joint, seq_off, D, BIG, BLOCK_T, BLOCK_H, BLOCK_D)
        c, sn = load_cos_sin(cos_ptr, sin_ptr, pos, d, tmask, D, ACC)
        pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
        _bwd_one(q_ptr, wq_ptr, gq_ptr, dq_ptr, dwq_ptr, x_off, o_off, mask, d, c, sn, eps, pid,
                 D, ACC, BLOCK_T, BLOCK_H, BLOCK_D)
        _bwd_one(k_ptr, wk_ptr, gk_ptr, dk_ptr, dwk_ptr, x_off, o_off, mask, d, c, sn, eps, pid,
                 D, ACC, BLOCK_T, BLOCK_H, BLOCK_D)


# --- host launchers -------------------------------------------------------------------------------
def _grid_args(x: torch.Tensor, out: torch.Tensor):
    """x: one stream [B, S, H, D]; out: the contiguous joint [B, H, S_joint, D] tensor it maps to."""
    B, S, H, D = x.shape
    assert out.is_contiguous() and out.shape[:2] == (B, H) and out.shape[3] == D, "joint buffer must be contiguous [B, H, S_joint, D]"
    cfg = rope.tile_config(S, H, D)
    grid = (triton.cdiv(S, cfg["BLOCK_T"]), triton.cdiv(H, cfg["BLOCK_H"]), B)
    return grid, dict(S=S, H=H, S_joint=out.shape[2], D=D, ACC=C.acc_dtype(x.dtype),
                      BIG=max(x.numel(), out.numel()) >= 2**31, **cfg)


def launch_fwd(q, k, wq, wk, cos, sin, q_out, k_out, seq_off: int, eps: float) -> None:
    """One stream q, k [B, S, H, D] (contiguous) -> rows seq_off.. of q_out, k_out [B, H, S_joint, D]."""
    grid, kw = _grid_args(q, q_out)
    C.count(f"{FAMILY}.fwd")
    _fl_qk_norm_rope_fwd_kernel[grid](q, k, wq, wk, cos, sin, q_out, k_out, seq_off=seq_off, eps=eps, **kw)


def launch_bwd(q, k, wq, wk, cos, sin, gq, gk, seq_off: int, eps: float):
    """Gradients of one stream: (dq, dk) [B, S, H, D] and (dwq, dwk) [D] in the accumulation dtype."""
    grid, kw = _grid_args(q, gq)
    dq, dk = C.new_empty_like(q), C.new_empty_like(k)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_prog = grid[0] * grid[1] * grid[2]
    dw = C.new_empty((2, n_prog, q.shape[-1]), acc, q.device)  # per-program partial sums (stage 1)
    C.count(f"{FAMILY}.bwd")
    _fl_qk_norm_rope_bwd_kernel[grid](q, k, wq, wk, cos, sin, gq, gk, dq, dk, dw[0], dw[1], seq_off=seq_off, eps=eps, **kw)
    dwq, dwk = dw.sum(1)  # stage 2: one small reduction for both weights
    return dq, dk, dwq, dwk


# --- autograd -------------------------------------------------------------------------------------
class QKNormRopeFunction(torch.autograd.Function):
    """Streams: (q, k, wq, wk) for the image stream and optionally (cq, ck, cwq, cwk) for the text
    stream placed before it. A None weight means RMSNorm without affine (weight of ones)."""

    @staticmethod
    def forward(ctx, q, k, wq, wk, cos, sin, eps, cq=None, ck=None, cwq=None, cwk=None):
        streams = [(cq, ck, cwq, cwk)] if cq is not None else []
        streams.append((q, k, wq, wk))
        streams = [tuple(_weight_or_ones(t, q) if i >= 2 else t.contiguous() for i, t in enumerate(st))
                   for st in streams]
        B, _, H, D = q.shape
        S_joint = sum(st[0].shape[1] for st in streams)
        cos, sin = cos.contiguous(), sin.contiguous()
        q_out = C.new_empty((B, H, S_joint, D), q.dtype, q.device)  # [B, H, S_joint, D]
        k_out = C.new_empty((B, H, S_joint, D), k.dtype, k.device)
        off = 0
        for sq, sk, swq, swk in streams:
            launch_fwd(sq, sk, swq, swk, cos, sin, q_out, k_out, off, eps)
            off += sq.shape[1]
        ctx.eps, ctx.n_streams = eps, len(streams)
        ctx.save_for_backward(cos, sin, *[t for st in streams for t in st])
        return q_out, k_out

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin, *flat = ctx.saved_tensors
        gq, gk = gq.contiguous(), gk.contiguous()
        grads, off = [], 0
        for i in range(ctx.n_streams):
            sq, sk, swq, swk = flat[4 * i: 4 * i + 4]
            dq, dk, dwq, dwk = launch_bwd(sq, sk, swq, swk, cos, sin, gq, gk, off, ctx.eps)
            grads.append((dq, dk, dwq.to(swq.dtype), dwk.to(swk.dtype)))
            off += sq.shape[1]
        img = grads[-1]
        ctx_grads = grads[0] if ctx.n_streams == 2 else (None,) * 4
        return (*img, None, None, None, *ctx_grads)


def _weight_or_ones(w: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if w is None:
        return torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)
    return w.contiguous()


# --- public ---------------------------------------------------------------------------------------
Context = tuple  # (q_ctx, k_ctx, q_ctx_weight, k_ctx_weight)


def _check(q, k, q_weight, k_weight, cos, sin, context) -> None:
    streams = [("", q, k, q_weight, k_weight)]
    if context is not None:
        if len(context) != 4:
            raise ValueError("context must be (q_ctx, k_ctx, q_ctx_weight, k_ctx_weight)")
        streams.append(("context ", *context))
    B, _, H, D = q.shape if q.ndim == 4 else (None,) * 4
    for tag, sq, sk, wq, wk in streams:
        for name, t in ((f"{tag}q", sq), (f"{tag}k", sk)):
            if t.ndim != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (B, H, D):
                raise ValueError(f"{name} must be [B, S, H, D] = [{B}, S, {H}, {D}], got {tuple(t.shape)}")
        if sq.shape != sk.shape:
            raise ValueError(f"{tag}q {tuple(sq.shape)} and {tag}k {tuple(sk.shape)} differ")
        for name, w in ((f"{tag}q_weight", wq), (f"{tag}k_weight", wk)):
            if w is not None and tuple(w.shape) != (D,):
                raise ValueError(f"{name} must be [D] = [{D}], got {tuple(w.shape)}")
    S_joint = q.shape[1] + (context[0].shape[1] if context is not None else 0)
    rope.check_shapes(q, cos, sin, seq_len=S_joint)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6,
                 context: Context | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(q; q_weight), RMSNorm(k; k_weight), RoPE, transpose: the attention-ready q and k.

    q, k: [B, S, H, D] (image stream); q_weight, k_weight: [D] or None (no affine);
    cos, sin: [S_ctx + S, D] from FluxPosEmbed over the joint sequence;
    context: optional (q_ctx, k_ctx, q_ctx_weight, k_ctx_weight), [B, S_ctx, H, D], the text stream
        that FLUX puts first in the joint sequence (its own norm weights: norm_added_q/k).
    Returns (q_out, k_out), each [B, H, S_ctx + S, D] in q.dtype.
    """
    out = _fast(q, k, q_weight, k_weight, cos, sin, eps, context)
    return out if out is not None else reference(q, k, q_weight, k_weight, cos, sin, eps, context)


def _fast(q, k, q_weight, k_weight, cos, sin, eps, context):
    """The Triton path, or None (with the reason recorded) when it cannot serve these tensors."""
    _check(q, k, q_weight, k_weight, cos, sin, context)
    tensors = [q, k, q_weight, k_weight, cos, sin, *(context or ())]
    if C.triton_can_serve(FAMILY, *tensors) and rope.fits_block(FAMILY, q.shape[3]):
        return QKNormRopeFunction.apply(q, k, q_weight, k_weight, cos, sin, eps, *(context or ()))
    return None


def reference(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6, context: Context | None = None):
    """Plain PyTorch in the order FluxAttnProcessor runs it: RMSNorm per stream (F.rms_norm is what
    torch.nn.RMSNorm calls), concatenate [text, image], rope.reference, transpose to [B, H, S, D]."""
    D = q.shape[-1]
    qn, kn = F.rms_norm(q, (D,), q_weight, eps), F.rms_norm(k, (D,), k_weight, eps)  # [B, S, H, D]
    if context is not None:
        cq, ck, cwq, cwk = context
        qn = torch.cat([F.rms_norm(cq, (D,), cwq, eps), qn], dim=1)
        kn = torch.cat([F.rms_norm(ck, (D,), cwk, eps), kn], dim=1)
    return rope.reference(qn, cos, sin).transpose(1, 2), rope.reference(kn, cos, sin).transpose(1, 2)


def gradcheck_cases() -> list[tuple[str, object, tuple]]:
    """float64 cases: one stream, and the joint text+image form with all four norm weights."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    def tables(S, D):
        ang = torch.randn(S, D // 2, dtype=torch.float64, generator=g).repeat_interleave(2, dim=1)
        return ang.cos(), ang.sin()

    B, S, Sc, H, D = 1, 3, 2, 2, 6
    single = (rnd(B, S, H, D), rnd(B, S, H, D), rnd(D), rnd(D), *tables(S, D), 1e-6)
    joint = (rnd(B, S, H, D), rnd(B, S, H, D), rnd(D), rnd(D), *tables(S + Sc, D), 1e-6,
             rnd(B, Sc, H, D), rnd(B, Sc, H, D), rnd(D), rnd(D))
    return [("qk_norm_rope", QKNormRopeFunction.apply, single),
            ("qk_norm_rope.joint", QKNormRopeFunction.apply, joint)]


# --- the diffusers attention processor that patch() installs -----------------------------------------
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor  # noqa: E402, F401

# attention and kernels are both model layer: the fused processor builds on attention's (SDPA
# backend + the cuDNN fix), and attention never imports the kernels (docs/ARCHITECTURE.md, "Layers").
from fluxlab.attention import FluxlabAttnProcessor  # noqa: E402


def unsupported(attn) -> str | None:
    """None when FusedFluxAttnProcessor can stand in for this FluxAttention's processor, else why not."""
    if type(attn.processor) not in (FluxAttnProcessor, FluxlabAttnProcessor):
        return f"processor is {type(attn.processor).__name__}, not FluxAttnProcessor or FluxlabAttnProcessor"
    names = ["norm_q", "norm_k"] + (["norm_added_q", "norm_added_k"] if attn.added_kv_proj_dim is not None else [])
    norms = [getattr(attn, n) for n in names]
    if any(type(n) is not torch.nn.RMSNorm for n in norms):
        return "q/k norms are not torch.nn.RMSNorm"
    if len({n.eps for n in norms}) != 1 or norms[0].eps is None:
        return f"q/k norms need one explicit eps, got {[n.eps for n in norms]}"
    return None


class FusedFluxAttnProcessor(FluxlabAttnProcessor):
    """fluxlab's FLUX attention with norm_q/norm_k (+ norm_added_q/k), the text+image concatenation,
    RoPE and the transpose done by one qk_norm_rope launch per stream. When that path cannot serve
    (disabled, device, dtype), it runs the stock norms and `rope.apply_rope`, which has its own fast
    path. Attention itself is fluxlab.attention.sdpa (backend choice and the cuDNN grad fix)."""

    def qk(self, attn, q, k, v, ctx, rotary):
        if rotary is None:  # nothing to fuse with
            return super().qk(attn, q, k, v, ctx, rotary)
        cos, sin = rotary
        context = (ctx[0], ctx[1], attn.norm_added_q.weight, attn.norm_added_k.weight) if ctx else None
        if ctx:
            v = torch.cat([ctx[2], v], dim=1)                                 # [B, S, H, D]
        qk = _fast(q, k, attn.norm_q.weight, attn.norm_k.weight, cos, sin, attn.norm_q.eps, context)
        if qk is not None:
            q, k = (t.transpose(1, 2) for t in qk)  # [B, S, H, D] views of [B, H, S, D] storage
            return q, k, v
        q, k = attn.norm_q(q), attn.norm_k(k)
        if ctx:
            q = torch.cat([attn.norm_added_q(ctx[0]), q], dim=1)
            k = torch.cat([attn.norm_added_k(ctx[1]), k], dim=1)
        return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v
