"""What a run leaves on disk and reads back: its output folder, its checkpoints (save, find,
resume, RNG state, retention, through `fluxlab.checkpoints`) and the trained adapter file.

Output folders: fluxlab marks a run folder with `.fluxlab-run`. A new run refuses a folder that
holds an earlier run (pass --resume to continue it, or --overwrite to move it aside to
`<output_dir>.replaced-<time>`; nothing is deleted), a folder it did not create that holds other
files, the filesystem root and the home folder. Hidden leftovers of a killed save or retention
(`checkpoints/.tmp-*`, `.del-*`, `.old-*`, `.lora-*`, `.<file>.*.tmp`) are removed at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline
from diffusers.training_utils import _collate_lora_metadata
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save

from fluxlab import checkpoints
from fluxlab._atomic import atomic_write_bytes, atomic_write_text
from fluxlab.checkpoints import CheckpointError
from fluxlab.config import ConfigError, TrainConfig, save_config

LORA_FILE = "pytorch_lora_weights.safetensors"
RUN_MARKER = ".fluxlab-run"
# What a run writes at the top of its folder: a folder holding any of these holds an earlier run.
RUN_OUTPUTS = (LORA_FILE, "sparse_delta.safetensors", "metrics.jsonl", "train_summary.json", "checkpoints")


# --- output folders -----------------------------------------------------------------------------
def _forbidden_output(path: Path) -> str | None:
    """Why `path` can never be a run folder (the filesystem root, home or one of its parents)."""
    p = path.expanduser().resolve()
    if p == Path(p.anchor):
        return "is the filesystem root"
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry: nothing to protect there
        return None
    if p == home:
        return "is your home folder"
    if p in home.parents:
        return "is a parent of your home folder"
    return None


def _holds_run(out: Path) -> list[str]:
    """The earlier-run outputs in `out` (empty when it holds none)."""
    found = [n for n in RUN_OUTPUTS if (out / n).exists()]
    if "checkpoints" in found and not any((out / "checkpoints").iterdir()):
        found.remove("checkpoints")
    return found


def check_output_dir(out: Path, *, resume, overwrite: bool, new_run: bool = True) -> str:
    """Refuse an output folder fluxlab must not write into; read-only. `new_run=False` (lr-find)
    accepts fluxlab's folder of an earlier run: it writes its own files beside that run's.

    Returns "new" (absent or empty), "owned" (marked by fluxlab) or "legacy" (an unmarked folder of
    an older fluxlab run, adopted only to resume it). Raises ConfigError naming output_dir.
    """
    why = _forbidden_output(out)
    if why:
        raise ConfigError(f"output_dir: {out} {why}; name a folder of its own, e.g. runs/train/my-run")
    if resume is not None and overwrite:
        raise ConfigError("--overwrite starts a new run and --resume continues one: pass only one")
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder; choose another output_dir")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return "new"
    if RUN_MARKER not in entries:
        known = set(RUN_OUTPUTS) | {"config.yaml", "loss.png", "lr.png", "grad_norm.png", "profile", "lr_find.json",
                                    "lr_find.png"}
        ckpts = out / "checkpoints"
        legacy = (resume is not None and set(entries) <= known and ckpts.is_dir()
                  and any((d / checkpoints.MANIFEST_FILE).is_file() for _, d in checkpoints.list_checkpoints(ckpts)))
        if legacy:
            return "legacy"
        shown = ", ".join(repr(n) for n in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"output_dir: {out} was not created by fluxlab (no {RUN_MARKER} marker) and holds "
                          f"other files ({shown}); fluxlab writes only into new, empty or its own folders: "
                          f"choose another output_dir")
    earlier = _holds_run(out)
    if earlier and resume is None and not overwrite and new_run:
        raise ConfigError(f"output_dir: {out} holds an earlier run ({', '.join(earlier)}); continue it with "
                          f"--resume latest, start over with --overwrite (moves it aside, deletes nothing), "
                          f"or choose another output_dir")
    return "owned"


def claim_output_dir(out: Path, state: str, *, overwrite: bool) -> list[str]:
    """Make `out` this run's folder (after `check_output_dir`): move an earlier run aside when
    overwriting, write the marker, and remove the hidden leftovers of killed writes. Returns notes."""
    notes = []
    if overwrite and state == "owned" and _holds_run(out):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = out.with_name(f"{out.name}.replaced-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
        os.rename(out, aside)  # one rename: the earlier run stays whole, just under a new name
        notes.append(f"moved the earlier run in {out} aside to {aside}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).exists():
        atomic_write_text(out / RUN_MARKER, json.dumps({"fluxlab": "training run folder",
                                                        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}) + "\n")
    removed = checkpoints.clean_leftovers(out / "checkpoints")
    # Temp files of killed atomic writes (`.<name>.<random>.tmp`) and of a killed LoRA save.
    for p in list(out.glob(".*.tmp")) + list(out.glob(".lora-*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        notes.append(f"removed {len(removed)} leftover(s) of an interrupted save: "
                     + ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return notes


def begin_run(cfg: TrainConfig, out: Path, out_state: str | None, *, resume, overwrite: bool) -> list[str]:
    """Rank 0, as training starts: claim `out` (checked now if setup did not) and write its
    config.yaml. Returns notes for the user."""
    if out_state is None:
        out_state = check_output_dir(out, resume=resume, overwrite=overwrite)
    notes = claim_output_dir(out, out_state, overwrite=overwrite)
    save_config(cfg, out / "config.yaml")
    return notes


# --- checkpoints ----------------------------------------------------------------------------------
def say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


class CheckpointManager:
    """The checkpoints of one run under <output_dir>/checkpoints: find the one to resume (falling
    back past damaged ones with `latest`), restore it, save new ones with every rank's RNG state,
    and keep the last `keep_last`. `last` is the newest checkpoint of this run (written or resumed)."""

    def __init__(self, cfg: TrainConfig, root: Path, resume, rank: int, world: int):
        self.cfg, self.root, self.which, self.rank, self.world = cfg, root, resume, rank, world
        self.last: Path | None = None
        self._candidates: list[Path] = []

    def find(self):
        """Pick, verify and load the checkpoint to resume (before the model loads); None to start
        fresh. `--resume latest` tries the newest first and falls back past any that fails."""
        if self.which is None:
            return None
        if str(self.which) != "latest":
            self._candidates = [Path(self.which)]
            return self.next()
        self._candidates = [p for _, p in checkpoints.list_checkpoints(self.root)]
        if not self._candidates:
            say(self.rank, f"fluxlab: no checkpoint under {self.root}; starting a new run")
            return None
        return self.next()

    def next(self):
        """Load the next resume candidate; with `latest`, skip (and name) each that fails."""
        while self._candidates:
            path = self._candidates.pop(0)
            try:
                ckpt = checkpoints.load_checkpoint(path)  # CheckpointError names the bad file
            except CheckpointError as e:
                if str(self.which) != "latest":
                    raise
                say(self.rank, f"fluxlab: skipping corrupt checkpoint {path}: {e}")
                continue
            self._check_config(ckpt)
            return ckpt
        raise CheckpointError(f"no checkpoint under {self.root} can be resumed (reasons above); move "
                              f"the damaged ones aside, or start over with --overwrite")

    def _check_config(self, ckpt) -> None:
        path = ckpt.path
        saved = ckpt.meta.get("config", {})
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path / checkpoints.META_FILE}: 'config' is not a mapping")
        for key in ("adapter", "rank", "target_modules", "batch_size", "seed", "gradient_accumulation",
                    "resolution", "sparse_density"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise ConfigError(f"{key}: the checkpoint {path} was trained with {key}={saved[key]!r}, this config "
                                  f"has {getattr(self.cfg, key)!r}; resume with the same {key} or start a new run")
        if ckpt.meta.get("world_size", 1) != self.world:
            raise ConfigError(f"world_size: {path} was written by {ckpt.meta.get('world_size')} process(es), "
                              f"this run has {self.world}; resume with the same number of processes")

    def resume(self, ckpt, params: dict, optimizer, lr_scheduler, batches) -> int:
        """`restore` `ckpt`, or with `latest` the next older one that restores; returns the step
        to continue from (0 when there is nothing to resume)."""
        while ckpt is not None:
            try:
                return self.restore(ckpt, params, optimizer, lr_scheduler, batches)
            except CheckpointError as e:
                if str(self.which) != "latest":
                    raise
                say(self.rank, f"fluxlab: skipping checkpoint {ckpt.path}: {e}")
                ckpt = self.next()
        return 0

    def restore(self, ckpt, params: dict, optimizer, lr_scheduler, batches) -> int:
        """Restore the model, optimizer, scheduler, data position (`batches`, a loader.Batches or
        None) and RNG from a loaded checkpoint; returns its step. Everything is checked against
        this model before anything changes; any failure is a CheckpointError naming the file (a
        checkpoint that hashes fine can still be unusable)."""
        tfile, sfile = ckpt.path / checkpoints.TENSORS_FILE, ckpt.path / checkpoints.STATE_FILE
        hint = checkpoints.RESUME_HINT
        missing = sorted(set(params) - set(ckpt.tensors))
        if missing:
            raise CheckpointError(f"{tfile}: lacks adapter tensors such as {missing[0]} that this config trains; "
                                  f"{hint}")
        for name, p in params.items():
            t = ckpt.tensors[name]
            if t.shape != p.shape or not t.is_floating_point():
                raise CheckpointError(f"{tfile}: tensor {name} is {tuple(t.shape)} {t.dtype}, the model needs "
                                      f"{tuple(p.shape)} floating point; {hint}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{tfile}: tensor {name} holds non-finite values; {hint}")
        state = ckpt.state
        for key in ("optimizer", "lr_scheduler", "rng_per_rank") + (("sampler",) if batches is not None else ()):
            if key not in state:
                raise CheckpointError(f"{sfile}: lacks {key!r}; {hint}")
        if not isinstance(state["rng_per_rank"], list) or len(state["rng_per_rank"]) <= self.rank:
            raise CheckpointError(f"{sfile}: no RNG state for rank {self.rank}; {hint}")
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(ckpt.tensors[name])
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if batches is not None:
                batches.sampler.load_state_dict(state["sampler"])
                batches.seek(int(state["sampler"]["epoch"]), int(state["sampler"]["cursor"]))
            checkpoints.restore_rng_state(state["rng_per_rank"][self.rank])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{sfile}: cannot be restored into this run ({type(e).__name__}: {e}); "
                                  f"{hint}") from e
        self.last = ckpt.path
        say(self.rank, f"fluxlab: resumed from {ckpt.path} at step {ckpt.step}")
        return ckpt.step

    def save(self, step: int, params: dict, optimizer, lr_scheduler, sampler: dict, val_loss, gather) -> Path:
        """Every rank calls this (`gather` collects the per-rank RNG states); rank 0 writes and prunes.
        `sampler`: the batch sampler's state where this step ended ({} without data)."""
        rng = gather(checkpoints.capture_rng_state())
        path = self.root / f"step_{step}"
        if self.rank == 0:
            tensors = {n: p.detach() for n, p in params.items()}
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "rng_per_rank": rng, "sampler": sampler,
                     "step": step}
            meta = {"config": self.cfg.to_dict(), "world_size": self.world, "val_loss": val_loss,
                    "fluxlab_format": 1}
            path = checkpoints.save_checkpoint(self.root, step, tensors=tensors, state=state, meta=meta)
            if self.cfg.keep_last:  # never prunes the one just written
                checkpoints.apply_retention(self.root, self.cfg.keep_last, protect=[path])
        self.last = path
        return path


