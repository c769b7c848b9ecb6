"""Model presets and loading.

* ``tiny``: a complete FluxPipeline with seeded random weights, built offline and saved with
  ``save_pretrained``. Every caller then loads it back through ``FluxPipeline.from_pretrained``,
  the same code path a user with real FLUX weights takes.
* ``flux1-dev`` / ``flux1-schnell``: the real FLUX.1 shapes with random bf16 weights, built
  directly on the target device (nothing is allocated on the CPU first). Speed and memory do
  not depend on weight values, so these stand in for the real checkpoints in GPU benchmarks.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from fluxlab import flux2
from fluxlab._pipeline_io import _corpus, _default_dtype, _save_atomic, built_once  # noqa: F401  (also models.*)
from fluxlab.errors import UserError
from fluxlab.env import default_device, default_dtype  # noqa: F401  (models.default_* stay importable)

# FLUX's autoencoder latent layout: 16 channels, (x - shift) * scale before the transformer.
FLUX_VAE_SHIFT = 0.1159
FLUX_VAE_SCALE = 0.3611

FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# Tiny keeps what matters to the code paths: 16 latent channels packed 2x2 (in_channels 64),
# 3-axis RoPE whose dims sum to the head dim, guidance embedding, both block kinds.
TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
    guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
PRESETS = {
    "tiny": TINY_TRANSFORMER,
    "flux1-dev": FLUX1_DEV_TRANSFORMER,
    "flux1-schnell": {**FLUX1_DEV_TRANSFORMER, "guidance_embeds": False},
}
# The whole pipeline at real shape: VAE, CLIP-L/14, T5-XXL and tokenizers with the real vocab
# sizes, random weights, built on the device. `flux1-dev` alone means the same pipeline, except
# that benchmarks without data build its transformer only.
FULL_PRESETS = {"flux1-dev-full": "flux1-dev", "flux1-schnell-full": "flux1-schnell"}
REAL_PRESETS = ("flux1-dev", "flux1-schnell", *FULL_PRESETS)


def base_preset(name: str) -> str:
    """The transformer preset behind a model name (`flux1-dev-full` -> `flux1-dev`)."""
    return FULL_PRESETS.get(name, name)

# FlowMatchEulerDiscreteScheduler as FLUX.1-dev ships it (schnell: no dynamic shift, shift 1).
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64,
    scaling_factor=FLUX_VAE_SCALE, shift_factor=FLUX_VAE_SHIFT,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
FLUX_VAE = dict(TINY_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32, sample_size=1024)

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
FLUX_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768, vocab_size=49408)
FLUX_T5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
               is_gated_act=True)

T5_MAX_LENGTH = 512
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# FLUX.2 [klein]: one text encoder (Qwen3), its own VAE and transformer classes.
FLUX2_KLEIN_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FLUX2_NAMES = ("tiny-flux2", *flux2.FLUX2_PRESETS)


class ModelLayoutError(FileNotFoundError):
    """The path does not hold a diffusers FLUX pipeline layout."""




# --- transformers at real or tiny shape ------------------------------------------------------
def build_transformer(preset: str = "tiny", device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, seed: int = 0):
    """A FluxTransformer2DModel of a preset's shape with seeded random weights.

    Parameters are created directly on `device` in `dtype` (torch's device and default-dtype
    context managers), so an 11.9 B model never touches host memory.
    """
    from diffusers import FluxTransformer2DModel

    preset = base_preset(preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    dtype = dtype or default_dtype(device)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = FluxTransformer2DModel(**PRESETS[preset])
    return model.eval()


def compile_blocks(transformer: torch.nn.Module, **compile_kwargs) -> int:
    """Regional compile: `torch.compile` each transformer block in place; returns how many.

    Same as diffusers' `compile_repeated_blocks`, except that it finds blocks by position, not by
    class name: fluxlab.kernels.patch swaps FluxTransformerBlock's class for a fused subclass,
    which `compile_repeated_blocks` (matching `_repeated_blocks` names) would silently skip.
    """
    n = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            block.compile(**compile_kwargs)
            n += 1
    return n


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- offline tokenizers -----------------------------------------------------------------------
def full_corpus(lines: int = 200_000, seed: int = 0) -> list[str]:
    """The caption corpus plus seeded pseudo-words: enough distinct text for vocabularies of the
    real sizes (49408 BPE entries, 32128 unigram pieces), which the captions alone cannot fill."""
    import random

    rng = random.Random(seed)
    cons, vow = "bcdfghjklmnprstvwz", "aeiouy"

    def word() -> str:
        return "".join(rng.choice(cons) + rng.choice(vow) + (rng.choice(cons) if rng.random() < 0.4 else "")
                       for _ in range(rng.randint(1, 4)))

    return _corpus() + [" ".join(word() for _ in range(rng.randint(4, 16))) for _ in range(lines)]


def train_tokenizers(vocab_clip: int = 512, vocab_t5: int = 256, corpus: list[str] | None = None):
    """Train a CLIP-style BPE and a T5-style unigram tokenizer on the shipped caption corpus
    (or `corpus`).

    `tokenizers` training is not bit-reproducible (hash-map order, parallel float sums), so this
    ran once (`python -m fluxlab.models retrain-tokenizers`) and its output ships in
    assets/tokenizers/; builds copy those files, which keeps two builds byte-identical.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer, T5TokenizerFast

    corpus = corpus or _corpus()
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # Split on whitespace first so merges never carry a space marker, as CLIP's own vocab.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_clip, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe_model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in bpe_model["merges"]]
    clip_tok = CLIPTokenizer(vocab=bpe_model["vocab"], merges=merges, model_max_length=77)

    uni = Tokenizer(models.Unigram())
    uni.normalizer = normalizers.NFKC()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=vocab_t5, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    pieces = [tuple(p) for p in json.loads(uni.to_str())["model"]["vocab"]]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    return clip_tok, t5_tok


