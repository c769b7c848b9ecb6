"""Gradient flow: per-layer gradient norms over steps, frozen/trainable audits, non-finite hooks,
and gradcheck of every custom `autograd.Function` in `fluxlab.kernels`.

An audit returns a list of problems (empty = clean), each naming the parameter, so a notebook can
`assert not problems, problems` and the failure message says what to fix.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Sequence

import numpy as np
import torch


# --- per-layer gradient norms -----------------------------------------------------------------
class GradFlowTracker:
    """Records the gradient L2 norm of each layer (module, or parameter with `by="param"`) after
    backward. Layers are the owners of the parameters trainable when the tracker was built; a layer
    whose parameters have no `.grad` at a step records NaN (visible as a hole in the heatmap)."""

    def __init__(self, model: torch.nn.Module, *, by: str = "module"):
        if by not in ("module", "param"):
            raise ValueError(f"GradFlowTracker(by=...) must be 'module' or 'param', got {by!r}")
        self.layers: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                layer = name if by == "param" else (name.rpartition(".")[0] or name)
                self.layers.setdefault(layer, []).append(p)
        if not self.layers:
            raise ValueError("GradFlowTracker: the model has no trainable parameters")
        self.steps: list[int] = []
        self._rows: list[np.ndarray] = []

    def record(self, step: int) -> None:
        sq = []
        for params in self.layers.values():
            grads = [p.grad for p in params if p.grad is not None]
            sq.append(sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads) if grads else None)
        # One stacked transfer instead of one GPU sync per layer.
        present = [s for s in sq if s is not None]
        values = iter(torch.stack(present).sqrt().cpu().tolist() if present else [])
        self._rows.append(np.array([next(values) if s is not None else np.nan for s in sq]))
        self.steps.append(step)

    def matrix(self) -> tuple[np.ndarray, list[str]]:
        """([layers, steps] gradient norms, layer names)."""
        names = list(self.layers)
        return (np.stack(self._rows, axis=1) if self._rows else np.empty((len(names), 0))), names

    def heatmap(self, ax=None, *, group: str = "auto", max_layers: int = 24):
        """Gradient L2 norm per row and step on a log colour scale; returns the axes.

        group: "layer" (one row per tracked layer), "block" (the layers of one transformer block
        combined, sqrt(sum of squared norms)), or "auto" (layers up to `max_layers`, else blocks).
        Cells with a gradient of exactly 0 are grey and cells with no gradient (`.grad` None) red;
        a legend under the plot says so.
        """
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap, LogNorm
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator

        m, names = self.matrix()                                             # [layers, steps]
        if group == "auto":
            group = "layer" if len(names) <= max_layers else "block"
        if group not in ("layer", "block"):
            raise ValueError(f"heatmap(group=...) must be 'auto', 'layer' or 'block', got {group!r}")
        if group == "block":
            m, names = _by_block(m, names)                                   # [blocks, steps]
        labels = [_short(n) for n in names]
        ax = ax or plt.subplots(figsize=(7.5, max(2.8, 0.17 * len(labels) + 1.8)), layout="constrained")[1]
        pos = m[m > 0]
        norm = LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 10)) if pos.size else None
        img = ax.imshow(np.ma.masked_where(~(m > 0), m), aspect="auto", interpolation="nearest", cmap="viridis",
                        norm=norm)
        special = np.where(m == 0, 0.0, np.where(np.isnan(m), 1.0, np.nan))  # 0: exactly zero, 1: no grad
        ax.imshow(np.ma.masked_invalid(special), aspect="auto", interpolation="nearest",
                  cmap=ListedColormap(["0.75", "tab:red"]), vmin=0, vmax=1)
        ax.figure.colorbar(img, ax=ax, label="gradient L2 norm (log scale)")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(lambda x, _: str(self.steps[int(x)]) if 0 <= int(x) < len(self.steps) else "")
        ax.set_xlabel("step")
        ax.set_ylabel("layer" if group == "layer" else "block (its layers' norms combined)")
        ax.set_title(f"gradient flow: {len(labels)} {group}s x {m.shape[1]} steps")
        ax.legend(handles=[Patch(color="0.75", label="gradient exactly 0 (e.g. LoRA A while B is still 0)"),
                           Patch(color="tab:red", label="no gradient (.grad is None)")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(labels) < 12 else -0.06), ncol=2,
                  fontsize=7, frameon=False)
        return ax


_BLOCK = re.compile(r"^(?:.*\.)?((?:single_)?transformer_blocks\.\d+)(?:\.|$)")


def _block_of(name: str) -> str:
    """The transformer block a layer belongs to (its first name component outside any block)."""
    hit = _BLOCK.match(name)
    return hit.group(1) if hit else name.split(".")[0]


def _by_block(m: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Rows of the same block combined: sqrt(sum of squares); NaN where no layer had a gradient."""
    blocks = list(dict.fromkeys(_block_of(n) for n in names))
    out = np.full((len(blocks), m.shape[1]), np.nan)
    for i, b in enumerate(blocks):
        rows = m[[j for j, n in enumerate(names) if _block_of(n) == b]]
        seen = ~np.isnan(rows).all(axis=0)
        out[i, seen] = np.sqrt(np.nansum(rows[:, seen] ** 2, axis=0))
    return out, blocks


