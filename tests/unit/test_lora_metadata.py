"""The saved LoRA carries the adapter metadata diffusers writes, so stock
`FluxPipeline.load_lora_weights` rebuilds the trained model at its trained strength."""

import copy
import json
from pathlib import Path

import pytest
import torch

from fluxlab import models
from conftest import tiny_lora_config
from fluxlab.trainer import LORA_FILE, Trainer
from fluxlab.training.state import adapter_digest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(pipe, shapes, tmp_path_factory):
    """A few tiny-preset steps at rank 4 / alpha 8 (LoRA scale 2, not the rank's 1)."""
    out = tmp_path_factory.mktemp("lora_meta")
    cfg = tiny_lora_config(shapes, out)
    tr = Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    result = tr.train()
    assert result.lora_path == out / LORA_FILE
    return tr, out


def _inputs(transformer):
    """Fixed transformer inputs of the tiny preset's shapes."""
    c = transformer.config
    g = torch.Generator().manual_seed(1)
    B, h, w, S = 2, 4, 4, 16
    return dict(hidden_states=torch.randn(B, h * w, c.in_channels, generator=g),       # [B, h*w, 64]
                encoder_hidden_states=torch.randn(B, S, c.joint_attention_dim, generator=g),  # [B, S, D]
                pooled_projections=torch.randn(B, c.pooled_projection_dim, generator=g),   # [B, Dp]
                timestep=torch.tensor([0.3, 0.8]),
                guidance=torch.full((B,), 3.5) if c.guidance_embeds else None,
                img_ids=torch.cat([torch.zeros(h * w, 1), torch.cartesian_prod(
                    torch.arange(h).float(), torch.arange(w).float())], 1),               # [h*w, 3]
                txt_ids=torch.zeros(S, 3), return_dict=False)


def test_lora_file_carries_the_adapter_metadata(trained):
    from safetensors import safe_open

    _, out = trained
    with safe_open(str(out / LORA_FILE), "pt") as f:
        meta = f.metadata()
    # diffusers' layout: one JSON under LORA_ADAPTER_METADATA_KEY, keys prefixed by component.
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["transformer.r"] == 4 and cfg["transformer.lora_alpha"] == 8
    assert set(cfg["transformer.target_modules"]) == set(trained[0].cfg.target_modules)


def test_stock_load_lora_weights_reproduces_the_trained_transformer(trained, home):
    from diffusers import FluxPipeline

    tr, out = trained
    ours = tr.transformer.eval()
    stock = FluxPipeline.from_pretrained(models.tiny_pipeline_path(), local_files_only=True)
    with torch.no_grad():
        base = stock.transformer(**_inputs(stock.transformer))[0]           # [B, 16, 64]
    stock.load_lora_weights(str(out), weight_name=LORA_FILE)
    # The loaded adapter's scale is alpha / r = 2, read from the file (not guessed from the rank).
    scales = {m.scaling["default_0"] for m in stock.transformer.modules() if hasattr(m, "scaling")
              and "default_0" in getattr(m, "scaling", {})}
    assert scales == {2.0}, scales
    with torch.no_grad():
        want = ours(**_inputs(ours))[0]
        got = stock.transformer(**_inputs(stock.transformer))[0]
    effect = (want - base).abs().max().item()
    err = (got - want).abs().max().item()
    # The LoRA moved the output well beyond the tolerance, so loading it at half strength (the
    # rank's alpha) or not at all could not pass.
    assert effect > 1e-3, effect
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), (err, effect)


def test_every_file_the_trainer_wrote_has_one_mode(trained):
    """LoRA, plots, config.yaml, metrics and checkpoint files alike: 0666 minus the umask."""
    import os

    _, out = trained
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {LORA_FILE, "config.yaml", "loss.png"} <= set(modes)
    assert any(k.startswith("checkpoints/") for k in modes)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_summary_hashes_say_what_they_hash(trained):
    import hashlib

    tr, out = trained
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["lora_file_sha256"] == hashlib.sha256((out / LORA_FILE).read_bytes()).hexdigest()
    (params,) = summary["adapter_sha256_per_rank"]
    assert params == adapter_digest(tr.trainable_parameters()) != summary["lora_file_sha256"]
    assert summary["lora_sha256_per_rank"] == [params]  # the former name still reads
