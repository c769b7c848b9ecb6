"""FLUX.2 [klein]: the tiny offline pipeline.

Like the tiny FLUX.1 pipeline in fluxlab.models: a complete Flux2KleinPipeline with seeded random
weights, built offline and saved with ``save_pretrained``, so callers load it back through
``Flux2KleinPipeline.from_pretrained`` exactly as a user with the real klein weights does.

What FLUX.2 [klein] changes from FLUX.1, and the tiny configs keep:
* one text encoder, Qwen3 (a causal LM); the prompt goes through its chat template and the hidden
  states of layers 9, 18 and 27 are stacked per token, so joint_attention_dim = 3 x its hidden size;
* a 32-channel autoencoder whose latents are patchified 2x2 (128 channels per token) and
  normalised with per-channel statistics kept in the VAE's BatchNorm buffers;
* 4-axis RoPE ids (t, h, w, l) and no guidance embedding.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from fluxlab._pipeline_io import _corpus, _default_dtype, _save_atomic, built_once

# Hidden states the klein pipeline stacks (Flux2KleinPipeline's text_encoder_out_layers default).
KLEIN_TEXT_LAYERS = (9, 18, 27)

TINY_QWEN3 = dict(
    hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    # 28 layers: hidden_states[27] is read, and stays an intermediate state (not the last, normed one).
    num_hidden_layers=28, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)
# Tiny keeps what matters to the code paths: 32 latent channels patchified 2x2 (in_channels 128),
# 4-axis RoPE whose dims sum to the head dim, both block kinds, no guidance embedding (klein has
# none: the distilled variant bakes guidance in, the base variant uses true CFG), and the context
# width of three stacked Qwen3 hidden states.
TINY_FLUX2_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=len(KLEIN_TEXT_LAYERS) * TINY_QWEN3["hidden_size"],
    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
)
# AutoencoderKLFlux2: 8x downsampling (4 levels), 32 latent channels, quant convs as FLUX.2 has them.
TINY_FLUX2_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
    batch_norm_eps=1e-4, patch_size=(2, 2),
)
# FlowMatchEulerDiscreteScheduler as FLUX.2 ships it. The klein pipeline always passes its own
# `mu` (compute_empirical_mu), which the scheduler only applies with dynamic shifting on.
FLUX2_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_THINK = ("<think>", "</think>")  # plain added tokens, as in Qwen3's vocabulary
# The subset of Qwen3's chat template the klein pipeline exercises: role turns, the generation
# prompt, and the empty think block that `enable_thinking=False` asks for.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
QWEN_TOKENIZER_ASSET = "assets/tokenizers/qwen"


# --- offline tokenizer -------------------------------------------------------------------------
def train_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """Train a Qwen2-style byte-level BPE (Qwen's split regex, NFC) on the shipped caption corpus.

    Not bit-reproducible (see models.train_tokenizers), so it ran once
    (`python -m fluxlab.flux2 retrain-tokenizer`) and its output ships in assets/tokenizers/qwen/.
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    # An empty Qwen2 tokenizer carries Qwen's normaliser and pre-tokeniser; train its backend on
    # the byte alphabet plus merges, then append the special tokens after the merged vocabulary,
    # where Qwen keeps them.
    specials = len(QWEN_SPECIAL + QWEN_THINK)
    backend = Qwen2TokenizerFast(vocab={}, merges=[]).backend_tokenizer
    backend.train_from_iterator(corpus or _corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size - specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tok = Qwen2TokenizerFast(vocab=model["vocab"], merges=merges, unk_token=None,
                             model_max_length=TINY_QWEN3["max_position_embeddings"])
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    tok.add_tokens(list(QWEN_THINK))
    tok.eos_token = "<|im_end|>"  # Qwen3's: the end of a chat turn; <|endoftext|> stays the pad token
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def load_tokenizer():
    """The shipped, pre-trained tiny Qwen tokenizer (see train_tokenizer)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(Path(str(resources.files("fluxlab").joinpath(QWEN_TOKENIZER_ASSET))))


def retrain_tokenizer() -> Path:
    """Train the tokenizer again and write it over the shipped asset (a maintainer's step)."""
    root = Path(__file__).resolve().parent / QWEN_TOKENIZER_ASSET
    train_tokenizer().save_pretrained(root)
    return root


# --- the tiny pipeline ---------------------------------------------------------------------------
def build_tiny_flux2_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny Flux2KleinPipeline with seeded weights (fp32, CPU) and save it to `path`
    (atomically). Deterministic: the same seed gives byte-identical files."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = load_tokenizer()
    torch.manual_seed(seed)
    with _default_dtype(torch.float32):
        transformer = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER).eval()
        vae = AutoencoderKLFlux2(**TINY_FLUX2_VAE).eval()
        # The pipeline maps latents through the BN running stats ((x - mean) / sqrt(var + eps)).
        # Fresh buffers are mean 0 / var 1, which would make a missing or inverted normalisation
        # invisible; seeded stats away from identity keep that path observable.
        n = vae.bn.num_features  # 32 latent channels x 2x2 patch = 128
        vae.bn.running_mean.copy_(0.5 * torch.randn(n))  # [128]
        vae.bn.running_var.copy_(torch.rand(n) * 1.5 + 0.5)  # [128], in [0.5, 2)
        te = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), **TINY_QWEN3, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))).eval()
    # is_distilled=False: the klein *base* variant, the one LoRAs are trained on (true CFG at inference).
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae,
                              text_encoder=te, tokenizer=tok, transformer=transformer, is_distilled=False)
    return _save_atomic(pipe, Path(path))


