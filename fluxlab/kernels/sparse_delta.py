"""Sparse-delta adapter: `W_eff = W + Φ(θ)`.

Φ scatters a trainable vector θ [K] into the frozen weight's shape at a fixed, seeded set of flat
indices (sorted, unique); its adjoint Φᵀ gathers a dense gradient at those indices, so
dθ = gather(dW_eff, index). W stays what it is (a frozen Parameter, the same tensor the stock layer
held): nothing dense is trained, stored twice, or rebuilt; per call only W_eff is formed, and the
linear layer drops it right after use (it is re-formed in backward instead of being saved).

Layers: `_fl_sparse_delta_scatter_kernel` / `_fl_sparse_delta_gather_kernel` (Triton) -> `launch_scatter_add` / `launch_gather`
-> `SparseDeltaFunction` (the op Φ) and `SparseDeltaLinearFunction` (y = x W_effᵀ + b) ->
`sparse_delta` / `sparse_linear` -> `SparseDeltaLinear`; `reference` / `reference_linear` beside them.
Trainer API: `apply_sparse_adapter`, `enter_sparse_mode`, `sparse_state_dict`, `load_sparse_state_dict`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import _common as C
from ._common import tl, triton

FAMILY = "sparse_delta"


# --- Triton -----------------------------------------------------------------------------------
if C.HAVE_TRITON:
    @triton.jit
    def _fl_sparse_delta_scatter_kernel(w_ptr, idx_ptr, theta_ptr, K, ACC: tl.constexpr, BLOCK: tl.constexpr):
        # Φ, in place on a copy of W:  w[idx[k]] = w[idx[k]] + θ[k]   (indices unique: no atomics)
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = k < K
        i = tl.load(idx_ptr + k, mask=m, other=0).to(tl.int64)
        w = tl.load(w_ptr + i, mask=m, other=0.0).to(ACC) + tl.load(theta_ptr + k, mask=m, other=0.0).to(ACC)
        tl.store(w_ptr + i, w.to(w_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _fl_sparse_delta_gather_kernel(g_ptr, idx_ptr, out_ptr, K, BLOCK: tl.constexpr):
        # Φᵀ:  dθ[k] = dW[idx[k]]
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = k < K
        i = tl.load(idx_ptr + k, mask=m, other=0).to(tl.int64)
        tl.store(out_ptr + k, tl.load(g_ptr + i, mask=m, other=0.0).to(out_ptr.dtype.element_ty), mask=m)


# --- host launchers -------------------------------------------------------------------------------
def launch_scatter_add(weight: torch.Tensor, theta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """W_eff = W + Φ(θ): a fresh tensor shaped like weight (the copy is a plain memcpy)."""
    out = weight.contiguous().clone()
    K = index.numel()
    BLOCK = C.rows_per_program(K, 1)
    C.count(f"{FAMILY}.fwd")
    _fl_sparse_delta_scatter_kernel[(triton.cdiv(K, BLOCK),)](out, index, theta, K, ACC=C.acc_dtype(weight.dtype), BLOCK=BLOCK)
    return out


def launch_gather(grad: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dθ = Φᵀ(grad) = grad.flatten()[index], in `dtype`."""
    grad = grad.contiguous()
    K = index.numel()
    out = C.new_empty((K,), dtype, grad.device)
    BLOCK = C.rows_per_program(K, 1)
    C.count(f"{FAMILY}.bwd")
    _fl_sparse_delta_gather_kernel[(triton.cdiv(K, BLOCK),)](grad, index, out, K, BLOCK=BLOCK)
    return out


# --- autograd -------------------------------------------------------------------------------------
class SparseDeltaFunction(torch.autograd.Function):
    """The op Φ: (weight, theta, index) -> W_eff. Backward: dW = g (if W trains), dθ = gather(g)."""

    @staticmethod
    def forward(ctx, weight, theta, index):
        ctx.save_for_backward(index)
        ctx.theta_dtype = theta.dtype
        return launch_scatter_add(weight, theta.contiguous(), index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        dtheta = launch_gather(grad, index, ctx.theta_dtype) if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), dtheta, None


