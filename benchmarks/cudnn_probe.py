"""Root-cause probe for cuDNN SDPA's backward failing inside FLUX training (GPU only).

Hypothesis: FLUX's single-stream block concatenates the attention output with the MLP branch
(`torch.cat([attn_output, mlp_hidden_states], dim=2)`) before `proj_out`. Autograd hands SDPA a
grad_out that is a *slice* of the concatenated gradient: [B, S, H*D] with row stride
H*D + mlp_dim (15360 at FLUX.1 width) instead of H*D (3072). Isolated tests used contiguous or
transposed grad_outs, never this one.

Each case runs in its own process (an illegal memory access kills the CUDA context).
Usage: python -m benchmarks.cudnn_probe --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = ["iso_dense_grad", "iso_sliced_grad", "iso_sliced_grad_fixed", "iso_seq_sliced_then_dense",
         "iso_seq_dense_then_sliced", "iso_seq_sliced_then_dense_fixed", "model_stock_cudnn", "model_fluxlab_cudnn"]


def _iso(case: str) -> dict:
    """cuDNN fwd+bwd at the FLUX shape against flash, for one grad_out layout or a sequence of them.

    `sliced` is the layout FLUX's single block produces; `dense` the one double blocks produce.
    A sequence runs both in one process, in training's order (single blocks' backward runs first).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, S, H, D, MLP = 1, 4608, 24, 128, 12288
    g = torch.Generator("cuda").manual_seed(0)
    # q/k/v as diffusers makes them: [B, S, H, D] contiguous, permuted to [B, H, S, D].
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
               .permute(0, 2, 1, 3).requires_grad_() for _ in range(3))
    full = torch.randn(B, S, H * D + MLP, device="cuda", dtype=torch.bfloat16, generator=g)
    fixed = case.endswith("_fixed")

    def d_out(layout):
        grad = full[..., : H * D]                                     # [B, S, H*D], row stride H*D + MLP
        if layout == "dense" or fixed:
            grad = grad.contiguous()                                  # row stride H*D
        return grad.view(B, S, H, D).permute(0, 2, 1, 3)             # [B, H, S, D] as autograd delivers it

    def run(backend, layout):
        for t in (q, k, v):
            t.grad = None
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out.backward(d_out(layout))
        torch.cuda.synchronize()
        return [t.grad.float() for t in (q, k, v)]

    if case.startswith("iso_seq"):
        layouts = ["sliced", "dense"] if "sliced_then_dense" in case else ["dense", "sliced"]
    else:
        layouts = ["dense" if "dense" in case else "sliced"]
    rel = lambda a, b: float((a - b).norm() / b.norm())
    res = {}
    refs = {lay: run(SDPBackend.FLASH_ATTENTION, lay) for lay in set(layouts)}
    for i, lay in enumerate(layouts):
        grads = run(SDPBackend.CUDNN_ATTENTION, lay)
        res[f"call{i}_{lay}_grad_rel_err_vs_flash"] = [round(rel(a, b), 5) for a, b in zip(grads, refs[lay])]
    return res


def _model(case: str) -> dict:
    import torch
    from peft import LoraConfig
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fluxlab import models

    model = models.build_transformer("flux1-dev", "cuda", torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if case == "model_fluxlab_cudnn":
        from fluxlab import attention

        attention.install(model, backend="cudnn")
    log = []
    trace = open(os.path.join(os.environ.get("PROBE_OUT", "."), f"{case}.strides.log"), "w")

    def hook(grad):
        log.append(list(grad.stride()))
        trace.write(f"{list(grad.stride())}\n")
        trace.flush()

    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):  # records the layout of the grad_out each SDPA backward receives
        out = orig(*a, **kw)
        if out.requires_grad:
            out.register_hook(hook)
        return out

    torch.nn.functional.scaled_dot_product_attention = spy
    B, S_img, S_txt = 1, 4096, 512
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(B, S_img, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.randn(B, S_txt, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    pooled = torch.randn(B, 768, device="cuda", dtype=torch.bfloat16, generator=g)
    img_ids = torch.zeros(S_img, 3, device="cuda")
    img_ids[:, 1] = torch.arange(64, device="cuda").repeat_interleave(64)
    img_ids[:, 2] = torch.arange(64, device="cuda").repeat(64)
    txt_ids = torch.zeros(S_txt, 3, device="cuda")
    t = torch.full((B,), 0.5, device="cuda")
    guid = torch.full((B,), 3.5, device="cuda")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.autocast("cuda", torch.bfloat16):
        out = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                    img_ids=img_ids, txt_ids=txt_ids, guidance=guid, return_dict=False)[0]
        loss = out.float().pow(2).mean()
    loss.backward()
    torch.cuda.synchronize()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    strides = sorted({tuple(s) for s in log})
    return {"loss": float(loss), "lora_grads_finite": all(bool(torch.isfinite(g).all()) for g in grads),
            "n_lora_grads": len(grads), "grad_out_strides_seen": [list(s) for s in strides]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", default=None)
    a = ap.parse_args()
    if a.case:  # child process: run one case, print one JSON line
        res = _iso(a.case) if a.case.startswith("iso") else _model(a.case)
        print("RESULT " + json.dumps(res))
        return
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for case in CASES:
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", PROBE_OUT=a.out)
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "benchmarks.cudnn_probe", "--out", a.out, "--case", case], env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           capture_output=True, text=True, timeout=300)
        res = next((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")), None)
        err = "" if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        rows.append({"case": case, "rc": p.returncode, "seconds": round(time.time() - t0, 1), "result": res, "error": err})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(a.out, "cudnn_probe.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
