import pytest
import torch
from kt_helpers import DEVICE, to_device

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