class SparseDeltaLinearFunction(torch.autograd.Function):
    """y = x W_effᵀ + b with W frozen. Saves x, not W_eff: W_eff is re-formed in backward, so a
    training step holds one transient dense copy per layer at a time, not one per layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta, index):
        if weight.requires_grad:  # backward gives W no gradient; refuse rather than drop it silently
            raise ValueError("sparse_linear keeps W frozen; call weight.requires_grad_(False)")
        theta = theta.contiguous()
        w_eff = launch_scatter_add(weight, theta, index)  # [out, in]
        ctx.save_for_backward(x, weight, theta, index)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, theta, index = ctx.saved_tensors
        # Under autocast the forward's F.linear ran in low precision while x may be fp32: do the
        # backward matmuls in dy's dtype and hand each gradient back in its input's dtype.
        dy2 = dy.reshape(-1, dy.shape[-1])                                   # [N, out]
        x2 = x.reshape(-1, x.shape[-1]).to(dy2.dtype)                        # [N, in]
        dx = dtheta = dbias = None
        if ctx.needs_input_grad[0]:
            w_eff = launch_scatter_add(weight, theta, index).to(dy2.dtype)  # [out, in]
            dx = (dy2 @ w_eff).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[3]:
            dtheta = launch_gather(dy2.t() @ x2, index, theta.dtype)  # dense dW_eff [out, in], gathered
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(0).to(ctx.bias_dtype)
        return dx, None, dbias, dtheta, None


# --- public ops -------------------------------------------------------------------------------------
def _check(weight: torch.Tensor, theta: torch.Tensor, index: torch.Tensor) -> None:
    if theta.ndim != 1 or index.ndim != 1 or theta.numel() != index.numel():
        raise ValueError(f"theta {tuple(theta.shape)} and index {tuple(index.shape)} must be 1-D and equally long")
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be int32 or int64, got {index.dtype}")
    if index.device != weight.device:
        raise ValueError(f"index is on {index.device}, weight on {weight.device}")


def sparse_delta(weight: torch.Tensor, theta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """W_eff = W + Φ(θ). weight: any shape; theta: [K]; index: [K] unique flat indices into weight."""
    _check(weight, theta, index)
    if C.triton_can_serve(FAMILY, weight, theta):
        return SparseDeltaFunction.apply(weight, theta, index)
    return reference(weight, theta, index)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, theta: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor:
    """F.linear(x, W + Φ(θ), bias). x: [..., in]; weight: [out, in]; bias: [out] or None -> [..., out]."""
    _check(weight, theta, index)
    if C.triton_can_serve(FAMILY, x, weight, theta):
        return SparseDeltaLinearFunction.apply(x, weight, bias, theta, index)
    return reference_linear(x, weight, bias, theta, index)


def reference(weight: torch.Tensor, theta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch Φ: add θ at the flat indices, in fp32 (fp64 for fp64), rounded to weight.dtype."""
    acc = torch.float64 if torch.float64 in (weight.dtype, theta.dtype) else torch.float32
    flat = weight.reshape(-1)
    upd = (flat[index.long()].to(acc) + theta.to(acc)).to(weight.dtype)
    return flat.index_copy(0, index.long(), upd).reshape(weight.shape)


def reference_linear(x, weight, bias, theta, index):
    return F.linear(x, reference(weight, theta, index), bias)


