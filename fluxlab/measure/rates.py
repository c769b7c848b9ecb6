"""Achieved rates against the roofline floor, from ceilings measured on the device itself."""

from __future__ import annotations

import numpy as np

from fluxlab.measure.timing import is_cuda, time_fn


def achieved(seconds: float, flops: float | None = None, bytes: float | None = None,  # noqa: A002
             ceilings: dict | None = None) -> dict:
    """TFLOP/s and TB/s achieved, and the fraction of the roofline floor (floor time / measured
    time, 1.0 = at the ceiling). `ceilings` is `measure_ceilings()`'s {"tflops", "tbps"}."""
    out = {"seconds": seconds,
           "tflops": flops / seconds / 1e12 if flops else None,
           "tbps": bytes / seconds / 1e12 if bytes else None,
           "floor_s": None, "fraction_of_floor": None, "bound": None}
    floors = {}
    if ceilings and flops and ceilings.get("tflops"):
        floors["compute"] = flops / (ceilings["tflops"] * 1e12)
    if ceilings and bytes and ceilings.get("tbps"):
        floors["memory"] = bytes / (ceilings["tbps"] * 1e12)
    if floors:
        out["bound"] = max(floors, key=floors.get)
        out["floor_s"] = floors[out["bound"]]
        out["fraction_of_floor"] = out["floor_s"] / seconds
    return out


def measure_ceilings(device, *, gemm_n: int = 8192, copy_bytes: int = 2**30, repeats: int = 20) -> dict | None:
    """Measured bf16 GEMM TFLOP/s and device-to-device copy TB/s on a CUDA device; None on the CPU
    (CPU numbers are never used for GPU claims)."""
    if not is_cuda(device):
        return None
    import torch

    a = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    gemm_ms = float(np.median(time_fn(lambda: torch.mm(a, b), repeats=repeats, warmup=5, device=device)))
    del a, b
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = float(np.median(time_fn(lambda: dst.copy_(src), repeats=repeats, warmup=5, device=device)))
    del src, dst
    return {"tflops": 2 * gemm_n**3 / (gemm_ms / 1e3) / 1e12,
            "tbps": 2 * copy_bytes / (copy_ms / 1e3) / 1e12,  # a copy reads and writes every byte
            "device_name": torch.cuda.get_device_name(torch.device(device))}