# --- real-shape transformers (random weights, built on the device) -------------------------------
# Shapes as published for the FLUX.2 releases; diffusers' Flux2Transformer2DModel defaults are
# FLUX.2 [dev]'s. Parameter counts (meta device): klein-4B 3.88 B, klein-9B 9.08 B, dev 32.2 B.
# The context width is three stacked hidden states of the text encoder (Qwen3-4B: 2560, Qwen3-8B:
# 4096, Mistral-3 24B: 5120). klein has no guidance embedding; dev has one.
FLUX2_PRESETS = {
    "flux2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                           guidance_embeds=False),
    "flux2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                           guidance_embeds=False),
    "flux2-dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                      guidance_embeds=True),
}


def build_flux2_transformer(preset: str, device, dtype: torch.dtype, seed: int = 0):
    """A Flux2Transformer2DModel of a real FLUX.2 shape with seeded random weights, created directly
    on `device` in `dtype` (a 32 B model never touches host memory)."""
    from diffusers import Flux2Transformer2DModel

    if preset not in FLUX2_PRESETS:
        raise ValueError(f"unknown FLUX.2 preset {preset!r}; choose one of {sorted(FLUX2_PRESETS)}")
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        return Flux2Transformer2DModel(**FLUX2_PRESETS[preset]).eval()


def preset_pipeline(preset: str, device, dtype: torch.dtype, seed: int = 0, *, transformer: bool = True):
    """A FLUX.2 pipeline object around a real-shape transformer (or none): the scheduler and the
    family for the trainer's random-batch benchmarks. Real-shape text encoders and VAE are not
    built: train on a FLUX.2 folder for the whole pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    tr = build_flux2_transformer(preset, device, dtype, seed) if transformer else None
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=None,
                              text_encoder=None, tokenizer=None, transformer=tr)


def tiny_flux2_pipeline_path(seed: int = 0) -> Path:
    """Where the tiny FLUX.2 [klein] pipeline lives: built once, then always loaded from disk."""
    return built_once(f"tiny-flux2-klein-seed{seed}", lambda path: build_tiny_flux2_pipeline(path, seed=seed))


if __name__ == "__main__":  # python -m fluxlab.flux2 retrain-tokenizer
    import sys

    if sys.argv[1:] != ["retrain-tokenizer"]:
        sys.exit("usage: python -m fluxlab.flux2 retrain-tokenizer")
    print(f"tokenizer written to {retrain_tokenizer()}")
