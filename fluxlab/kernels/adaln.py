"""FLUX's adaptive LayerNorm: LayerNorm without affine (eps 1e-6), then `x̂·(1+scale)+shift`,
optionally after the gated residual `h = residual + gate·x` that precedes it inside a double block.

Layers: `_fl_adaln_fwd_kernel` / `_fl_adaln_bwd_kernel` (Triton) -> `launch_fwd` / `launch_bwd` -> `ModulateFunction`
-> `modulate` / `gated_residual_modulate` -> the module classes that `fluxlab.kernels.patch` swaps
in (`FusedAdaLayerNormZero`, `FusedAdaLayerNormZeroSingle`, `FusedAdaLayerNormContinuous`,
`FusedFluxTransformerBlock`); `reference` / `reference_gated` beside them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common as C
from ._common import tl, triton

FAMILY = "adaln"
MAX_C = 65536  # channels one program holds; wider rows fall back


# --- Triton -----------------------------------------------------------------------------------
# Why this layout: rows of C channels are read and written whole (coalesced 128-bit vectors). The
# first version mapped a 1-D grid over B*S rows, so every program recomputed its batch with an
# int64 `row // S` and re-read scale/shift/gate per row; the grid is now (row block, batch), the
# [1, C] modulation vectors are loaded once per program, and offsets are int32 unless the tensor
# needs int64 (BIG). The backward's weight gradients are a two-stage reduction: each program
# accumulates dscale/dshift/dgate over its chunk of rows in registers and writes one row of a
# [3, B, chunks, C] fp32 buffer (no atomics); one small torch sum finishes. Without a gradient for
# h (dh_out None) the kernel skips that load instead of reading a zeros tensor.
if C.HAVE_TRITON:
    @triton.jit
    def _fl_adaln_fwd_kernel(x_ptr, res_ptr, gate_ptr, scale_ptr, shift_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
                    S, C, eps, HAS_RES: tl.constexpr, ACC: tl.constexpr, BIG: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program (i, b): rows i*BLOCK_R.. of batch b of x [B, S, C]; scale/shift/gate are [B, C].
        #   h = residual + gate * x            (HAS_RES; else h = x)
        #   x̂ = (h - mean_c h) / sqrt(var_c h + eps)
        #   y = x̂ * (1 + scale) + shift
        b = tl.program_id(1)
        if BIG:
            b = b.to(tl.int64)
        s = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        c = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
        cmask = c < C
        row = b * S + s  # [BLOCK_R]
        mask = (s < S)[:, None] & cmask
        off = row[:, None] * C + c
        h = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_RES:
            gate = tl.load(gate_ptr + b * C + c, mask=cmask, other=0.0).to(ACC)
            h = tl.load(res_ptr + off, mask=mask, other=0.0).to(ACC) + gate * h
            tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(h, axis=1) / C  # [BLOCK_R]
        d = tl.where(mask, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        scale = tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0).to(ACC)
        shift = tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0).to(ACC)
        y = d * rstd[:, None] * (1.0 + scale) + shift
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean, mask=s < S)
        tl.store(rstd_ptr + row, rstd, mask=s < S)

    @triton.jit
    def _fl_adaln_bwd_kernel(x_ptr, res_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr, dy_ptr, dh_out_ptr,
                    dx_ptr, dres_ptr, part_ptr,
                    S, C, rows_per_chunk, HAS_RES: tl.constexpr, HAS_DH: tl.constexpr, ACC: tl.constexpr,
                    BIG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program (b, chunk) walks rows [chunk*rows_per_chunk, +rows_per_chunk) of batch b:
        #   dx̂ = dy * (1 + scale)
        #   dh = rstd * (dx̂ - mean_c dx̂ - x̂ * mean_c(dx̂ * x̂))  (+ dh_out, the gradient of h itself)
        #   d_residual = dh;  dx = dh * gate;  dgate += Σ_s dh * x         (HAS_RES; else dx = dh)
        #   dscale += Σ_s dy * x̂;  dshift += Σ_s dy
        # Stage 1 of the weight-gradient reduction: the partial sums go to row (b, chunk) of
        # part [3, B, n_chunks, C] (dscale, dshift, dgate); the host sums the chunks (stage 2).
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        if BIG:
            b = b.to(tl.int64)
        c = tl.arange(0, BLOCK_C)[None, :]
        cmask = c < C
        scale = tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0).to(ACC)
        if HAS_RES:
            gate = tl.load(gate_ptr + b * C + c, mask=cmask, other=0.0).to(ACC)
        acc_scale = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        acc_shift = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        acc_gate = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        s_start = chunk * rows_per_chunk
        s_end = tl.minimum(s_start + rows_per_chunk, S)
        for s0 in range(s_start, s_end, BLOCK_R):
            s = s0 + tl.arange(0, BLOCK_R)[:, None]  # [BLOCK_R, 1]
            rmask = s < s_end
            mask = rmask & cmask
            row = b * S + s
            off = row * C + c
            mean = tl.load(mean_ptr + row, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            if HAS_RES:
                h = tl.load(res_ptr + off, mask=mask, other=0.0).to(ACC) + gate * x
            else:
                h = x
            xhat = tl.where(mask, (h - mean) * rstd, 0.0)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
            dxhat = dy * (1.0 + scale)
            m1 = tl.sum(dxhat, axis=1)[:, None] / C
            m2 = tl.sum(dxhat * xhat, axis=1)[:, None] / C
            dh = rstd * (dxhat - m1 - xhat * m2)
            acc_scale += dy * xhat
            acc_shift += dy
            if HAS_RES:
                if HAS_DH:
                    dh += tl.load(dh_out_ptr + off, mask=mask, other=0.0).to(ACC)
                tl.store(dres_ptr + off, dh.to(dres_ptr.dtype.element_ty), mask=mask)
                tl.store(dx_ptr + off, (dh * gate).to(dx_ptr.dtype.element_ty), mask=mask)
                acc_gate += dh * x
            else:
                tl.store(dx_ptr + off, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        part_stride = tl.num_programs(0) * tl.num_programs(1) * C  # one [B, n_chunks, C] block
        poff = (b * tl.num_programs(1) + chunk) * C + tl.arange(0, BLOCK_C)
        pmask = tl.arange(0, BLOCK_C) < C
        tl.store(part_ptr + poff, tl.sum(acc_scale, axis=0), mask=pmask)
        tl.store(part_ptr + part_stride + poff, tl.sum(acc_shift, axis=0), mask=pmask)
        if HAS_RES:
            tl.store(part_ptr + 2 * part_stride + poff, tl.sum(acc_gate, axis=0), mask=pmask)


# --- host launchers -------------------------------------------------------------------------------
def _row_block(n_rows: int, BLOCK_C: int) -> tuple[int, int]:
    """(rows per program, warps) for [rows, BLOCK_C] tiles: ~8 Ki elements and 8 warps on a GPU (32 per
    thread, four 16-byte bf16 vectors); the interpreter takes up to 64 Ki elements per program."""
    budget = (1 << 16) if C.interpreting() else 8192
    rows = max(1, min(C.next_pow2(n_rows), budget // BLOCK_C))
    return rows, max(4, min(16, rows * BLOCK_C // 1024))


def launch_fwd(x, scale, shift, eps, residual=None, gate=None):
    """x (and residual): [B, S, C] contiguous; scale/shift/gate: [B, C] contiguous.
    Returns y, h (None without residual), mean, rstd ([B*S] in the accumulation dtype)."""
    B, S, Cn = x.shape
    BLOCK_C = C.next_pow2(Cn)
    BLOCK_R, warps = _row_block(S, BLOCK_C)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = C.new_empty_like(x)
    h = C.new_empty_like(x) if residual is not None else None
    mean, rstd = C.new_empty((B * S,), acc, x.device), C.new_empty((B * S,), acc, x.device)
    C.count(f"{FAMILY}.fwd")
    _fl_adaln_fwd_kernel[(triton.cdiv(S, BLOCK_R), B)](
        x, residual, gate, scale, shift, y, h, mean, rstd, S, Cn, eps, HAS_RES=residual is not None,
        ACC=C.acc_dtype(x.dtype), BIG=x.numel() >= 2**31, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps)
    return y, h, mean, rstd


_SM_COUNT: dict = {}


def _bwd_chunks(B: int, S: int, BLOCK_R: int, device: torch.device) -> int:
    """Chunks per batch row-range: enough programs to fill the GPU (4 per SM), each looping over its
    rows so the partial sums stay small. The interpreter takes one chunk per row block (the same work
    as one looping program), so a CPU shape of several row blocks runs the chunked reduction too."""
    if C.interpreting() or device.type != "cuda":
        return triton.cdiv(S, BLOCK_R)
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    target = 4 * _SM_COUNT[device]
    return max(1, min(triton.cdiv(S, BLOCK_R), triton.cdiv(target, B)))


def launch_bwd(x, scale, mean, rstd, dy, residual=None, gate=None, dh_out=None):
    """Gradients: dx, d_residual (or None), and dscale, dshift, dgate ([B, C] in the accumulation dtype).
    dh_out (the gradient of h, gated form only) may be None: no gradient flowed into h."""
    B, S, Cn = x.shape
    BLOCK_C = C.next_pow2(Cn)
    BLOCK_R = max(1, C.rows_per_program(S, BLOCK_C))
    chunks = _bwd_chunks(B, S, BLOCK_R, x.device)
    rows_per_chunk = triton.cdiv(S, chunks)
    has_res = residual is not None
    acc = mean.dtype
    dx = C.new_empty_like(x)
    dres = C.new_empty_like(residual) if has_res else None
    n_par = 3 if has_res else 2
    parts = C.new_empty((n_par, B, chunks, Cn), acc, x.device)
    C.count(f"{FAMILY}.bwd")
    _fl_adaln_bwd_kernel[(B, chunks)](
        x, residual, gate, scale, mean, rstd, dy, dh_out, dx, dres, parts,
        S, Cn, rows_per_chunk, HAS_RES=has_res, HAS_DH=dh_out is not None, ACC=C.acc_dtype(x.dtype),
        BIG=x.numel() >= 2**31, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=C.num_warps(BLOCK_R * BLOCK_C))
    sums = parts.sum(2)  # stage 2, one launch: [n_par, B, C]
    return dx, dres, *sums.unbind(0), *([None] if not has_res else [])


# --- autograd -------------------------------------------------------------------------------------
class ModulateFunction(torch.autograd.Function):
    """(x, scale, shift, eps[, residual, gate]) -> y, or (h, y) with a residual."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps, residual=None, gate=None):
        x, scale, shift = x.contiguous(), scale.contiguous(), shift.contiguous()
        if residual is not None:
            residual, gate = residual.contiguous(), gate.contiguous()
        y, h, mean, rstd = launch_fwd(x, scale, shift, eps, residual, gate)
        ctx.save_for_backward(x, scale, mean, rstd, residual, gate)
        ctx.dtypes = (scale.dtype, shift.dtype, gate.dtype if gate is not None else None)
        return y if residual is None else (h, y)

    @staticmethod
    def backward(ctx, *grads):
        x, scale, mean, rstd, residual, gate = ctx.saved_tensors
        if residual is None:
            dy, dh_out = grads[0], None
        else:
            dh_out, dy = grads
            dh_out = None if dh_out is None else dh_out.contiguous()  # None: the kernel skips it
        dx, dres, dscale, dshift, dgate = launch_bwd(x, scale, mean, rstd, dy.contiguous(), residual, gate, dh_out)
        ds, dsh, dg = ctx.dtypes
        return (dx, dscale.to(ds), dshift.to(dsh), None, dres, dgate.to(dg) if dgate is not None else None)


