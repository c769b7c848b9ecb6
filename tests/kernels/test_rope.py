import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from kt_helpers import DTYPES, check_op, flux_tables, rand, rope_truth

from fluxlab import kernels
from fluxlab.kernels import rope

# (B, S, H, D), FluxPosEmbed axes summing to D: one odd shape, one round one.
SHAPES = [((1, 7, 3, 10), (2, 4, 4)), ((2, 8, 2, 16), (4, 6, 6))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axes", SHAPES)
def test_rope_matches_reference_and_fp64(shape, axes, dtype):
    cos, sin = flux_tables(shape[1], axes)
    check_op(rope.apply_rope, rope.reference, rope_truth, dict(x=rand(*shape, seed=1), cos=cos, sin=sin),
             dtype, keep=("cos", "sin"), grad=("x",))
    assert kernels.counters() == {"rope.fwd": 1, "rope.bwd": 1}, "Triton RoPE did not run exactly once each way"
    assert kernels.fallbacks() == {}


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