def _short(name: str) -> str:
    """transformer_blocks.3.attn.to_q.lora_A.default -> double 3 attn.to_q.lora_A."""
    name = re.sub(r"^single_transformer_blocks\.(\d+)\.?", r"single \1 ", name)
    name = re.sub(r"^transformer_blocks\.(\d+)\.?", r"double \1 ", name)
    return name.replace(".default", "").strip()


# --- audits -----------------------------------------------------------------------------------
def audit_frozen(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Frozen parameters must have no `.grad`, sit in no optimizer param group and hold no optimizer
    state (state for a frozen base weight is wasted memory, e.g. 2x its size for AdamW)."""
    frozen = {id(p): name for name, p in model.named_parameters() if not p.requires_grad}
    problems = [f"{name}: frozen but has a .grad" for name, p in model.named_parameters()
                if not p.requires_grad and p.grad is not None]
    for i, group in enumerate(optimizer.param_groups):
        problems += [f"{frozen[id(p)]}: frozen but in optimizer param group {i}"
                     for p in group["params"] if id(p) in frozen]
    problems += [f"{frozen[id(p)]}: frozen but has optimizer state ({', '.join(map(str, state))})"
                 for p, state in optimizer.state.items() if id(p) in frozen and state]
    return problems


def audit_trainable(model: torch.nn.Module) -> list[str]:
    """After a backward: every trainable parameter has a finite, not all-zero `.grad`."""
    problems = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            problems.append(f"{name}: trainable but has no .grad (not reached by the loss?)")
        elif not bool(torch.isfinite(p.grad).all()):
            bad = int((~torch.isfinite(p.grad)).sum())
            problems.append(f"{name}: {bad} non-finite gradient value(s)")
        elif not bool(p.grad.any()):
            problems.append(f"{name}: gradient is all zeros")
    return problems


class NonFiniteHooks:
    """Gradient hooks on every trainable parameter that note each non-finite gradient and, with
    `raise_error=True`, stop the backward at the first one (FloatingPointError naming it). Hooks
    fire in backward order, so `first` is the parameter nearest the loss where NaN/inf appeared.
    Set `.step` from the training loop to tag events. Use as a context manager or call `remove()`."""

    def __init__(self, model: torch.nn.Module, raise_error: bool = True):
        self.raise_error = raise_error
        self.step: int | None = None
        self.events: list[dict] = []
        self._handles = [p.register_hook(self._hook(name))
                         for name, p in model.named_parameters() if p.requires_grad]

    @property
    def first(self) -> dict | None:
        return self.events[0] if self.events else None

    def _hook(self, name: str) -> Callable:
        def check(grad: torch.Tensor):
            if not bool(torch.isfinite(grad).all()):  # one sync per parameter: a debugging tool
                self.events.append({"param": name, "step": self.step,
                                    "nan": int(grad.isnan().sum()), "inf": int(grad.isinf().sum())})
                if self.raise_error:
                    raise FloatingPointError(f"non-finite gradient at parameter {name!r} (step {self.step})")
            return None
        return check

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def install_nonfinite_hooks(model: torch.nn.Module, raise_error: bool = True) -> NonFiniteHooks:
    return NonFiniteHooks(model, raise_error=raise_error)


# --- gradcheck of custom autograd.Functions -----------------------------------------------------
def run_gradchecks(cases: Sequence[tuple[str, Callable, tuple]], **gradcheck_kwargs) -> list[dict]:
    """torch.autograd.gradcheck on each (name, fn, inputs); one row per case, failures kept, not raised."""
    rows = []
    for name, fn, inputs in cases:
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        not_f64 = [i for i, t in enumerate(inputs)
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64]
        if not_f64:
            rows.append({"name": name, "ok": False,
                         "error": f"inputs {not_f64} are not float64 (gradcheck needs double precision)"})
            continue
        try:
            torch.autograd.gradcheck(fn, inputs, raise_exception=True, **gradcheck_kwargs)
            rows.append({"name": name, "ok": True, "error": None})
        except Exception as e:  # noqa: BLE001 - a row per failure is the point
            rows.append({"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
    return rows


def gradcheck_kernels(**gradcheck_kwargs) -> list[dict]:
    """Gradcheck every case `fluxlab.kernels.gradcheck_cases()` lists (float64 inputs)."""
    try:
        kernels = importlib.import_module("fluxlab.kernels")
    except ImportError as e:
        raise ImportError(f"fluxlab.kernels cannot be imported ({e}); gradcheck needs it") from e
    cases = getattr(kernels, "gradcheck_cases", None)
    if cases is None:
        raise ImportError("fluxlab.kernels has no gradcheck_cases(): it must return "
                          "[(name, fn, float64 inputs), ...] for every custom autograd.Function")
    return run_gradchecks(cases(), **gradcheck_kwargs)
