"""Fused q/k/v projections (fluxlab.fusion): the same outputs and LoRA gradients as peft's modules
one by one, no extra memory for the base weights, and peft's own path wherever fused math would
differ (adapters disabled, LoRA dropout)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

from fluxlab import attention, models
from fluxlab.fusion import LinearGroup, fuse_projections

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]


def _model(dropout: float = 0.0, targets=TARGETS):
    tr = models.build_transformer("tiny", "cpu", torch.float64, seed=0)
    tr.requires_grad_(False)
    torch.manual_seed(0)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights="gaussian",
                              target_modules=targets))
    for n, p in tr.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: give it values, or the LoRA term would be 0 either way
            p.data.normal_(0, 0.3)
    attention.install(tr, "math")
    return tr


def _inputs(tr, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = tr.config
    x = torch.randn(2, 16, c.in_channels, generator=g, dtype=torch.float64)               # [B, S_img, 64]
    ctx = torch.randn(2, 8, c.joint_attention_dim, generator=g, dtype=torch.float64)      # [B, S_txt, D]
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g, dtype=torch.float64)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"),
                          -1).reshape(16, 3).double()
    return dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                timestep=torch.tensor([0.3, 0.7], dtype=torch.float64), img_ids=img_ids,
                txt_ids=torch.zeros(8, 3, dtype=torch.float64), guidance=torch.tensor([3.5, 3.5], dtype=torch.float64),
                return_dict=False)


def _out_and_grads(tr, inputs):
    for p in tr.parameters():
        p.grad = None
    out = tr(**inputs)[0]                                                                   # [B, S_img, 64]
    (out ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad}


def test_fused_groups_match_peft_module_by_module_in_value_and_gradient():
    plain = _model()
    fused = copy.deepcopy(plain)
    before = {n: p.shape for n, p in fused.named_parameters()}
    keys = set(fused.state_dict())
    n = fuse_projections(fused)
    c = plain.config
    assert n == c.num_layers * 2 + c.num_single_layers                 # q/k/v everywhere, add_q/k/v in double blocks
    assert {n: p.shape for n, p in fused.named_parameters()} == before and set(fused.state_dict()) == keys
    inputs = _inputs(plain)
    out_p, grads_p = _out_and_grads(plain, inputs)
    out_f, grads_f = _out_and_grads(fused, inputs)
    torch.testing.assert_close(out_f, out_p, rtol=1e-10, atol=1e-10)
    assert grads_f.keys() == grads_p.keys() and any(g.abs().sum() > 0 for g in grads_p.values())
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-9, atol=1e-10, msg=name)


def test_base_weights_become_views_of_the_fused_tensor():
    tr = _model()
    fuse_projections(tr)
    attn = tr.transformer_blocks[0].attn
    group = attn.fl_qkv
    start, nbytes = group.weight.data_ptr(), group.weight.numel() * group.weight.element_size()
    for m in (attn.to_q, attn.to_k, attn.to_v):
        w = m.base_layer.weight
        assert start <= w.data_ptr() < start + nbytes and w.untyped_storage().data_ptr() == \
            group.weight.untyped_storage().data_ptr()
    # A write through one view shows in the fused GEMM: there is one copy of the weights.
    attn.to_k.base_layer.weight.data.zero_()
    d = attn.to_q.base_layer.out_features
    assert group.weight[d:2 * d].abs().sum() == 0


@pytest.mark.parametrize("case", ["disabled", "dropout"])
def test_where_fused_math_would_differ_the_group_calls_peft(case):
    plain = _model(dropout=0.2 if case == "dropout" else 0.0)
    fused = copy.deepcopy(plain)
    fuse_projections(fused)
    inputs = _inputs(plain)
    if case == "disabled":
        plain.disable_adapters(), fused.disable_adapters()
    torch.manual_seed(3)
    out_p = plain(**inputs)[0]
    torch.manual_seed(3)
    out_f = fused(**inputs)[0]
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=0)


def test_only_frozen_linear_bases_are_fused():
    lin = [torch.nn.Linear(8, 8) for _ in range(3)]
    with pytest.raises(ValueError, match="frozen"):
        LinearGroup(lin)


def test_the_trainer_with_fused_projections_trains_the_same_lora(shapes, tmp_path, home):
    """fuse_projections=true: the same losses step by step as the unfused trainer (fp32: the same
    math in another summation order) and the same adapter file layout."""
    from safetensors.torch import load_file

    from fluxlab.trainer import Trainer
    from conftest import tiny_lora_config

    runs = {}
    for fused in (False, True):
        t = Trainer(tiny_lora_config(shapes, tmp_path / str(fused), fuse_projections=fused))
        res = t.setup().train()
        t.close()
        groups = sum(hasattr(m, "fl_qkv") for m in t.transformer.modules())
        runs[fused] = (res.losses, load_file(res.lora_path), groups)
    (loss_p, lora_p, g_p), (loss_f, lora_f, g_f) = runs[False], runs[True]
    assert g_p == 0 and g_f > 0
    assert lora_f.keys() == lora_p.keys()
    assert loss_f == pytest.approx(loss_p, rel=1e-5, abs=1e-6)
    for k in lora_p:
        torch.testing.assert_close(lora_f[k], lora_p[k], rtol=1e-4, atol=1e-5, msg=k)
