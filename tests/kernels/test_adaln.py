import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero
from kt_helpers import DTYPES, check_op, rand

from fluxlab import kernels
from fluxlab.kernels import adaln

SHAPES = [(1, 7, 37), (2, 8, 64)]  # (B, S, C): odd, round


def truth_modulate(x, scale, shift, eps):
    """fp64, LayerNorm written out: biased variance, as nn.LayerNorm."""
    mu = x.mean(-1, keepdim=True)
    xhat = (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps)
    return xhat * (1 + scale[:, None]) + shift[:, None]


def truth_gated(residual, x, gate, scale, shift, eps):
    h = residual + gate[:, None] * x
    return h, truth_modulate(h, scale, shift, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulate_matches_reference_and_fp64(shape, dtype):
    B, S, C = shape
    inputs = dict(x=rand(B, S, C, seed=1, scale=2) + 0.5, scale=rand(B, C, seed=2) / 2, shift=rand(B, C, seed=3), eps=1e-6)
    check_op(adaln.modulate, adaln.reference, truth_modulate, inputs, dtype, keep=("eps",))
    assert kernels.counters() == {"adaln.fwd": 1, "adaln.bwd": 1}
    assert kernels.fallbacks() == {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate_matches_reference_and_fp64(shape, dtype):
    B, S, C = shape
    inputs = dict(residual=rand(B, S, C, seed=4), x=rand(B, S, C, seed=5, scale=3), gate=rand(B, C, seed=6),
                  scale=rand(B, C, seed=7) / 2, shift=rand(B, C, seed=8), eps=1e-6)
    check_op(adaln.gated_residual_modulate, adaln.reference_gated, truth_gated, inputs, dtype, keep=("eps",))
    assert kernels.counters() == {"adaln.fwd": 1, "adaln.bwd": 1}


def test_fused_module_equals_stock_ada_layer_norm_zero():
    torch.manual_seed(0)
    stock = AdaLayerNormZero(24)
    x, emb = torch.randn(2, 5, 24), torch.randn(2, 24)
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