TOKENIZER_ASSETS = "assets/tokenizers"


def load_tokenizers(full: bool = False):
    """The shipped, pre-trained tokenizers (see train_tokenizers): tiny ones, or with `full` ones
    with the real vocab sizes (CLIP 49408, T5 32128) for the real-shape presets."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = Path(str(resources.files("fluxlab").joinpath(TOKENIZER_ASSETS)))
    suffix = "-full" if full else ""
    return CLIPTokenizer.from_pretrained(root / f"clip{suffix}"), T5TokenizerFast.from_pretrained(root / f"t5{suffix}")


def retrain_tokenizers(full: bool = False) -> Path:
    """Train the tokenizers again and write them over the shipped assets (a maintainer's step)."""
    root = Path(__file__).resolve().parent / TOKENIZER_ASSETS
    if full:
        toks = train_tokenizers(FLUX_CLIP["vocab_size"], FLUX_T5["vocab_size"], full_corpus())
    else:
        toks = train_tokenizers()
    for tok, name in zip(toks, ("clip", "t5")):
        tok.save_pretrained(root / (name + ("-full" if full else "")))
    return root


# --- whole pipelines ---------------------------------------------------------------------------
def _text_encoders(clip_cfg: dict, t5_cfg: dict, clip_vocab: int, t5_vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(**{"vocab_size": clip_vocab, **clip_cfg},
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(**{"vocab_size": t5_vocab, **t5_cfg}, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    return clip.eval(), t5.eval()


def build_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny FluxPipeline with seeded weights and save it to `path` (atomically).

    Deterministic: the same seed gives byte-identical files.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    path = Path(path)
    clip_tok, t5_tok = load_tokenizers()
    torch.manual_seed(seed)
    with _default_dtype(torch.float32):
        transformer = build_transformer("tiny", "cpu", torch.float32, seed=seed)
        vae = AutoencoderKL(**TINY_VAE).eval()
        clip, t5 = _text_encoders(TINY_CLIP, TINY_T5, len(clip_tok), len(t5_tok))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae,
                        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=transformer)
    return _save_atomic(pipe, path)


def tiny_pipeline_path(seed: int = 0) -> Path:
    """Where the tiny preset lives: built once, then always loaded from disk."""
    return built_once(f"tiny-seed{seed}", lambda path: build_tiny_pipeline(path, seed=seed))


def family_of(path_or_preset: str | os.PathLike) -> str:
    """"flux2" for a FLUX.2 preset or a Flux2KleinPipeline folder, else "flux1"."""
    name = str(path_or_preset)
    if name in FLUX2_NAMES:
        return "flux2"
    index = Path(name) / "model_index.json"
    try:
        cls = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    except (OSError, json.JSONDecodeError):
        cls = ""
    return "flux2" if cls == "Flux2KleinPipeline" else "flux1"


def family_of_pipeline(pipe) -> str:
    return "flux2" if type(pipe).__name__ == "Flux2KleinPipeline" else "flux1"


def check_flux_layout(path: str | os.PathLike) -> Path:
    """Raise ModelLayoutError naming what is missing when `path` is not a diffusers FLUX pipeline."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLayoutError(f"{path}: no such directory. Pass a preset ({', '.join(PRESETS)}) "
                               f"or a folder saved with FluxPipeline.save_pretrained.")
    index = path / "model_index.json"
    if not index.exists():
        raise ModelLayoutError(f"{path}: no model_index.json, so this is not a diffusers pipeline folder. "
                               f"Point at the folder that holds model_index.json (e.g. a FLUX.1-dev snapshot).")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except json.JSONDecodeError as e:
        raise ModelLayoutError(f"{index}: not valid JSON ({e}); re-download or rebuild the pipeline.") from e
    if "Flux" not in cls:
        raise ModelLayoutError(f"{index}: pipeline class is {cls!r}, not a FLUX pipeline.")
    parts = FLUX2_KLEIN_PARTS if cls == "Flux2KleinPipeline" else PIPELINE_PARTS
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise ModelLayoutError(f"{path}: missing component folder(s) {', '.join(missing)}; "
                               f"a {cls} needs {', '.join(parts)}.")
    return path


def build_pipeline(preset: str, device: str | torch.device, dtype: torch.dtype | None = None, seed: int = 0,
                   *, transformer: bool = True, encoders: bool = True):
    """A real-shape FluxPipeline with random weights built on `device`: the transformer, FLUX's
    AutoencoderKL, CLIP-L/14 and T5-XXL, and tokenizers with the real vocab sizes.

    `transformer=False` / `encoders=False` leave those parts out (None): the trainer fills its
    caches with the encoders first, frees them, and only then builds the transformer.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    preset = base_preset(preset)
    dtype = dtype or default_dtype(device)
    clip_tok, t5_tok = load_tokenizers(full=True)
    tr = build_transformer(preset, device, dtype, seed=seed) if transformer else None
    vae = clip = t5 = None
    if encoders:
        torch.manual_seed(seed + 1)  # the encoders' weights do not depend on whether the transformer was built
        with torch.device(device), _default_dtype(dtype):
            vae = AutoencoderKL(**FLUX_VAE).eval()
            clip, t5 = _text_encoders(FLUX_CLIP, FLUX_T5, FLUX_CLIP["vocab_size"], FLUX_T5["vocab_size"])
    sched = FLUX_SCHNELL_SCHEDULER if preset == "flux1-schnell" else FLUX_DEV_SCHEDULER
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**sched), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=tr)


def load_pipeline(path_or_preset: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, seed: int = 0, *, transformer: bool = True,
                  encoders: bool = True):
    """Load a FluxPipeline: `tiny` (built offline once), a real-shape preset, or a local folder.

    Folders load with `FluxPipeline.from_pretrained(..., local_files_only=True)`, the same call a
    user with real weights makes. `transformer=False` / `encoders=False`: those parts are not
    loaded at all (None in the pipeline); load the transformer later with `load_transformer`.
    """
    from diffusers import FluxPipeline

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    name = str(path_or_preset)
    if name in REAL_PRESETS:
        return build_pipeline(name, device, dtype, seed=seed, transformer=transformer, encoders=encoders)
    if name in flux2.FLUX2_PRESETS:
        if encoders:
            raise UserError(f"model {name}: the real-shape FLUX.2 presets build the transformer alone (random "
                            f"batches); to train on images, pass a Flux2KleinPipeline folder or tiny-flux2")
        return flux2.preset_pipeline(name, device, dtype, seed, transformer=transformer)
    path = _pipeline_path(name, seed)
    is_flux2 = family_of(path) == "flux2"
    encoder_parts = ("vae", "text_encoder") if is_flux2 else ("vae", "text_encoder", "text_encoder_2")
    skip = {k: None for k, keep in (("transformer", transformer), *((e, encoders) for e in encoder_parts)) if not keep}
    if is_flux2:
        from diffusers import Flux2KleinPipeline as cls
    else:
        cls = FluxPipeline
    pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True, **skip)
    return pipe.to(device)


