import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero
from kt_helpers import DEVICE, DTYPES, TILE_DTYPES, check_op, gpu_only, rand

from fluxlab import kernels
from fluxlab.kernels import adaln

SHAPES = [(1, 7, 37), (2, 8, 64)]  # (B, S, C): odd, round; one program per axis
# Several programs along the rows and a channel count short of its block (C=1025 in a block of 2048).
# On the CPU the interpreter's row block is 32 rows here, so S=33 spills one row into a second program
# and the backward reduction into a second chunk whose row range ends mid-block. On the GPU: 4096 + 1
# rows; FLUX.1's width; and 40000 rows, where a chunk's 76 rows end inside a 64-row block.
TILE_SHAPES = [(2, 33, 1025),
               pytest.param((2, 4097, 1025), marks=gpu_only),
               pytest.param((1, 4608, 3072), marks=gpu_only, id="flux1"),
               pytest.param((1, 40000, 37), marks=gpu_only)]


def truth_modulate(x, scale, shift, eps):
    """fp64, LayerNorm written out: biased variance, as nn.LayerNorm."""
    mu = x.mean(-1, keepdim=True)
    xhat = (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps)
    return xhat * (1 + scale[:, None]) + shift[:, None]


def truth_gated(residual, x, gate, scale, shift, eps):
    h = residual + gate[:, None] * x
    return h, truth_modulate(h, scale, shift, eps)


def modulate_inputs(B, S, C):
    return dict(x=rand(B, S, C, seed=1, scale=2) + 0.5, scale=rand(B, C, seed=2) / 2, shift=rand(B, C, seed=3), eps=1e-6)


def gated_inputs(B, S, C):
    return dict(residual=rand(B, S, C, seed=4), x=rand(B, S, C, seed=5, scale=3), gate=rand(B, C, seed=6),
                scale=rand(B, C, seed=7) / 2, shift=rand(B, C, seed=8), eps=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulate_matches_reference_and_fp64(shape, dtype):
    check_op(adaln.modulate, adaln.reference, truth_modulate, modulate_inputs(*shape), dtype, keep=("eps",))
    assert kernels.counters() == {"adaln.fwd": 1, "adaln.bwd": 1}
    assert kernels.fallbacks() == {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate_matches_reference_and_fp64(shape, dtype):
    check_op(adaln.gated_residual_modulate, adaln.reference_gated, truth_gated, gated_inputs(*shape), dtype,
             keep=("eps",))
    assert kernels.counters() == {"adaln.fwd": 1, "adaln.bwd": 1}


@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("shape", TILE_SHAPES)
def test_tile_boundaries_and_chunked_weight_gradients(shape, dtype, gated, monkeypatch):
    """Masks at the last row block and past C, and the backward's two-stage reduction over several
    chunks of rows (a row counted in two chunks, or in none, moves dscale/dshift/dgate)."""
    chunks, bwd_chunks = [], adaln._bwd_chunks

    def spy(*args):  # the launcher's own choice, recorded
        chunks.append(bwd_chunks(*args))
        return chunks[-1]

    monkeypatch.setattr(adaln, "_bwd_chunks", spy)
    big = shape[1] > 1000  # fp32 sums over thousands of rows: judged against fp64 only (see check_op)
    if gated:
        check_op(adaln.gated_residual_modulate, adaln.reference_gated, truth_gated, gated_inputs(*shape), dtype,
                 keep=("eps",), close=not big)
    else:
        check_op(adaln.modulate, adaln.reference, truth_modulate, modulate_inputs(*shape), dtype, keep=("eps",),
                 close=not big)
    assert kernels.counters() == {"adaln.fwd": 1, "adaln.bwd": 1} and kernels.fallbacks() == {}
    assert len(chunks) == 1 and chunks[0] > 1, f"the backward ran {chunks} chunk(s): its reduction was not exercised"


def test_fused_module_equals_stock_ada_layer_norm_zero():
    torch.manual_seed(0)
    stock = AdaLayerNormZero(24).to(DEVICE)
    x, emb = torch.randn(2, 5, 24, device=DEVICE), torch.randn(2, 24, device=DEVICE)
    want = stock(x, emb=emb)
    stock.__class__ = adaln.FusedAdaLayerNormZero
    got = stock(x, emb=emb)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert kernels.counters() == {"adaln.fwd": 1}


def test_bad_shapes_name_the_tensor():
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="scale must be"):
        adaln.modulate(x, torch.zeros(2, 7), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="residual must be"):
        adaln.gated_residual_modulate(torch.zeros(2, 4, 8), x, torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, 8))