# --- public ---------------------------------------------------------------------------------------
def _check(x, tensors: dict) -> bool:
    """Shape errors raise; shapes Triton cannot hold record a fallback and return False."""
    if x.ndim != 3:
        raise ValueError(f"x must be [B, S, C], got shape {tuple(x.shape)}")
    B, _, Cn = x.shape
    for name, t in tensors.items():
        want = tuple(x.shape) if name == "residual" else (B, Cn)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be {list(want)}, got {tuple(t.shape)}")
    if C.next_pow2(Cn) > MAX_C:
        C.record_fallback(FAMILY, f"C={Cn} channels exceed one program's block ({MAX_C})")
        return False
    return True


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) (no affine) * (1 + scale) + shift. x: [B, S, C]; scale, shift: [B, C] -> [B, S, C]."""
    fits = _check(x, dict(scale=scale, shift=shift))
    if fits and C.triton_can_serve(FAMILY, x, scale, shift):
        return ModulateFunction.apply(x, scale, shift, eps)
    return reference(x, scale, shift, eps)


def gated_residual_modulate(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                            shift: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + gate * x, then (h, LayerNorm(h) * (1 + scale) + shift).
    residual, x: [B, S, C]; gate, scale, shift: [B, C]. Returns h, y: [B, S, C]."""
    fits = _check(x, dict(residual=residual, gate=gate, scale=scale, shift=shift))
    if fits and C.triton_can_serve(FAMILY, x, residual, gate, scale, shift):
        return ModulateFunction.apply(x, scale, shift, eps, residual, gate)
    return reference_gated(residual, x, gate, scale, shift, eps)


