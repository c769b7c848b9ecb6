"""Weight quantization through bitsandbytes (NF4 / int8), one implementation for training and
inference alike: diffusers' `BitsAndBytesConfig` for checkpoints loaded with `from_pretrained`,
and the same settings applied layer by layer to the random-weight presets.
"""

from __future__ import annotations

import torch

QUANT_MODES = ("none", "nf4", "int8")


def bnb_config(mode: str, compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers' BitsAndBytesConfig for 'nf4' (4-bit NormalFloat, double-quant) or 'int8'."""
    from diffusers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantize must be one of {QUANT_MODES[1:]} here, got {mode!r}")


def require_bnb(device: torch.device):
    """The bitsandbytes module, or a clear error when the device is not CUDA or the package is missing."""
    if device.type != "cuda":
        raise ValueError("quantize='nf4'/'int8' needs a CUDA device (bitsandbytes kernels); "
                         "set quantize='none' on the CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("quantize='nf4'/'int8' needs bitsandbytes: pip install 'fluxlab[quant]'") from e
    return bnb


def quantize_transformer(transformer: torch.nn.Module, mode: str, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every nn.Linear inside the transformer blocks for a bitsandbytes NF4/int8 layer, in place.

    For local checkpoints InferenceSession loads through `from_pretrained(quantization_config=
    BitsAndBytesConfig(...))`; the random-weight presets have no checkpoint, so this applies the
    same config's settings to the layers directly. The blocks hold >99% of the parameters; the
    embedders and final projection stay in `compute_dtype`, as diffusers' quantizer leaves them
    sensitive-layer-wise too. Returns the number of layers replaced.
    """
    device = next(transformer.parameters()).device
    bnb = require_bnb(device)
    cfg = bnb_config(mode, compute_dtype)
    replaced = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                has_bias = child.bias is not None
                # Weights go through the CPU: older bitsandbytes only quantizes on a CPU->CUDA move.
                w = child.weight.data.to("cpu")
                if mode == "nf4":
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                            compute_dtype=cfg.bnb_4bit_compute_dtype, quant_type="nf4",
                                            compress_statistics=cfg.bnb_4bit_use_double_quant, device="meta")
                    new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                                   compress_statistics=cfg.bnb_4bit_use_double_quant, module=new)
                else:
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                              has_fp16_weights=False, threshold=cfg.llm_int8_threshold,
                                              device="meta")
                    new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                new.weight = new.weight.to(device)  # quantizes
                if has_bias:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, new)
                replaced += 1
    return replaced
