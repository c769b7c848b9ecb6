"""The tiny FLUX transformer and one fixed batch for it, shared by the model-level kernel tests."""

import torch
from kt_helpers import DEVICE

from fluxlab.models import build_transformer


def tiny(dtype=torch.float32, seed=0):
    return build_transformer("tiny", str(DEVICE), dtype, seed)


def batch(dtype=torch.float32, B=1, side=4, S_txt=5, seed=1):
    """img_ids on a side x side latent grid (FLUX's (0, row, col) ids), text ids all zero."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    inputs = dict(hidden_states=torch.randn(B, side * side, 64, generator=g).to(dtype),
                  encoder_hidden_states=torch.randn(B, S_txt, 32, generator=g).to(dtype),
                  pooled_projections=torch.randn(B, 32, generator=g).to(dtype),
                  timestep=torch.full((B,), 0.6, dtype=dtype), guidance=torch.full((B,), 3.5, dtype=dtype),
                  img_ids=img_ids, txt_ids=torch.zeros(S_txt, 3))
    return {**{k: v.to(DEVICE) for k, v in inputs.items()}, "return_dict": False}


def forward_backward(model, inputs):
    """Output and every parameter's gradient for loss = mean(out^2)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