def reference(x, scale, shift, eps: float = 1e-6):
    """diffusers' AdaLayerNormZero line: `self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]`."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def reference_gated(residual, x, gate, scale, shift, eps: float = 1e-6):
    """diffusers' FluxTransformerBlock: `hidden_states + gate_msa.unsqueeze(1) * attn_output`, then norm2
    and the mlp modulation."""
    h = residual + gate.unsqueeze(1) * x
    return h, reference(h, scale, shift, eps)


def gradcheck_cases() -> list[tuple[str, object, tuple]]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    B, S, Cn = 2, 3, 5
    return [("adaln.modulate", ModulateFunction.apply, (rnd(B, S, Cn), rnd(B, Cn), rnd(B, Cn), 1e-6)),
            ("adaln.gated_residual", ModulateFunction.apply,
             (rnd(B, S, Cn), rnd(B, Cn), rnd(B, Cn), 1e-6, rnd(B, S, Cn), rnd(B, Cn)))]


# --- modules that patch() swaps in (by __class__, so parameters, names and hooks stay put) ----------
from diffusers.models.normalization import (  # noqa: E402  (diffusers is heavy; kernels need it anyway)
    AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle)
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock  # noqa: E402


def plain_layer_norm(norm: torch.nn.Module) -> str | None:
    """None when `norm` is the LayerNorm without affine these kernels implement, else why not."""
    if type(norm) is not torch.nn.LayerNorm:
        return f"norm is {type(norm).__name__}, not nn.LayerNorm"
    if norm.weight is not None or norm.bias is not None:
        return "LayerNorm has an affine part"
    return None


class FusedAdaLayerNormZero(AdaLayerNormZero):
    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        # diffusers' AdaLayerNormZero.forward with LN + modulation fused
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = modulate(x, scale_msa, shift_msa, self.norm.eps)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class FusedAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
    def forward(self, x, emb=None):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
        return modulate(x, scale_msa, shift_msa, self.norm.eps), gate_msa


class FusedAdaLayerNormContinuous(AdaLayerNormContinuous):
    def forward(self, x, conditioning_embedding):
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)  # this one orders scale before shift
        return modulate(x, scale, shift, self.norm.eps)


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """FluxTransformerBlock whose `h + gate_msa*attn` -> norm2 -> modulation runs as one kernel per
    stream. Forward copied from diffusers 0.42.1 `transformer_flux.py::FluxTransformerBlock.forward`;
    only the two marked lines differ."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb)
        joint_attention_kwargs = joint_attention_kwargs or {}
        attention_outputs = self.attn(hidden_states=norm_hidden_states,
                                      encoder_hidden_states=norm_encoder_hidden_states,
                                      image_rotary_emb=image_rotary_emb, **joint_attention_kwargs)
        if len(attention_outputs) == 2:
            attn_output, context_attn_output = attention_outputs
        elif len(attention_outputs) == 3:
            attn_output, context_attn_output, ip_attn_output = attention_outputs

        # fluxlab: fused gated residual + norm2 + modulation (image stream)
        hidden_states, norm_hidden_states = gated_residual_modulate(
            hidden_states, attn_output, gate_msa, scale_mlp, shift_mlp, self.norm2.eps)
        ff_output = self.ff(norm_hidden_states)
        ff_output = gate_mlp.unsqueeze(1) * ff_output
        hidden_states = hidden_states + ff_output
        if len(attention_outputs) == 3:
            hidden_states = hidden_states + ip_attn_output

        # fluxlab: fused gated residual + norm2_context + modulation (text stream)
        encoder_hidden_states, norm_encoder_hidden_states = gated_residual_modulate(
            encoder_hidden_states, context_attn_output, c_gate_msa, c_scale_mlp, c_shift_mlp, self.norm2_context.eps)
        context_ff_output = self.ff_context(norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


# stock class -> (fused class, which LayerNorm attributes the fused forward replaces)
FUSED_CLASSES = {
    AdaLayerNormZero: (FusedAdaLayerNormZero, ("norm",)),
    AdaLayerNormZeroSingle: (FusedAdaLayerNormZeroSingle, ("norm",)),
    AdaLayerNormContinuous: (FusedAdaLayerNormContinuous, ("norm",)),
    FluxTransformerBlock: (FusedFluxTransformerBlock, ("norm2", "norm2_context")),
}
