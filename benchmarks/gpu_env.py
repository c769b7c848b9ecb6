"""One-shot GPU facts for provenance: versions, device, ceilings, and the flux1-dev preset build.

Usage: python -m benchmarks.gpu_env --out DIR   (writes gpu_env.json)
"""

import argparse
import json
import os
import time

import torch


def ceilings() -> dict:
    """bf16 GEMM rate (8192^3, random data) and device-to-device copy bandwidth (read + write)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    src = torch.randn(2 * 1024**3 // 4, device="cuda")  # 2 GiB of fp32
    dst = torch.empty_like(src)

    def timed(fn, n):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n):
            start.record(); fn(); end.record(); torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    t_mm = timed(lambda: a @ b, 20)
    t_cp = timed(lambda: dst.copy_(src), 20)
    return {"bf16_gemm_tflops": 2 * 8192**3 / t_mm / 1e12, "copy_tb_s": 2 * src.numel() * 4 / t_cp / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    import diffusers, peft, transformers, triton
    from fluxlab import models

    info = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, **ceilings()}
    torch.cuda.synchronize(); t0 = time.perf_counter()
    model = models.build_transformer("flux1-dev", "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    info.update(flux1_dev_build_s=time.perf_counter() - t0, flux1_dev_params=models.param_count(model),
                flux1_dev_gib=torch.cuda.memory_allocated() / 2**30,
                all_on_cuda_bf16=all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters()))
    json.dump(info, open(os.path.join(out, "gpu_env.json"), "w"), indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
