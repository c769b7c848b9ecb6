"""FLUX rotary position embedding (RoPE) on q or k.

Same math as diffusers' `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1,
sequence_dim=1)`, the call `FluxAttnProcessor` makes: channels pair up as (2i, 2i+1) and each pair
rotates by the angle whose cos/sin `FluxPosEmbed` tabulates (its 3 axes concatenated along D,
each value repeated for both members of a pair). Math in fp32, output in the input dtype.

Layers: `_rope_kernel` (Triton; forward and backward are the same kernel, `BACKWARD` picks the
transposed rotation) -> `launch_rope` -> `RopeFunction` -> `apply_rope`; `reference` beside it.
"""

from __future__ import annotations

import torch

from . import _common as C
from ._common import tl, triton

FAMILY = "rope"
MAX_PAIRS = 8192  # pairs in one head that one program holds; wider heads fall back


# --- Triton -----------------------------------------------------------------------------------
if C.HAVE_TRITON:
    @triton.jit
    def rope_rotate(x_e, x_o, c_e, c_o, s_e, s_o):
        # out[2i]   = x[2i]   * cos[2i]   - x[2i+1] * sin[2i]
        # out[2i+1] = x[2i+1] * cos[2i+1] + x[2i]   * sin[2i+1]
        return x_e * c_e - x_o * s_e, x_o * c_o + x_e * s_o

    @triton.jit
    def rope_rotate_bwd(g_e, g_o, c_e, c_o, s_e, s_o):
        # The rotation's transpose (it is linear in x):
        # dx[2i]   = g[2i]   * cos[2i]   + g[2i+1] * sin[2i+1]
        # dx[2i+1] = g[2i+1] * cos[2i+1] - g[2i]   * sin[2i]
        return g_e * c_e + g_o * s_o, g_o * c_o - g_e * s_e

    @triton.jit
    def load_cos_sin(cos_ptr, sin_ptr, pos, p, mask, P, ACC: tl.constexpr):
        """cos/sin [S, 2P] at rows `pos` [BLOCK_R, 1], split into the even/odd member of each pair p."""
        off = pos * 2 * P + 2 * p
        c_e = tl.load(cos_ptr + off, mask=mask, other=0.0).to(ACC)
        c_o = tl.load(cos_ptr + off + 1, mask=mask, other=0.0).to(ACC)
        s_e = tl.load(sin_ptr + off, mask=mask, other=0.0).to(ACC)
        s_o = tl.load(sin_ptr + off + 1, mask=mask, other=0.0).to(ACC)
        return c_e, c_o, s_e, s_o

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, R, S, H, P,
                     BACKWARD: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        # A contiguous [B, S, H, 2P] tensor seen as R = B*S*H rows of P pairs; this program takes
        # BLOCK_R rows. Row r is head r % H of token r // H, at sequence position (r // H) % S.
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # [BLOCK_R, 1]
        p = tl.arange(0, BLOCK_P)[None, :]  # [1, BLOCK_P]
        mask = (row < R) & (p < P)
        c_e, c_o, s_e, s_o = load_cos_sin(cos_ptr, sin_ptr, (row // H) % S, p, mask, P, ACC)
        off = row * 2 * P + 2 * p
        x_e = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        x_o = tl.load(x_ptr + off + 1, mask=mask, other=0.0).to(ACC)
        if BACKWARD:
            y_e, y_o = rope_rotate_bwd(x_e, x_o, c_e, c_o, s_e, s_o)
        else:
            y_e, y_o = rope_rotate(x_e, x_o, c_e, c_o, s_e, s_o)
        tl.store(out_ptr + off, y_e.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + off + 1, y_o.to(out_ptr.dtype.element_ty), mask=mask)


# --- host launcher ------------------------------------------------------------------------------
def launch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x: [B, S, H, D] contiguous (or the output gradient when `backward`); cos, sin: [S, D]."""
    B, S, H, D = x.shape
    out = C.new_empty_like(x)
    R, BLOCK_P = B * S * H, C.next_pow2(D // 2)
    BLOCK_R = C.rows_per_program(R, BLOCK_P)
    C.count(f"{FAMILY}.{'bwd' if backward else 'fwd'}")
    _rope_kernel[(triton.cdiv(R, BLOCK_R),)](x, cos, sin, out, R, S, H, D // 2, BACKWARD=backward,
                                             ACC=C.acc_dtype(x.dtype), BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P,
                                             num_warps=C.num_warps(BLOCK_R * BLOCK_P))
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