def gradcheck_cases() -> list[tuple[str, object, tuple]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    index = choose_indices(w.numel(), 0.3, seed=0)
    theta = torch.randn(index.numel(), dtype=torch.float64, generator=g).requires_grad_()
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    return [("sparse_delta", SparseDeltaFunction.apply, (w.clone().requires_grad_(), theta, index)),
            ("sparse_delta.linear", SparseDeltaLinearFunction.apply, (x, w, bias, theta, index))]


# --- the adapter ------------------------------------------------------------------------------------
def choose_indices(numel: int, density: float, seed: int) -> torch.Tensor:
    """K = max(1, round(density * numel)) distinct flat indices, sorted, from a seeded generator.

    Rejection sampling rather than randperm(numel): a 3072x12288 FLUX weight would need a 300 MB
    permutation per layer. int32 when it fits, which halves the index memory.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    K = max(1, round(density * numel))
    g = torch.Generator().manual_seed(seed)
    idx = torch.empty(0, dtype=torch.int64)
    while idx.numel() < K:
        draw = torch.randint(numel, (int(1.2 * (K - idx.numel())) + 16,), generator=g)
        idx = torch.unique(torch.cat([idx, draw]))  # sorted, distinct
    if idx.numel() > K:
        idx = idx[torch.randperm(idx.numel(), generator=g)[:K]].sort().values
    return idx.to(torch.int32 if numel < 2**31 else torch.int64)


class SparseDeltaLinear(nn.Module):
    """An nn.Linear whose weight is frozen and adapted by a sparse trainable delta.

    Keeps the wrapped layer's own `weight` and `bias` Parameters (same objects, so an optimizer's
    state for them can be found and dropped, and state-dict keys do not move); adds `theta` [K]
    (trainable, zeros at start so the layer starts out equal to the stock one) and the buffer
    `sparse_index` [K].
    """

    def __init__(self, linear: nn.Linear, density: float, seed: int, theta_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseDeltaLinear wraps nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.density = density
        index = choose_indices(self.weight.numel(), density, seed).to(self.weight.device)
        self.register_buffer("sparse_index", index)
        self.theta = nn.Parameter(torch.zeros(index.numel(), dtype=theta_dtype, device=self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight, self.bias, self.theta, self.sparse_index)

    def merged_weight(self) -> torch.Tensor:
        """W + Φ(θ), detached: what a plain nn.Linear would need to reproduce this layer."""
        with torch.no_grad():
            return reference(self.weight, self.theta, self.sparse_index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={self.density}, k={self.sparse_index.numel()}")


def _module_seed(seed: int, name: str) -> int:
    # crc32, not hash(): Python's str hash changes per process, the index set must not.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def apply_sparse_adapter(transformer: nn.Module, target_modules: list[str], density: float, seed: int) -> list[str]:
    """Wrap every nn.Linear whose name is, or ends with ".<target>", in SparseDeltaLinear (peft's
    suffix rule). Freezes every other parameter, so only the θs train. Returns the wrapped names."""
    if not target_modules:
        raise ValueError("target_modules is empty: name the linear layers to adapt, e.g. ['to_q', 'to_k']")
    choose_indices(1, density, 0)  # validates density up front, before anything is modified
    matched = {t: 0 for t in target_modules}
    names = []
    for name, module in list(transformer.named_modules()):
        hits = [t for t in target_modules if name == t or name.endswith("." + t)]
        if not hits or not isinstance(module, nn.Linear):
            continue
        for t in hits:
            matched[t] += 1
        names.append(name)
    unmatched = [t for t, n in matched.items() if n == 0]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} matched no nn.Linear in {type(transformer).__name__}")
    transformer.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, SparseDeltaLinear(getattr(parent, child), density, _module_seed(seed, name)))
    return names


def sparse_modules(transformer: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in transformer.named_modules() if isinstance(m, SparseDeltaLinear)}


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    return 0


def enter_sparse_mode(modules: Iterable[SparseDeltaLinear] | dict, optimizer: torch.optim.Optimizer) -> int:
    """Switch an optimizer from training the dense weights to training the θs.

    For each module's frozen weight and bias: delete its optimizer state, drop it from the param
    groups, free its .grad. Then add the θs (not yet present) as a new param group with the
    optimizer's defaults. Returns the bytes released (optimizer state + gradients).
    """
    modules = list(modules.values()) if isinstance(modules, dict) else list(modules)
    bad = [type(m).__name__ for m in modules if not isinstance(m, SparseDeltaLinear)]
    if bad:
        raise TypeError(f"enter_sparse_mode takes SparseDeltaLinear modules, got {bad}")
    frozen = {id(p): p for m in modules for p in (m.weight, m.bias) if p is not None}
    freed = 0
    for p in frozen.values():
        if p in optimizer.state:
            freed += _tensor_bytes(optimizer.state[p])
            del optimizer.state[p]
        if p.grad is not None:
            freed += _tensor_bytes(p.grad)
            p.grad = None
        p.requires_grad_(False)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in frozen]
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    thetas = [m.theta for m in modules if id(m.theta) not in present]
    if thetas:
        optimizer.add_param_group({"params": thetas})
    return freed


def sparse_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.theta": θ, "<module>.sparse_index": indices} for every SparseDeltaLinear (CPU copies)."""
    out = {}
    for name, m in sparse_modules(transformer).items():
        out[f"{name}.theta"] = m.theta.detach().cpu().clone()
        out[f"{name}.sparse_index"] = m.sparse_index.cpu().clone()
    return out


def load_sparse_state_dict(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load θs saved by `sparse_state_dict`; the index sets must be the ones this model drew."""
    mods = sparse_modules(transformer)
    expected = {f"{n}.{k}" for n in mods for k in ("theta", "sparse_index")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"sparse state dict does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, m in mods.items():
        idx = state[f"{name}.sparse_index"]
        if idx.shape != m.sparse_index.shape or not torch.equal(idx.to(m.sparse_index), m.sparse_index):
            raise ValueError(f"{name}.sparse_index differs from this model's index set "
                             "(another seed, density or layer shape)")
        with torch.no_grad():
            m.theta.copy_(state[f"{name}.theta"])
