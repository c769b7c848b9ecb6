"""Running the trainer from a config file: `fluxlab train` (`cli_train`) and the learning-rate
range test `fluxlab lr-find` (`lr_find`, `cli_lr_find`). Both return the process exit code; the
argparse side is fluxlab/commands/train.py."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from fluxlab.config import TrainConfig, load_config
from fluxlab.training import observe, state
from fluxlab.training.observe import TrainingDiverged, TrainingOOM
from fluxlab.training.signals import RunInterrupted
from fluxlab.training.trainer import Trainer

EXIT_OOM = 3
EXIT_NONFINITE = 4
LR_FIND_MAX_FACTOR = 10.0  # a sweep that never diverged suggests at most this x the config's learning_rate


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    steepest_lr: float | None
    diverged_at: float | None
    plot_path: Path | None
    warning: str | None = None
    """Why the suggestion is weak (the sweep never diverged, or the loss never fell); None otherwise."""


def step_source(config_path, overrides: dict[str, str], *, data: str = "", resolution: int, batch_size: int,
                seed: int = 0):
    """(trainer, one_step) for notebooks that measure training steps one by one.

    With `data` (a dataset folder, or "shapes" for a synthetic one of `resolution`-pixel images),
    the real path: images and captions through the VAE, the text encoders and the caches (the
    encoders freed before the transformer loads), batches from the bucketed DataLoader. Without
    it, random batches of the model's real input shapes (no encoders at all).
    """
    import tempfile

    from fluxlab.data import make_shapes_dataset

    work = tempfile.mkdtemp(prefix="fluxlab-steps-")
    if data == "shapes":
        data = str(make_shapes_dataset(Path(work) / "shapes", n=max(8, 4 * batch_size), seed=seed, size=resolution))
        # The synthetic captions run to ~50 tokens: room for them, so that none is truncated.
        if load_config(config_path, overrides).max_sequence_length < 64:
            overrides = {**overrides, "max_sequence_length": "64"}
    cfg = load_config(config_path, {**overrides, "seed": str(seed), "resolution": str(resolution),
                                    "batch_size": str(batch_size), "output_dir": str(Path(work) / "run"),
                                    "cache_dir": str(Path(work) / "cache"), "validation_every": "0",
                                    "steps": str(10**6), "lr_warmup_steps": "0", "num_workers": "0",
                                    "gradient_accumulation": "1",   # one micro-batch per measured step
                                    "progress": "false", **({"data": data} if data else {})})
    trainer = Trainer(cfg).setup(with_data=bool(data))
    if data:
        def one_step():
            return trainer.step(trainer.batches.fetch(1)[0])
    else:
        batch = trainer.random_batch(batch_size=batch_size, resolution=resolution)

        def one_step():
            return trainer.step([batch])
    return trainer, one_step


def suggest_lr(lrs, smoothed, diverged_at: float | None, current_lr: float,
               max_factor: float = LR_FIND_MAX_FACTOR) -> tuple[float, float | None, str | None]:
    """(suggested lr, steepest-descent lr, warning) from a range test's smoothed loss curve.

    Diverged: the lr at the smoothed minimum / 10 (the minimum sits just below the blow-up).
    Never diverged: that minimum is only where the sweep stopped, so /10 means nothing; suggest the
    steepest descent of the smoothed loss over log(lr), capped at `max_factor` x `current_lr` since
    the ceiling was never found. A loss that never fell gives `current_lr` back.
    """
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    k = int(np.argmin(smoothed))
    steepest = None
    if k >= 2:  # a slope needs a few points before the minimum (np.gradient refuses one)
        grad = np.gradient(smoothed[: k + 1], np.log(lrs[: k + 1]))
        steepest = float(lrs[int(np.argmin(grad))])
    if diverged_at is not None:
        return float(lrs[k] / 10), steepest, None
    span = f"{lrs[0]:.1e}..{lrs[-1]:.1e}"
    # "Fell": the minimum lies clearly below the start (1%), not within the noise of a flat curve.
    if steepest is None or smoothed[k] > 0.99 * smoothed[0]:
        return float(current_lr), steepest, (
            f"the loss never fell over the sweep ({span}); no suggestion, keeping learning_rate {current_lr:.2e}")
    cap = max_factor * current_lr
    suggested = min(steepest, cap)
    return float(suggested), steepest, (
        f"the sweep never diverged (up to {lrs[-1]:.1e}), so its ceiling is unknown; suggesting the steepest "
        f"descent {steepest:.2e}" + (f", capped at {max_factor:g}x learning_rate = {cap:.2e}" if steepest > cap else "")
        + "; raise lr_find_max to find where it diverges")


def lr_find(cfg: TrainConfig, *, pipe=None, divergence: float = 4.0) -> LRFindResult:
    """Learning-rate range test: lr grows exponentially from lr_find_min to lr_find_max over
    lr_find_steps; stop when the smoothed loss exceeds `divergence` x its best. The suggestion is
    `suggest_lr`'s: minimum / 10 after a divergence, else the bounded steepest descent (with a warning)."""
    tr = Trainer(cfg, pipe=pipe, new_run=False).setup()
    n = cfg.lr_find_steps
    ratio = cfg.lr_find_max / cfg.lr_find_min
    for g in tr.optimizer.param_groups:
        g["lr"] = g["initial_lr"] = cfg.lr_find_min
    tr.lr_scheduler = LambdaLR(tr.optimizer, lambda i: ratio ** (i / max(n - 1, 1)))
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, float("inf"), None
    try:
        for i in tqdm(range(n), desc="lr-find", disable=not cfg.progress):
            out = tr.step([tr.next_micro_batch() for _ in range(cfg.gradient_accumulation)])
            loss = out["loss"].item()
            lrs.append(out["lr"])
            losses.append(loss)
            avg = 0.9 * avg + 0.1 * loss
            s = avg / (1 - 0.9 ** (i + 1))  # bias-corrected EMA
            smoothed.append(s)
            best = min(best, s)
            if not math.isfinite(loss) or s > divergence * best:
                diverged = out["lr"]
                break
    finally:
        tr.close()  # workers ignore SIGTERM: never leave them to the interpreter exit
    suggested, steepest, warning = suggest_lr(lrs, smoothed, diverged, cfg.learning_rate)
    res = LRFindResult(lrs, losses, smoothed, suggested, steepest, diverged, None, warning)
    if tr.rank == 0:
        state.claim_output_dir(tr.out, tr._out_state, overwrite=False)
        tr.files.json(tr.out / "lr_find.json", {k: v for k, v in dataclasses.asdict(res).items() if k != "plot_path"})
        res.plot_path = tr.out / "lr_find.png"
        observe.plot_lr_find(res, res.plot_path)
    return res


