"""Fused Triton kernels for FLUX, the patch that installs them, and the evidence that they ran.

    report = fluxlab.kernels.patch(transformer)   # swaps processors / norm classes in place
    ... run ...
    fluxlab.kernels.counters()                    # {"qk_norm_rope.fwd": 38, "adaln.bwd": 95, ...}
    fluxlab.kernels.fallbacks()                   # {"rope": ["dtype torch.int8 unsupported ..."]}
    fluxlab.kernels.unpatch(transformer)

FLUXLAB_DISABLE=rope,adaln (or "all") turns named fast paths off at call time; they then run their
plain-PyTorch reference and record "disabled by FLUXLAB_DISABLE".

The family modules import diffusers, so they load lazily: `import fluxlab.kernels` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ._common import (DISABLE_ENV, FAMILIES, counters, disabled, fallbacks, family_totals,  # noqa: F401
                      poisoned_outputs, reset_counters)

__all__ = ["FAMILIES", "PatchReport", "counters", "disabled", "fallbacks", "family_totals", "gradcheck_cases",
           "patch", "reset_counters", "unpatch"]

_UNDO_ATTR = "_fluxlab_kernels_undo"


def family_module(name: str):
    if name not in FAMILIES:
        raise ValueError(f"unknown kernel family {name!r}; choose from {list(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{name}")


@dataclass
class PatchReport:
    """What `patch` swapped (family -> modules/processors) and what it left alone (family -> why)."""

    patched: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FAMILIES})
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = ["fluxlab.kernels.patch:"]
        for f in FAMILIES:
            n = self.patched.get(f, 0)
            why = self.skipped.get(f)
            lines.append(f"  {f:<13} patched {n:>3}" + (f"   skipped: {why}" if why else ""))
        return "\n".join(lines)


def patch(transformer) -> PatchReport:
    """Install the fused ops into a diffusers FluxTransformer2DModel, in place.

    * every FluxAttention whose processor is the stock FluxAttnProcessor gets FusedFluxAttnProcessor
      (qk_norm_rope; standalone rope when qk_norm_rope is off);
    * AdaLayerNormZero / AdaLayerNormZeroSingle / AdaLayerNormContinuous and FluxTransformerBlock
      (its gated residual + norm2 + modulation) become their fused subclasses (adaln). Swapping
      `__class__` keeps parameters, state-dict names, hooks and peft wrappers where they were.
    sparse_delta is an adapter (`sparse_delta.apply_sparse_adapter`), never patched in.
    """
    from . import adaln, qk_norm_rope

    if getattr(transformer, _UNDO_ATTR, None):
        raise RuntimeError("transformer is already patched; call fluxlab.kernels.unpatch(transformer) first")
    off = disabled()
    report = PatchReport()
    undo: list[tuple[str, object, object]] = []
    attn_reasons: dict[str, int] = {}
    adaln_reasons: dict[str, int] = {}

    attn_family = "qk_norm_rope" if "qk_norm_rope" not in off else "rope"
    for _, module in transformer.named_modules():
        if isinstance(module, qk_norm_rope.FluxAttention):
            why = f"disabled by {DISABLE_ENV}" if {"qk_norm_rope", "rope"} <= off else qk_norm_rope.unsupported(module)
            if why:
                attn_reasons[why] = attn_reasons.get(why, 0) + 1
                continue
            undo.append(("processor", module, module.processor))
            # Keep the attention backend fluxlab.attention.install chose (auto when stock).
            module.set_processor(qk_norm_rope.FusedFluxAttnProcessor(getattr(module.processor, "backend", "auto")))
            report.patched[attn_family] += 1
        elif type(module) in adaln.FUSED_CLASSES:
            fused, norms = adaln.FUSED_CLASSES[type(module)]
            why = f"disabled by {DISABLE_ENV}" if "adaln" in off else next(
                (f"{type(module).__name__}.{n}: {r}" for n in norms if (r := adaln.plain_layer_norm(getattr(module, n)))),
                None)
            if why:
                adaln_reasons[why] = adaln_reasons.get(why, 0) + 1
                continue
            undo.append(("class", module, type(module)))
            module.__class__ = fused

    report.patched["adaln"] = sum(1 for kind, *_ in undo if kind == "class")
    _explain(report, "qk_norm_rope" if attn_family == "qk_norm_rope" else "rope", attn_reasons)
    _explain(report, "adaln", adaln_reasons)
    if attn_family == "qk_norm_rope":
        report.skipped.setdefault("rope", "RoPE runs inside qk_norm_rope; the standalone kernel serves the "
                                          "processor only when qk_norm_rope is disabled or falls back")
    else:
        report.skipped["qk_norm_rope"] = f"disabled by {DISABLE_ENV}"
    report.skipped["sparse_delta"] = ("an adapter, not a patch: sparse_delta.apply_sparse_adapter "
                                      "(TrainConfig.adapter='sparse') installs it")
    if report.patched["adaln"]:
        report.skipped.setdefault("adaln", "not fused: the gated residuals after the MLPs and in single "
                                           "blocks (no norm follows them inside the block)")
    setattr(transformer, _UNDO_ATTR, undo)
    return report


def _explain(report: PatchReport, family: str, reasons: dict[str, int]) -> None:
    if reasons:
        report.skipped[family] = "; ".join(f"{n} module(s): {why}" for why, n in reasons.items())


def unpatch(transformer) -> None:
    """Restore exactly the processors and classes `patch` replaced (no-op on an unpatched model)."""
    for kind, module, original in reversed(getattr(transformer, _UNDO_ATTR, None) or []):
        if kind == "processor":
            module.set_processor(original)
        else:
            module.__class__ = original
    if hasattr(transformer, _UNDO_ATTR):
        delattr(transformer, _UNDO_ATTR)


def gradcheck_cases() -> list[tuple[str, Callable, tuple]]:
    """(name, autograd.Function.apply, float64 inputs) for torch.autograd.gradcheck, every family.
    On a CPU these run the Triton kernels only under TRITON_INTERPRET=1 (else they would fail to launch)."""
    return [case for f in FAMILIES for case in family_module(f).gradcheck_cases()]
