import pytest
import torch
from kt_helpers import DEVICE, gpu_only, to_device

from fluxlab import kernels

# float64 inputs on the device the kernels run on: compiled on a CUDA GPU, interpreted on the CPU.
CASES = [(name, fn, to_device(inputs)) for name, fn, inputs in kernels.gradcheck_cases()]


def test_every_family_has_cases():
    assert {name.split(".")[0] for name, _, _ in CASES} == set(kernels.FAMILIES)


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_float64_on_the_triton_path(name, fn, inputs):
    # On the CPU fast_mode checks the Jacobian along random directions, not column by column: each
    # interpreted launch costs ~0.1 s and full mode needs two launches per input element. A GPU launch
    # costs microseconds, so there every column is checked.
    assert all(t.device.type == DEVICE.type for t in inputs if isinstance(t, torch.Tensor))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=DEVICE.type != "cuda")
    family = name.split(".")[0]
    assert kernels.family_totals()[family] > 0, f"{name}: the Triton path never ran"
    assert kernels.fallbacks() == {}


def tile_cases():
    """float64 cases whose shapes span several programs per axis on a GPU (see the tile-boundary tests)."""
    from kt_helpers import flux_tables, rand

    from fluxlab.kernels import adaln, qk_norm_rope, rope, sparse_delta

    def rnd(*shape, seed):
        return rand(*shape, seed=seed).requires_grad_()

    cos, sin = (t.double() for t in flux_tables(4097, (4, 6, 6)))
    qcos, qsin = (t.double() for t in flux_tables(300 + 7, (4, 6, 6)))
    index = sparse_delta.choose_indices(64 * 300, 0.3, seed=0).to(DEVICE)  # K = 5760: two programs
    B, S, C = 2, 33, 1025
    return [
        ("adaln.gated_residual", adaln.ModulateFunction.apply,
         (rnd(B, S, C, seed=1), rnd(B, C, seed=2), rnd(B, C, seed=3), 1e-6, rnd(B, S, C, seed=4), rnd(B, C, seed=5))),
        ("rope", rope.RopeFunction.apply, (rnd(1, 4097, 3, 16, seed=6), cos, sin)),
        ("qk_norm_rope.joint", qk_norm_rope.QKNormRopeFunction.apply,
         (rnd(1, 300, 5, 16, seed=7), rnd(1, 300, 5, 16, seed=8), rnd(16, seed=9), rnd(16, seed=10), qcos, qsin, 1e-6,
          rnd(1, 7, 5, 16, seed=11), rnd(1, 7, 5, 16, seed=12), rnd(16, seed=13), rnd(16, seed=14))),
        ("sparse_delta.linear", sparse_delta.SparseDeltaLinearFunction.apply,
         (rnd(2, 3, 300, seed=15), rand(64, 300, seed=16), rnd(64, seed=17), rnd(index.numel(), seed=18), index)),
    ]


@gpu_only
@pytest.mark.parametrize("case", range(4), ids=["adaln", "rope", "qk_norm_rope", "sparse_delta"])
def test_gradcheck_float64_across_tile_boundaries(case):
    # Random-direction (fast) mode: these inputs have tens of thousands of elements.
    name, fn, inputs = tile_cases()[case]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True), name
    assert kernels.family_totals()[name.split(".")[0]] > 0 and kernels.fallbacks() == {}