def cli_train(config_path: str, overrides: dict[str, str], resume: str | None = None, profile: int = 0,
              overwrite: bool = False) -> int:
    cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg, resume=resume, profile_steps=profile, overwrite=overwrite)
    sig = trainer.signals
    sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
    try:
        trainer.setup()
        result = trainer.train()
    except TrainingOOM as e:
        print(f"fluxlab: {e}", file=sys.stderr)
        return EXIT_OOM
    except TrainingDiverged as e:
        if trainer.rank == 0:
            print(f"fluxlab: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except RunInterrupted as e:
        if trainer.rank == 0:
            if sig.aborted_during == "start-up":
                print(f"fluxlab: {e} received during start-up: stopped before any step", file=sys.stderr)
            else:
                last = trainer.ckpt.last if trainer.ckpt else None
                print(f"fluxlab: {e} again: aborted at once at step {trainer.global_step}; "
                      + (f"the last checkpoint is {last}\n  resume with: fluxlab train {config_path}{sets} "
                         f"--resume latest" if last else "no checkpoint of this run was written"), file=sys.stderr)
        return 128 + e.signum
    finally:
        trainer.close()
    code = 128 + sig.stop_signal if sig.stop_signal else 0
    if trainer.rank != 0:
        return code
    if result.interrupted:
        print(f"fluxlab: stopped at step {result.steps_done}; checkpoint {result.checkpoint_path}\n"
              f"  resume with: fluxlab train {config_path}{sets} --resume latest", file=sys.stderr)
        return code
    losses = result.losses
    w = max(1, min(10, len(losses) // 4))
    first = float(np.mean(losses[:w])) if losses else float("nan")
    last = float(np.mean(losses[-w:])) if losses else float("nan")
    print(f"fluxlab: trained steps {result.start_step}->{result.steps_done} in {result.wall_s:.1f}s; "
          f"loss (mean of {w}) first {first:.4f} -> last {last:.4f}\n  LoRA: {result.lora_path}\n"
          f"  checkpoint: {result.checkpoint_path}\n  metrics: {trainer.out / 'metrics.jsonl'}")
    if code:
        print(f"fluxlab: {signal.Signals(sig.stop_signal).name} arrived during the final save, which "
              f"finished: the run is complete", file=sys.stderr)
    return code


def cli_lr_find(config_path: str, overrides: dict[str, str]) -> int:
    cfg = load_config(config_path, overrides)
    res = lr_find(cfg)
    msg = f"fluxlab: suggested learning_rate {res.suggested_lr:.2e}"
    if res.steepest_lr:
        msg += f" (steepest descent at {res.steepest_lr:.2e})"
    if res.diverged_at:
        msg += f"; diverged at {res.diverged_at:.2e}"
    if res.warning:
        print(f"fluxlab: warning: {res.warning}", file=sys.stderr)
    print(msg + (f"\n  plot: {res.plot_path}" if res.plot_path else ""))
    return 0
