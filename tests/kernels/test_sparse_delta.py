import pytest
import torch
from kt_helpers import DEVICE, DTYPES, TILE_DTYPES, check_op, gpu_only, rand
from tiny_model import batch, forward_backward, tiny

from fluxlab import kernels
from fluxlab.kernels import sparse_delta as SD

SHAPES = [((7, 10), 0.3), ((16, 32), 0.05)]  # (out, in), density; one program
# Several programs over θ (C.rows_per_program: 65536 entries per program in the interpreter, 4096 on a
# GPU). CPU: K = 65537 (one entry past the first block). GPU: also an odd 1025 x 3001 weight and
# FLUX.1's 3072 x 3072 projection at 1% density (K = 94372).
TILE_SHAPES = [pytest.param((300, 257), 65537 / (300 * 257), id="K65537"),
               pytest.param((1025, 3001), 0.05, marks=gpu_only),
               pytest.param((3072, 3072), 0.01, marks=gpu_only, id="flux1")]


def truth_linear(x, weight, bias, theta, index):
    w = weight.reshape(-1).index_add(0, index.long(), theta).reshape(weight.shape)
    return x @ w.t() + bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,density", SHAPES)
def test_sparse_linear_matches_reference_and_fp64(shape, density, dtype):
    sparse_linear_case(shape, density, dtype)


@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("shape,density", TILE_SHAPES)
def test_sparse_linear_across_tile_boundaries(shape, density, dtype):
    K = sparse_linear_case(shape, density, dtype)
    assert K > SD.C.rows_per_program(K, 1), f"K={K} fits one program: no boundary crossed"


def sparse_linear_case(shape, density, dtype) -> int:
    out_f, in_f = shape
    index = SD.choose_indices(out_f * in_f, density, seed=3).to(DEVICE)
    inputs = dict(x=rand(2, 5, in_f, seed=1), weight=rand(out_f, in_f, seed=2), bias=rand(out_f, seed=4),
                  theta=rand(index.numel(), seed=5), index=index)
    # Large weights: dx sums over thousands of outputs, so fp32 is judged against fp64 only (see check_op).
    check_op(SD.sparse_linear, SD.reference_linear, truth_linear, inputs, dtype, keep=("theta",),
             grad=("x", "bias", "theta"), close=out_f * in_f < 2**17)
    # forward forms W_eff once; backward re-forms it for dx and gathers dθ
    assert kernels.counters() == {"sparse_delta.fwd": 2, "sparse_delta.bwd": 1}
    assert kernels.fallbacks() == {}
    return index.numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_delta_op_scatter_and_gather(dtype):
    index = SD.choose_indices(70, 0.3, seed=1).to(DEVICE)
    inputs = dict(weight=rand(7, 10, seed=1), theta=rand(index.numel(), seed=2), index=index)
    check_op(SD.sparse_delta, SD.reference, lambda weight, theta, index: weight.reshape(-1).index_add(
        0, index.long(), theta).reshape(weight.shape), inputs, dtype, keep=("theta",), grad=("theta",))
    assert kernels.counters() == {"sparse_delta.fwd": 1, "sparse_delta.bwd": 1}


def test_sparse_linear_backward_under_autocast_matches_reference():
    # Autocast runs the forward matmul in bf16 while x and bias stay fp32 (a LayerNorm output, say).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(12, 16, generator=g).to(DEVICE)
    b = torch.randn(12, generator=g).to(DEVICE).requires_grad_()
    theta = torch.randn(20, generator=g).to(DEVICE).requires_grad_()
    index = SD.choose_indices(w.numel(), 20 / w.numel(), seed=1).to(DEVICE)
    grads = []
    for fn in (SD.sparse_linear, SD.reference_linear):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = fn(x, w, b, theta, index)
        grads.append(torch.autograd.grad(y.float().square().sum(), (x, b, theta)))
    for got, want, t in zip(grads[0], grads[1], (x, b, theta)):
        assert got.dtype == t.dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_choose_indices_seeded_sorted_distinct():
    a, b = SD.choose_indices(10_000, 0.01, seed=7), SD.choose_indices(10_000, 0.01, seed=7)
    assert torch.equal(a, b) and a.numel() == 100 and a.dtype == torch.int32
    assert (a[1:] > a[:-1]).all() and 0 <= a.min() and a.max() < 10_000
    assert not torch.equal(a, SD.choose_indices(10_000, 0.01, seed=8))
    with pytest.raises(ValueError, match="density"):
        SD.choose_indices(10, 0.0, seed=0)


