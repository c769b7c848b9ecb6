"""The tiny FLUX.2 [klein] pipeline: offline build, byte-identical rebuilds, the stock
Flux2KleinPipeline.from_pretrained path, its Qwen tokenizer and chat template."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fluxlab import flux2, models
from fluxlab.cli import main

WEIGHTS = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_flux2") / "seed0"
    assert main(["tiny", "build", str(out), "--family", "flux2-klein", "--seed", "0"]) == 0
    return out


def _generate(pipe, prompt: str) -> torch.Tensor:
    return pipe(prompt=prompt, height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_same_seed_gives_identical_bytes(built, home, tmp_path):
    # The cached path under $FLUXLAB_HOME and the CLI build are two code paths to the same bytes.
    cached = flux2.tiny_flux2_pipeline_path(0)
    assert cached.parent == home
    assert _digest(cached) == _digest(built) and WEIGHTS[0] in _digest(built)
    other = _digest(flux2.build_tiny_flux2_pipeline(tmp_path / "other", seed=1))
    ref = _digest(built)
    assert {k for k in ref if ref[k] != other[k]} == set(WEIGHTS)


def test_from_pretrained_generates_an_image(built, monkeypatch):
    from diffusers import Flux2KleinPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = Flux2KleinPipeline.from_pretrained(built, local_files_only=True)
    out = _generate(pipe, "a large red circle at the top left")
    assert pipe.do_classifier_free_guidance  # base klein at the default guidance 4: the true-CFG branch ran
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all() and out.std() > 0
    # The prompt reaches the image: Qwen3 hidden states -> context embedder -> joint attention.
    assert not torch.equal(out, _generate(pipe, "a small blue square at the bottom right"))


def test_tiny_keeps_klein_layout(built):
    """The shapes that tie the parts together are those of FLUX.2 [klein]."""
    t = json.loads((built / "transformer" / "config.json").read_text())
    v = json.loads((built / "vae" / "config.json").read_text())
    q = json.loads((built / "text_encoder" / "config.json").read_text())
    assert t["in_channels"] == v["latent_channels"] * v["patch_size"][0] * v["patch_size"][1]  # 2x2 patchify
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"] and len(t["axes_dims_rope"]) == 4  # (t, h, w, l)
    assert t["joint_attention_dim"] == len(flux2.KLEIN_TEXT_LAYERS) * q["hidden_size"]
    assert q["num_hidden_layers"] > max(flux2.KLEIN_TEXT_LAYERS)  # the last layer read is not the final norm
    assert q["vocab_size"] == len(flux2.load_tokenizer())
    s = json.loads((built / "scheduler" / "scheduler_config.json").read_text())
    assert s["_class_name"] == "FlowMatchEulerDiscreteScheduler" and s["use_dynamic_shifting"] is True
    index = json.loads((built / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and t["guidance_embeds"] is False


def test_latents_are_denormalised_with_the_vae_statistics(built):
    """The pipeline maps latents through the VAE's BatchNorm running stats; the tiny build seeds
    them away from (0, 1), so dropping or inverting that step changes the decoded image."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(built, local_files_only=True)
    bn = pipe.vae.bn
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    seeded = _generate(pipe, "a red circle")
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    assert not torch.allclose(seeded, _generate(pipe, "a red circle"), atol=1e-4)


def test_tokenizer_covers_captions_and_applies_the_chat_template(built):
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast.from_pretrained(built / "tokenizer")
    captions = models._corpus()
    ids = [tok(c).input_ids for c in captions]
    # Byte-level BPE: every caption round-trips exactly, within the encoder's vocabulary, and the
    # learned merges compress it (fewer tokens than characters by far).
    assert all(tok.decode(i) == c for i, c in zip(ids, captions))
    assert max(max(i) for i in ids) < len(tok) and tok.unk_token_id not in {x for i in ids for x in i}
    assert sum(map(len, ids)) < 0.5 * sum(map(len, captions))

    text = tok.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    enc = tok(text, padding="max_length", truncation=True, max_length=32)
    n = sum(enc.attention_mask)
    for special, count in (("<|im_start|>", 2), ("<|im_end|>", 1), ("<think>", 1), ("</think>", 1)):
        assert enc.input_ids[:n].count(tok.convert_tokens_to_ids(special)) == count, special  # one id each
    assert tok.pad_token == "<|endoftext|>" and set(enc.input_ids[n:]) == {tok.pad_token_id} and n < 32


def test_retrained_tokenizer_keeps_the_shipped_layout():
    """`python -m fluxlab.flux2 retrain-tokenizer` gives a drop-in replacement: same size, same
    special-token ids, same chat template (merges may differ: training is not bit-reproducible)."""
    shipped, fresh = flux2.load_tokenizer(), flux2.train_tokenizer()
    assert len(fresh) == len(shipped)
    assert fresh.added_tokens_decoder.keys() == shipped.added_tokens_decoder.keys()
    assert all(str(fresh.added_tokens_decoder[i]) == str(shipped.added_tokens_decoder[i])
               for i in shipped.added_tokens_decoder)
    assert (fresh.pad_token, fresh.eos_token) == (shipped.pad_token, shipped.eos_token)
    assert fresh.chat_template == shipped.chat_template


def test_cli_refuses_an_unknown_family(tmp_path, capsys):
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as e:
        main(["tiny", "build", str(out), "--family", "flux3"])
    assert e.value.code == 2
    assert "invalid choice: 'flux3'" in capsys.readouterr().err
    assert not out.exists()
