"""FLUX rotary position embedding (RoPE) on q or k.

Same math as diffusers' `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1,
sequence_dim=1)`, the call `FluxAttnProcessor` makes: channels pair up as (2i, 2i+1) and each pair
rotates by the angle whose cos/sin `FluxPosEmbed` tabulates (its 3 axes concatenated along D,
each value repeated for both members of a pair). Math in fp32, output in the input dtype.

Layers: `_fl_rope_kernel` (Triton; forward and backward are the same kernel, `BACKWARD` picks the
transposed rotation) -> `launch_rope` -> `RopeFunction` -> `apply_rope`; `reference` beside it.
"""

from __future__ import annotations

import torch

from . import _common as C
from ._common import tl, triton

FAMILY = "rope"
MAX_PAIRS = 8192  # pairs in one head that one program holds; wider heads fall back


# --- Triton -----------------------------------------------------------------------------------
# Why this layout (the first version ran at 0.26 TB/s on an H200, 239 us for 61 MB):
#   it saw x as B*S*H rows of P pairs and loaded the even and the odd member of each pair with two
#   stride-2 loads (and cos/sin with four). Strided addresses have contiguity 1, so Triton emitted
#   one 16-bit load/store per element (ld/st.global.b16, never a 128-bit vector), ~8 scalar memory
#   instructions per pair, partial-sector stores, and a per-row int64 `(row // H) % S` (32 calls
#   to the 64-bit division routine per thread); cos/sin (fp32) were re-read for every head.
# Now: a program owns a [BLOCK_T tokens, BLOCK_H heads, D] tile of one batch, grid
#   (token blocks, head blocks, B). Every row of D channels is loaded and stored whole and
#   contiguously (128-bit vectors; D is a constexpr so the row mask folds away), the pair swap
#   happens in registers (reshape to [.., D/2, 2] + split/join), cos/sin are loaded once per token
#   as a [BLOCK_T, 1, D] tile and broadcast over the heads, positions come straight from the grid
#   (no division), and offsets are int32 unless the tensor needs int64 (BIG).
if C.HAVE_TRITON:
    @triton.jit
    def rotate_pairs(v, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, TRANSPOSE: tl.constexpr):
        """v [BT, BH, BD] -> w with w[2i] = -v[2i+1], w[2i+1] = v[2i]; TRANSPOSE gives the transpose
        (w[2i] = v[2i+1], w[2i+1] = -v[2i]). Works in registers on whole contiguous rows."""
        v_e, v_o = tl.split(tl.reshape(v, (BT, BH, BD // 2, 2)))
        if TRANSPOSE:
            w = tl.join(v_o, -v_e)
        else:
            w = tl.join(-v_o, v_e)
        return tl.reshape(w, (BT, BH, BD))

    @triton.jit
    def rope_apply(x, c, s, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, BACKWARD: tl.constexpr):
        """RoPE on a [BT, BH, BD] tile with cos/sin tiles broadcastable to it ([BT, 1, BD]).
        forward:  out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i];  out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]
                  i.e. out = x * cos + rot(x) * sin
        backward (the rotation's transpose, it is linear in x):
                  dx[2i] = g[2i] cos[2i] + g[2i+1] sin[2i+1];  dx[2i+1] = g[2i+1] cos[2i+1] - g[2i] sin[2i]
                  i.e. dx = g * cos + rot^T(g * sin)"""
        if BACKWARD:
            return x * c + rotate_pairs(x * s, BT, BH, BD, True)
        else:
            return x * c + rotate_pairs(x, BT, BH, BD, False) * s

    @triton.jit
    def load_cos_sin(cos_ptr, sin_ptr, pos, d, mask, D: tl.constexpr, ACC: tl.constexpr):
        """cos/sin [S, D] rows `pos` ([BT, 1, 1]) at channels d ([1, 1, BD]) -> two [BT, 1, BD] tiles."""
        off = pos * D + d
        return (tl.load(cos_ptr + off, mask=mask, other=0.0).to(ACC),
                tl.load(sin_ptr + off, mask=mask, other=0.0).to(ACC))

    @triton.jit
    def _fl_rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, S, H,
                     D: tl.constexpr, BACKWARD: tl.constexpr, ACC: tl.constexpr, BIG: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # x, out: contiguous [B, S, H, D]; program (i, j, b) takes tokens i*BLOCK_T.. and heads
        # j*BLOCK_H.. of batch b: a [BLOCK_T, BLOCK_H, BLOCK_D] tile of whole rows.
        s = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]  # [BT, 1, 1]
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]  # [1, BH, 1]
        d = tl.arange(0, BLOCK_D)[None, None, :]  # [1, 1, BD]
        b = tl.program_id(2)
        if BIG:
            b = b.to(tl.int64)
        tmask = (s < S) & (d < D)  # [BT, 1, BD]
        c, sn = load_cos_sin(cos_ptr, sin_ptr, s, d, tmask, D, ACC)
        mask = tmask & (h < H)
        off = ((b * S + s) * H + h) * D + d
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        y = rope_apply(x, c, sn, BLOCK_T, BLOCK_H, BLOCK_D, BACKWARD)
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


# --- host launcher ------------------------------------------------------------------------------
def head_block(H: int, cap: int = 16) -> int:
    """Heads per program: the power of 2 <= cap that wastes the fewest masked heads (ties: the
    larger). FLUX's 24 heads -> 8, three blocks, no waste."""
    best, best_waste = 1, H
    p = 1
    while p <= min(cap, C.next_pow2(H)):
        waste = -(-H // p) * p - H
        if waste <= best_waste:
            best, best_waste = p, waste
        p *= 2
    return best


def tile_config(S: int, H: int, D: int) -> dict:
    """Block sizes and warps for a [tokens, heads, D] tile: ~4 Ki elements per program on a GPU, 32 per
    thread (four 16-byte bf16 vectors); the interpreter takes ~64 Ki (its cost is per program)."""
    BLOCK_D = max(2, C.next_pow2(D))
    BLOCK_H = head_block(H, cap=max(1, 4096 // BLOCK_D) if not C.interpreting() else 64)
    budget = (1 << 16) if C.interpreting() else 4096
    BLOCK_T = max(1, min(C.next_pow2(S), budget // (BLOCK_H * BLOCK_D)))
    warps = max(1, min(8, BLOCK_T * BLOCK_H * BLOCK_D // 1024))  # ~32 elements (4 x 16 B of bf16) per thread
    return dict(BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, num_warps=warps)


def launch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x: [B, S, H, D] contiguous (or the output gradient when `backward`); cos, sin: [S, D]."""
    B, S, H, D = x.shape
    out = C.new_empty_like(x)
    cfg = tile_config(S, H, D)
    grid = (triton.cdiv(S, cfg["BLOCK_T"]), triton.cdiv(H, cfg["BLOCK_H"]), B)
    C.count(f"{FAMILY}.{'bwd' if backward else 'fwd'}")
    _fl_rope_kernel[grid](x, cos, sin, out, S, H, D=D, BACKWARD=backward, ACC=C.acc_dtype(x.dtype),
                       BIG=x.numel() >= 2**31, **cfg)
    return out


# --- autograd -------------------------------------------------------------------------------------
class RopeFunction(torch.autograd.Function):
    """RoPE through Triton; cos/sin are tables, not learned, so they get no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return launch_rope(x.contiguous(), cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return launch_rope(grad_out.contiguous(), cos, sin, backward=True), None, None


# --- public ---------------------------------------------------------------------------------------
def check_shapes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_len: int | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be [B, S, H, D], got shape {tuple(x.shape)}")
    D = x.shape[-1]
    S = x.shape[1] if seq_len is None else seq_len
    if D % 2:
        raise ValueError(f"RoPE rotates channel pairs: head dim D={D} must be even")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (S, D):
            raise ValueError(f"{name} must be [S, D] = [{S}, {D}], got {tuple(t.shape)}")


def fits_block(family: str, D: int) -> bool:
    """A program holds whole heads; record a fallback for a head too wide for one block."""
    if C.next_pow2(D // 2) > MAX_PAIRS:
        C.record_fallback(family, f"head dim D={D} exceeds one program's block ({2 * MAX_PAIRS})")
        return False
    return True


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, S, H, D] with cos, sin [S, D] (FluxPosEmbed's tables) -> [B, S, H, D] in x.dtype."""
    check_shapes(x, cos, sin)
    if C.triton_can_serve(FAMILY, x, cos, sin) and fits_block(FAMILY, x.shape[3]):
        return RopeFunction.apply(x, cos, sin)
    return reference(x, cos, sin)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch. Copied from diffusers 0.42.1 `models/embeddings.py::apply_rotary_emb`
    (branch use_real=True, use_real_unbind_dim=-1, sequence_dim=1)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, S, 1, D]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, S, H, D/2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)  # [B, S, H, D]
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def gradcheck_cases() -> list[tuple[str, object, tuple]]:
    """Small float64 cases for torch.autograd.gradcheck, on the Triton path (CPU needs TRITON_INTERPRET=1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 6, dtype=torch.float64, generator=g).requires_grad_()
    ang = torch.randn(3, 3, dtype=torch.float64, generator=g).repeat_interleave(2, dim=1)  # [S, D]
    return [("rope", RopeFunction.apply, (x, ang.cos(), ang.sin()))]
