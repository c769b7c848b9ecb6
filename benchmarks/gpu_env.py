"""One-shot GPU facts for provenance: versions, device, ceilings, and the flux1-dev preset build.

Usage: python -m benchmarks.gpu_env --out DIR   (writes gpu_env.json)
"""

import argparse
import json
import os
import time

import torch


def ceilings() -> dict:
    """bf16 GEMM rate (8192^3, random data) and device-to-device copy bandwidth (read + write),
    measured by fluxlab's one timer (`bench.measure_ceilings`)."""
    from fluxlab import bench

    c = bench.measure_ceilings("cuda")
    return {"bf16_gemm_tflops": c["tflops"], "copy_tb_s": c["tbps"]}


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
