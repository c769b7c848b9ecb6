"""The tiny pipeline: offline build, byte-identical rebuilds, the stock from_pretrained path."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fluxlab import models
from fluxlab.cli import main


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "seed0"
    assert main(["tiny", "build", str(out), "--seed", "0"]) == 0
    return out


def test_same_seed_gives_identical_bytes(built, tmp_path):
    again = models.build_tiny_pipeline(tmp_path / "again", seed=0)
    assert _digest(built) == _digest(again)
    other = models.build_tiny_pipeline(tmp_path / "other", seed=1)
    assert _digest(other)["transformer/diffusion_pytorch_model.safetensors"] != \
        _digest(built)["transformer/diffusion_pytorch_model.safetensors"]


def test_from_pretrained_generates_an_image(built, monkeypatch):
    from diffusers import FluxPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = FluxPipeline.from_pretrained(built, local_files_only=True)
    out = pipe("a large red circle at the top left", height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), max_sequence_length=32, output_type="pt").images
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all() and out.std() > 0


def test_tiny_keeps_flux_layout(built):
    t = json.loads((built / "transformer" / "config.json").read_text())
    assert t["in_channels"] == 64 and t["guidance_embeds"] is True          # 16 latent channels × 2×2 packing
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"] and len(t["axes_dims_rope"]) == 3
    v = json.loads((built / "vae" / "config.json").read_text())
    assert v["latent_channels"] == 16
    assert (v["shift_factor"], v["scaling_factor"]) == (models.FLUX_VAE_SHIFT, models.FLUX_VAE_SCALE)
    s = json.loads((built / "scheduler" / "scheduler_config.json").read_text())
    assert s["_class_name"] == "FlowMatchEulerDiscreteScheduler" and s["use_dynamic_shifting"] is True


def test_tokenizers_cover_captions(built):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(built / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(built / "tokenizer_2")
    text = "a small blue triangle at the bottom right on a plain background"
    assert clip.unk_token_id not in clip(text).input_ids[1:-1]
    assert t5.unk_token_id not in t5(text).input_ids


@pytest.mark.parametrize("preset,expected", [("flux1-dev", 11.90e9), ("flux1-schnell", 11.85e9)])
def test_real_presets_have_flux_parameter_count(preset, expected):
    # Built on the meta device: the real shapes, no memory. The GPU build uses the same code path.
    model = models.build_transformer(preset, device="meta", dtype=torch.bfloat16)
    n = models.param_count(model)
    assert abs(n - expected) / expected < 0.01, n
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("make_bad,needle", [
    (lambda p: None, "no such directory"),
    (lambda p: p.mkdir(), "no model_index.json"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')),
     "not a FLUX pipeline"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')),
     "missing component folder"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"_class_name": ')), "not valid JSON"),
])
def test_bad_model_path_gets_a_helpful_error(tmp_path, make_bad, needle):
    bad = tmp_path / "model"
    make_bad(bad)
    with pytest.raises(models.ModelLayoutError, match=needle):
        models.load_pipeline(bad, device="cpu")
    assert main(["generate", "--model", str(bad), "--out", str(tmp_path / "x.png")]) == 2


@pytest.mark.parametrize("name", ["flux1-dev-full", "flux1-schnell-full"])
def test_full_preset_has_every_component_at_flux_shape(name):
    """The full preset on the meta device: FLUX's VAE, CLIP-L/14 and T5-XXL at their real sizes, and
    tokenizers whose vocabularies fill the encoders' embedding tables."""
    pipe = models.load_pipeline(name, device="meta", dtype=torch.bfloat16)
    counts = {k: models.param_count(getattr(pipe, k)) for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    expected = {"transformer": 11.90e9 if name == "flux1-dev-full" else 11.85e9,
                "vae": 83.8e6, "text_encoder": 123.1e6, "text_encoder_2": 4.76e9}
    for k, n in expected.items():
        assert abs(counts[k] - n) / n < 0.01, (k, counts[k])
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 49408
    assert len(pipe.tokenizer_2) == pipe.text_encoder_2.config.vocab_size == 32128
    ids = pipe.tokenizer_2("a photo of a cat", padding="max_length", max_length=512).input_ids
    assert len(ids) == 512 and max(ids) < 32128
    assert pipe.vae.config.block_out_channels == [128, 256, 512, 512] or \
        tuple(pipe.vae.config.block_out_channels) == (128, 256, 512, 512)
    alone = models.load_pipeline(name, device="meta", dtype=torch.bfloat16, transformer=False)
    assert alone.transformer is None and alone.text_encoder_2 is not None


def test_tiny_transformer_loads_alone_as_in_the_pipeline(home):
    whole = models.load_pipeline("tiny", "cpu", torch.float32)
    alone = models.load_transformer("tiny", "cpu", torch.float32)
    a, b = whole.transformer.state_dict(), alone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    parts = models.load_pipeline("tiny", "cpu", torch.float32, transformer=False, encoders=False)
    assert (parts.transformer, parts.vae, parts.text_encoder, parts.text_encoder_2) == (None,) * 4
    assert parts.tokenizer is not None and parts.scheduler is not None


def test_model_build_saves_a_loadable_pipeline_and_refuses_a_foreign_folder(home, tmp_path, monkeypatch, capsys):
    """`fluxlab model build` writes with save_pretrained what `from_pretrained` loads back; a folder
    that holds something else is refused in one line and left as it was. (The real-shape build is
    swapped for the tiny pipeline here: 33 GB do not fit this machine.)"""
    from diffusers import FluxPipeline

    tiny = models.load_pipeline("tiny", "cpu", torch.float32)
    calls = []
    monkeypatch.setattr(models, "build_pipeline", lambda preset, device, dtype=None, seed=0: calls.append(preset) or tiny)
    out = tmp_path / "full"
    assert main(["model", "build", str(out), "--preset", "flux1-dev-full", "--device", "cpu"]) == 0
    assert calls == ["flux1-dev-full"]
    back = FluxPipeline.from_pretrained(out, local_files_only=True)
    assert models.param_count(back.transformer) == models.param_count(tiny.transformer)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["model", "build", str(foreign), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a pipeline folder" in err[0]
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