def _pipeline_path(name: str, seed: int) -> Path:
    """The folder behind a model name: a tiny preset (built once) or a checked pipeline folder."""
    if name == "tiny":
        return tiny_pipeline_path(seed)
    if name == "tiny-flux2":
        return flux2.tiny_flux2_pipeline_path(seed)
    return check_flux_layout(name)


def load_transformer(path_or_preset: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, seed: int = 0):
    """The transformer alone, as `load_pipeline` would load it: built at a preset's shape, or read
    from a pipeline folder's `transformer/` with `from_pretrained`."""
    from diffusers import FluxTransformer2DModel

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    name = str(path_or_preset)
    if name in REAL_PRESETS:
        return build_transformer(name, device, dtype, seed=seed)
    if name in flux2.FLUX2_PRESETS:
        return flux2.build_flux2_transformer(name, device, dtype, seed)
    path = _pipeline_path(name, seed)
    if family_of(path) == "flux2":
        from diffusers import Flux2Transformer2DModel as cls
    else:
        cls = FluxTransformer2DModel
    tr = cls.from_pretrained(path, subfolder="transformer", dtype=dtype, local_files_only=True)
    return tr.to(device).eval()


def save_pipeline(preset: str, path: str | os.PathLike, device: str | torch.device, dtype: torch.dtype | None = None,
                  seed: int = 0) -> Path:
    """Build a real-shape preset on `device` and save it with `save_pretrained` (atomically), so
    that it loads as a user's FLUX folder does (`fluxlab model build`)."""
    path = Path(path)
    return _save_atomic(build_pipeline(preset, device, dtype, seed=seed), path)


if __name__ == "__main__":  # python -m fluxlab.models retrain-tokenizers [--full]
    import sys

    if sys.argv[1:2] != ["retrain-tokenizers"] or sys.argv[2:] not in ([], ["--full"]):
        sys.exit("usage: python -m fluxlab.models retrain-tokenizers [--full]")
    print(f"tokenizers written under {retrain_tokenizers(full=sys.argv[2:] == ['--full'])}")