# --- the trained adapter --------------------------------------------------------------------------
def adapter_state_dict(transformer, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter in diffusers/peft naming (no adapter name), as save_lora_weights wants it."""
    if adapter == "sparse":
        from fluxlab.kernels import sparse_delta

        return sparse_delta.sparse_state_dict(transformer)
    return get_peft_model_state_dict(transformer)


def save_adapter(transformer, adapter: str, out: Path) -> Path:
    """Write <out>/pytorch_lora_weights.safetensors (diffusers format), or sparse_delta.safetensors."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in adapter_state_dict(transformer, adapter).items()}
    if adapter == "sparse":
        return atomic_write_bytes(out / "sparse_delta.safetensors", save(state))
    # The adapter's LoraConfig (rank, alpha, targets) goes into the file's metadata, as
    # train_dreambooth_lora_flux.py writes it: without it, load_lora_weights guesses alpha
    # and the LoRA loads at the wrong strength whenever lora_alpha != rank.
    metadata = _collate_lora_metadata({"transformer": transformer})
    with tempfile.TemporaryDirectory(dir=out, prefix=".lora-") as tmp:
        pipeline = FluxPipeline
        if type(transformer).__name__ == "Flux2Transformer2DModel":  # FLUX.2: its own LoRA loader mixin
            from diffusers import Flux2KleinPipeline as pipeline
        pipeline.save_lora_weights(tmp, transformer_lora_layers=state, safe_serialization=True, **metadata)
        # Through the atomic writer: durable, and the usual file mode (safetensors writes 0600).
        atomic_write_bytes(out / LORA_FILE, (Path(tmp) / LORA_FILE).read_bytes())
    return out / LORA_FILE


def adapter_digest(params: dict[str, torch.Tensor]) -> str:
    """sha256 of the trainable parameters (names + fp32 bytes): equal on every DDP rank in sync."""
    h = hashlib.sha256()
    for name, p in sorted(params.items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
