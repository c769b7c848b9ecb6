"""Projections that read the same input, fused: FLUX attention's q/k/v (and the text stream's
add_q/k/v in double blocks) as one GEMM for the frozen base weights and one pair of skinny GEMMs
for their LoRA adapters, instead of three and six.

    n = fuse_projections(transformer)     # after the adapter is added, before compile

The base weights become views of one [sum(out), in] tensor (the fusion costs no memory), so peft's
modules, their parameters and the saved LoRA are unchanged; `fluxlab.attention`'s processor calls
the group (`attn.fl_qkv`, `attn.fl_added`) where diffusers would call each projection. Whenever the
fused math would differ from peft's (an adapter merged or disabled, several active adapters, LoRA
dropout, a quantized base) the group calls the modules one by one instead.

LoRA math per group, with x [N, in], A_i [r, in], B_i [out_i, r], s_i = alpha_i / r:
    [q | k | v] = x W^T + b + (x [A_q; A_k; A_v]^T) blockdiag(s_q B_q, s_k B_k, s_v B_v)^T
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = {"fl_qkv": ("to_q", "to_k", "to_v"), "fl_added": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _base(m: nn.Module) -> nn.Module:
    return getattr(m, "base_layer", m)


def _lora_adapter(m: nn.Module) -> str | None:
    """The one active adapter whose math the fused path reproduces exactly, else None."""
    if not hasattr(m, "lora_A"):
        return None
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1 or m.merged or m.disable_adapters or getattr(m, "use_dora", {}).get(active[0], False):
        return None
    return active[0] if isinstance(m.lora_dropout[active[0]], nn.Identity) else None


class LinearGroup(nn.Module):
    """Linear layers (plain or peft LoRA) over one input, computed together; see the module doc."""

    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        bases = [_base(m) for m in mods]
        if not all(type(b) is nn.Linear and not b.weight.requires_grad for b in bases):
            raise ValueError("LinearGroup fuses frozen nn.Linear bases only")
        if len({b.in_features for b in bases}) != 1:
            raise ValueError("LinearGroup: the layers must read the same input width")
        weight = torch.cat([b.weight.detach() for b in bases])                       # [sum out, in]
        has_bias = [b.bias is not None for b in bases]
        bias = (torch.cat([b.bias.detach() if b.bias is not None else b.weight.new_zeros(b.out_features)
                           for b in bases]) if any(has_bias) else None)             # [sum out]
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.sizes = [b.out_features for b in bases]
        off = 0
        for b, n in zip(bases, self.sizes):  # the originals become views: no second copy of the weights
            b.weight = nn.Parameter(weight[off:off + n], requires_grad=False)
            if b.bias is not None:
                b.bias = nn.Parameter(bias[off:off + n], requires_grad=False)
            off += n
        object.__setattr__(self, "mods", tuple(mods))  # not submodules: peft and state_dict keep seeing them once

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        adapters = [_lora_adapter(m) for m in self.mods]
        plain = [not hasattr(m, "lora_A") for m in self.mods]
        if not (all(plain) or all(a is not None for a in adapters)):
            return tuple(m(x) for m in self.mods)    # peft's own path where fused math would differ
        out = F.linear(x, self.weight, self.bias)                                    # [..., sum out]
        if not all(plain):
            A = torch.cat([m.lora_A[a].weight for m, a in zip(self.mods, adapters)])     # [sum r, in]
            B = torch.block_diag(*[m.lora_B[a].weight * m.scaling[a] for m, a in zip(self.mods, adapters)])
            xa = F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype), A)  # [..., sum r]
            out = (out + F.linear(xa, B)).to(out.dtype)                              # B: [sum out, sum r]
        return out.split(self.sizes, dim=-1)


def fuse_projections(transformer: nn.Module) -> int:
    """Give every FLUX attention module its fused groups (`fl_qkv`, and `fl_added` in double
    blocks). Call it once the adapter is added and the model is on its device (`.to()` afterwards
    would copy the views apart). Returns the number of groups; a group whose bases are not frozen
    nn.Linear layers (QLoRA) is left unfused."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    n = 0
    for attn in (m for m in transformer.modules() if isinstance(m, FluxAttention)):
        for name, parts in GROUPS.items():
            mods = [getattr(attn, p, None) for p in parts]
            if any(m is None for m in mods) or hasattr(attn, name):
                continue
            if all(type(_base(m)) is nn.Linear and not _base(m).weight.requires_grad for m in mods):
                setattr(attn, name, LinearGroup(mods))
                n += 1
    return n