TARGETS = ["to_q", "proj_mlp"]  # attention (both block kinds) and the single blocks' MLP input


def _state_bytes(optimizer, model) -> int:
    """Bytes of optimizer state plus parameter gradients: what training keeps alive between steps."""
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return state + sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def test_enter_sparse_mode_drops_frozen_state_and_trains_theta():
    model, inputs = tiny(), batch()
    dense = [m.weight for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    model.requires_grad_(False)
    for p in dense:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dense, lr=1e-3)
    forward_backward(model, inputs)
    opt.step()
    assert all(p in opt.state for p in dense)
    dense_bytes = _state_bytes(opt, model)

    names = SD.apply_sparse_adapter(model, TARGETS, density=0.05, seed=0)
    assert len(names) == (2 + 2) + 2  # to_q in 2 double + 2 single blocks, proj_mlp in the 2 single
    mods = SD.sparse_modules(model)
    freed = SD.enter_sparse_mode(mods, opt)
    assert all(p not in opt.state for p in dense), "optimizer state of a frozen weight survived"
    assert all(all(p is not w for w in dense) for g in opt.param_groups for p in g["params"])
    # AdamW's exp_avg + exp_avg_sq, and the gradient, per frozen weight
    assert freed >= 3 * sum(p.numel() * p.element_size() for p in dense), freed

    before = {n: m.weight.clone() for n, m in mods.items()}
    forward_backward(model, inputs)
    assert all(m.theta.grad is not None and m.theta.grad.abs().sum() > 0 for m in mods.values())
    opt.step()
    assert all(m.theta.abs().sum() > 0 for m in mods.values()), "θ did not move"
    assert all(torch.equal(m.weight, before[n]) for n, m in mods.items()), "a frozen weight moved"
    sparse_bytes = _state_bytes(opt, model)
    assert sparse_bytes < dense_bytes / 10, (sparse_bytes, dense_bytes)
    assert kernels.counters()["sparse_delta.bwd"] == len(mods)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak allocator memory needs CUDA")
def test_sparse_mode_lowers_cuda_peak_memory():
    def peak_of_step(model, opt):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(model, {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch().items()})
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    model = tiny().cuda()
    dense = [m.weight for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    model.requires_grad_(False)
    [p.requires_grad_(True) for p in dense]
    opt = torch.optim.AdamW(dense)
    peak_of_step(model, opt)
    dense_peak = peak_of_step(model, opt)
    SD.apply_sparse_adapter(model, TARGETS, density=0.05, seed=0)
    SD.enter_sparse_mode(SD.sparse_modules(model), opt)
    peak_of_step(model, opt)
    assert peak_of_step(model, opt) < dense_peak


def test_adapter_starts_equal_and_state_dict_round_trips():
    model, inputs = tiny(), batch()
    want = model(**inputs)[0]
    SD.apply_sparse_adapter(model, ["to_q", "proj_mlp"], density=0.1, seed=5)
    torch.testing.assert_close(model(**inputs)[0], want)  # θ = 0: the stock model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.theta" for n in SD.sparse_modules(model)}
    with torch.no_grad():
        for m in SD.sparse_modules(model).values():
            m.theta.normal_()
    saved = SD.sparse_state_dict(model)
    other = tiny()
    SD.apply_sparse_adapter(other, ["to_q", "proj_mlp"], density=0.1, seed=5)
    SD.load_sparse_state_dict(other, saved)
    torch.testing.assert_close(other(**inputs)[0], model(**inputs)[0])
    wrong = tiny()
    SD.apply_sparse_adapter(wrong, ["to_q", "proj_mlp"], density=0.1, seed=6)
    with pytest.raises(ValueError, match="sparse_index differs"):
        SD.load_sparse_state_dict(wrong, saved)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        SD.apply_sparse_adapter(tiny(), ["to_qq"], density=0.1, seed=0)
