import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from kt_helpers import DTYPES, TILE_DTYPES, check_op, flux_tables, gpu_only, rand, rope_truth

from fluxlab import kernels
from fluxlab.kernels import rope

# (B, S, H, D), FluxPosEmbed axes summing to D: one odd shape, one round one; one program per axis.
SHAPES = [((1, 7, 3, 10), (2, 4, 4)), ((2, 8, 2, 16), (4, 6, 6))]
# Several programs per axis. CPU: 4096 + 1 tokens with D=16 (the interpreter's token block is 4096 here),
# 3 heads. GPU (token blocks of 4 to 256): 4096 + 1 tokens with 5 heads of D=10 (a block of 16), 7 heads
# of D=128, and FLUX.1's 4608 tokens x 24 heads x 128.
TILE_SHAPES = [((1, 4097, 3, 16), (4, 6, 6)),
               pytest.param((2, 4097, 5, 10), (2, 4, 4), marks=gpu_only),
               pytest.param((1, 4097, 7, 128), (16, 56, 56), marks=gpu_only),
               pytest.param((1, 4608, 24, 128), (16, 56, 56), marks=gpu_only, id="flux1")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axes", SHAPES)
def test_rope_matches_reference_and_fp64(shape, axes, dtype):
    cos, sin = flux_tables(shape[1], axes)
    check_op(rope.apply_rope, rope.reference, rope_truth, dict(x=rand(*shape, seed=1), cos=cos, sin=sin),
             dtype, keep=("cos", "sin"), grad=("x",))
    assert kernels.counters() == {"rope.fwd": 1, "rope.bwd": 1}, "Triton RoPE did not run exactly once each way"
    assert kernels.fallbacks() == {}


@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("shape,axes", TILE_SHAPES)
def test_rope_across_tile_boundaries(shape, axes, dtype):
    cfg = rope.tile_config(*shape[1:])
    assert shape[1] > cfg["BLOCK_T"], f"{shape} fits one token block {cfg}: no boundary crossed"
    cos, sin = flux_tables(shape[1], axes)
    check_op(rope.apply_rope, rope.reference, rope_truth, dict(x=rand(*shape, seed=1), cos=cos, sin=sin),
             dtype, keep=("cos", "sin"), grad=("x",))
    assert kernels.counters() == {"rope.fwd": 1, "rope.bwd": 1} and kernels.fallbacks() == {}


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_diffusers_apply_rotary_emb(dtype):
    x = rand(2, 5, 3, 16, seed=2).to(dtype)
    cos, sin = flux_tables(5, (4, 6, 6))
    assert torch.equal(rope.reference(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))


def test_bad_shapes_name_the_tensor():
    x = torch.zeros(1, 4, 2, 6)
    with pytest.raises(ValueError, match="cos must be"):
        rope.apply_rope(x, torch.zeros(3, 6), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="even"):
        rope.apply_rope(torch.zeros(1, 4, 2, 5), torch.zeros(4, 5), torch.zeros(4, 5))
