"""Shared checks for the kernel tests: fast path vs its reference vs a float64 truth, forward and backward.

The tests run where the kernels run: on a CUDA machine every tensor is on the GPU and the compiled
kernels serve them; on a CPU-only machine the same tests run the kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch

from fluxlab.kernels import _common

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# fp16 only on the GPU: the interpreter's cost per launch would grow the CPU suite by half for a dtype
# whose code path (load, fp32 math, store) is bf16's.
DTYPES = (torch.float32, torch.bfloat16, torch.float16) if CUDA else (torch.float32, torch.bfloat16)
# Tile-boundary shapes on the CPU run in fp32 only: the masks do not depend on the dtype, and each
# interpreted launch of a multi-block shape costs about a second.
TILE_DTYPES = DTYPES if CUDA else (torch.float32,)
# Fast vs the same-dtype reference in fp32, where both are accurate and differ only in operation
# order. In bf16/fp16 the reference's own rounding (low-precision intermediates in its backward) can
# exceed a few ulps, so those are judged only against the fp64 truth, as docs/ARCHITECTURE.md ("Kernels") asks.
CLOSE = {torch.float32: dict(rtol=1e-5, atol=1e-5)}

# Shapes of thousands of rows: the interpreter runs them for minutes, a GPU in milliseconds.
gpu_only = pytest.mark.skipif(not CUDA, reason="large shape: run compiled on a CUDA GPU (make test-gpu); "
                                               "the CPU interpreter would take minutes")


def rand(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded float64 normal noise on DEVICE."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, device=DEVICE) * scale


def to_device(x):
    """x (a tensor, or a tuple/list of them, others untouched) on DEVICE, keeping requires_grad."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t) for t in x)
    if isinstance(x, torch.Tensor):
        return x.detach().to(DEVICE).requires_grad_(x.requires_grad)
    return x


def _err(a: torch.Tensor, truth: torch.Tensor) -> float:
    return (a.double() - truth).abs().max().item()


def assert_vs_truth(name: str, fast: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                    close: bool = True):
    """fast has no unwritten (NaN) element, is close to ref (fp32, when `close`), and is no further from
    the fp64 truth than 2x the reference's own error in this dtype (+ one ulp of the largest value, so
    an exact reference does not demand an exact kernel)."""
    assert fast.dtype == ref.dtype, f"{name}: dtype {fast.dtype} != reference {ref.dtype}"
    assert fast.device.type == truth.device.type == DEVICE.type, f"{name}: ran on {fast.device}, not {DEVICE}"
    assert not torch.isnan(fast).any(), f"{name}: NaN in output (unwritten element or bad math)"
    if close and dtype in CLOSE:
        torch.testing.assert_close(fast, ref, **CLOSE[dtype], msg=lambda m: f"{name} vs reference: {m}")
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    e_fast, e_ref = _err(fast, truth), _err(ref, truth)
    assert e_fast <= 2 * e_ref + ulp, f"{name}: error vs fp64 {e_fast:.3g} > 2 x reference's {e_ref:.3g} + {ulp:.3g}"


def check_op(fast_fn, ref_fn, truth_fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype,
             keep: tuple[str, ...] = (), grad: tuple[str, ...] | None = None, seed: int = 0, close: bool = True):
    """Run fast_fn and ref_fn on `inputs` cast to dtype (names in `keep` keep their dtype, e.g. the fp32
    cos/sin tables), truth_fn on the same values in float64; compare outputs, then the gradients of the
    inputs named in `grad` (default: all cast inputs) for a random upstream gradient. Outputs are
    poisoned with NaN first. Returns the fast outputs.

    close=False drops the fp32 fast-vs-reference check for shapes of thousands of rows, where summation
    order alone moves an fp32 sum by more than 1e-5; the fp64 truth still judges every dtype."""
    grad = tuple(n for n, t in inputs.items() if n not in keep and isinstance(t, torch.Tensor)
                 and t.is_floating_point()) if grad is None else grad

    def prepare(target):
        out = {}
        for n, t in inputs.items():
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                out[n] = t  # None, scalars, index tensors pass through
                continue
            t = t.to(target or (t.dtype if n in keep else dtype))
            out[n] = t.detach().requires_grad_(n in grad)
        return out

    runs = {}
    with _common.poisoned_outputs():
        runs["fast"] = (prepare(None), fast_fn)
        runs["ref"] = (prepare(None), ref_fn)
        runs["truth"] = (prepare(torch.float64), truth_fn)
        outs = {k: _as_tuple(fn(**ins)) for k, (ins, fn) in runs.items()}
        for i, (f, r, t) in enumerate(zip(outs["fast"], outs["ref"], outs["truth"])):
            assert_vs_truth(f"output {i}", f, r, t, dtype, close)
        ups = [rand(*o.shape, seed=seed + 100 + i) for i, o in enumerate(outs["truth"])]
        for k, (ins, _) in runs.items():
            torch.autograd.backward(list(outs[k]), [u.to(o.dtype) for u, o in zip(ups, outs[k])])
        for n in grad:
            f, r, t = (runs[k][0][n].grad for k in ("fast", "ref", "truth"))
            assert f is not None, f"no gradient reached {n}"
            assert_vs_truth(f"grad {n}", f, r, t, f.dtype, close)
    return outs["fast"]


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def flux_tables(S: int, axes: tuple[int, ...], seed: int = 0):
    """cos, sin [S, sum(axes)] from diffusers' FluxPosEmbed, for random 3-axis integer positions."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (S, len(axes)), generator=g).float()
    return to_device(FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids))


def rope_truth(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Independent fp64 RoPE: each channel pair as a complex number times e^{i·angle}. Valid for
    FluxPosEmbed's tables, where both members of a pair share one angle."""
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]), "tables must repeat each angle for both pair members"
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())  # [B, S, H, D/2]
    rot = torch.complex(cos[:, 0::2].double(), sin[:, 0::2].double())[None, :, None, :]  # [1, S, 1, D/2]
    return torch.view_as_real(z * rot).flatten(3)
