import pytest
import torch
import torch.nn.functional as F
from kt_helpers import DTYPES, TILE_DTYPES, check_op, flux_tables, gpu_only, rand, rope_truth

from fluxlab import kernels
from fluxlab.kernels import qk_norm_rope as Q

# (B, S_img, S_ctx, H, D), FluxPosEmbed axes summing to D; one program per axis
SHAPES = [((1, 7, 3, 3, 10), (2, 4, 4)), ((2, 8, 4, 2, 16), (4, 6, 6))]
# Several programs along tokens and heads (rope.tile_config). CPU: FLUX's 24 heads of 128 make blocks of 64
# tokens x 8 heads in the interpreter, so 65 image tokens spill into a second token block and the heads
# span three. GPU (blocks of 4 to 256 tokens): 4096 + 1 image tokens with 5 heads of D=10 (a block of
# 16), and FLUX.1 (512 text + 4096 image tokens = 4608, 24 heads of 128).
TILE_SHAPES = [((1, 65, 7, 24, 128), (16, 56, 56)),
               pytest.param((1, 4097, 7, 3, 16), (4, 6, 6), marks=gpu_only),
               pytest.param((2, 4097, 7, 5, 10), (2, 4, 4), marks=gpu_only),
               pytest.param((1, 4096, 512, 24, 128), (16, 56, 56), marks=gpu_only, id="flux1")]


def truth(q, k, q_weight, k_weight, cos, sin, eps, cq=None, ck=None, cwq=None, cwk=None):
    """fp64: RMSNorm written out (not F.rms_norm), concatenation, complex-number RoPE, transpose."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    qn, kn = rms(q, q_weight), rms(k, k_weight)
    if cq is not None:
        qn, kn = torch.cat([rms(cq, cwq), qn], 1), torch.cat([rms(ck, cwk), kn], 1)
    return rope_truth(qn, cos, sin).transpose(1, 2), rope_truth(kn, cos, sin).transpose(1, 2)


def _with_context(fn):
    def call(q, k, q_weight, k_weight, cos, sin, eps, cq=None, ck=None, cwq=None, cwk=None):
        ctx = (cq, ck, cwq, cwk) if cq is not None else None
        return fn(q, k, q_weight, k_weight, cos, sin, eps, context=ctx)
    return call


def run_case(shape, axes, dtype, joint, close=True):
    B, S, Sc, H, D = shape
    Sj = S + Sc if joint else S
    cos, sin = flux_tables(Sj, axes)
    inputs = dict(q=rand(B, S, H, D, seed=1, scale=3), k=rand(B, S, H, D, seed=2), q_weight=1 + rand(D, seed=3) / 4,
                  k_weight=1 + rand(D, seed=4) / 4, cos=cos, sin=sin, eps=1e-6)
    if joint:
        inputs.update(cq=rand(B, Sc, H, D, seed=5), ck=rand(B, Sc, H, D, seed=6, scale=0.1),
                      cwq=1 + rand(D, seed=7) / 4, cwk=1 + rand(D, seed=8) / 4)
    (q_out, k_out) = check_op(_with_context(Q.qk_norm_rope), _with_context(Q.reference), truth, inputs, dtype,
                              keep=("cos", "sin", "eps"), close=close)
    assert q_out.shape == (B, H, Sj, D) and q_out.is_contiguous(), "not written in SDPA's [B, H, S, D] layout"
    n = 2 if joint else 1  # one launch per stream
    assert kernels.counters() == {"qk_norm_rope.fwd": n, "qk_norm_rope.bwd": n}
    assert kernels.fallbacks() == {}


@pytest.mark.parametrize("joint", [True, False], ids=["text+image", "image"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axes", SHAPES)
def test_qk_norm_rope_matches_reference_and_fp64(shape, axes, dtype, joint):
    run_case(shape, axes, dtype, joint)


@pytest.mark.parametrize("joint", [True, False], ids=["text+image", "image"])
@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("shape,axes", TILE_SHAPES)
def test_qk_norm_rope_across_tile_boundaries(shape, axes, dtype, joint):
    B, S, Sc, H, D = shape
    cfg = Q.rope.tile_config(S, H, D)
    assert S > cfg["BLOCK_T"] and H > cfg["BLOCK_H"], f"{shape} fits one block per axis {cfg}: no boundary crossed"
    # The norm weights' gradients sum over B*S*H rows: fp32 judged against fp64 only (see check_op).
    run_case(shape, axes, dtype, joint, close=False)


def test_weightless_norm_is_rms_norm_without_affine():
    q, k = rand(1, 4, 2, 6, seed=1).float(), rand(1, 4, 2, 6, seed=2).float()
    cos, sin = flux_tables(4, (2, 2, 2))
    out = Q.qk_norm_rope(q, k, None, None, cos, sin)
    torch.testing.assert_close(out[0], Q.reference(q, k, None, None, cos, sin)[0])
    torch.testing.assert_close(out[1].transpose(1, 2), Q.rope.reference(F.rms_norm(k, (6,), eps=1e-6), cos, sin))


def test_bad_shapes_name_the_tensor():
    q = torch.zeros(1, 4, 2, 6)
    cos = sin = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="q_weight must be"):
        Q.qk_norm_rope(q, q, torch.ones(5), None, cos, sin)
    with pytest.raises(ValueError, match="context k must be"):
        Q.qk_norm_rope(q, q, None, None, torch.zeros(6, 6), torch.zeros(6, 6),
                       context=(torch.zeros(1, 2, 2, 6), torch.zeros(1, 2, 3, 6), None, None))
    with pytest.raises(ValueError, match="cos must be"):
        Q.qk_norm_rope(q, q, None, None, cos, sin, context=(torch.zeros(1, 2, 2, 6),) * 2 + (None, None))
