"""What a run tells: metrics.jsonl and the progress bar, the curves, the train summary, the
profiler trace and memory timeline, the out-of-memory report and the non-finite guard."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from tqdm.auto import tqdm

from fluxlab import checkpoints
from fluxlab._atomic import atomic_write_bytes, atomic_write_text
from fluxlab.errors import UserError


class TrainingOOM(RuntimeError):
    """CUDA ran out of memory; the message holds the step, memory numbers and what to try."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss, a gradient or a trained parameter became non-finite; names the step and the cause."""


@dataclass
class TrainResult:
    final_loss: float | None
    """Loss of the last step (nan if no step ran)."""
    losses: list[float]
    """Per-step training loss of this run (resumed runs: the steps run in this process)."""
    lora_path: Path | None
    """<output_dir>/pytorch_lora_weights.safetensors once the run completes, else None."""
    steps_done: int
    """Global step reached (resumed runs count the earlier steps too)."""
    start_step: int = 0
    interrupted: bool = False
    checkpoint_path: Path | None = None
    val_losses: dict[int, float] = field(default_factory=dict)
    output_dir: Path | None = None
    patch_report: Any = None
    cache_stats: dict = field(default_factory=dict)
    data_wait_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    setup_s: float = 0.0
    """Seconds Trainer.setup took: loading, filling the caches (the cold pass), building the model."""
    memory: dict = field(default_factory=dict)
    compile: dict = field(default_factory=dict)
    """torch.compile counters over this run (`compile_counts`): unique_graphs, graph_breaks."""
    """CUDA only, GiB: encode_peak_gib (filling the caches), with_encoders_gib / after_release_gib /
    freed_gib (around the encoders' release, before the transformer loads), train_peak_gib."""
    adapter_sha256_per_rank: list[str] = field(default_factory=list)
    """Per rank, sha256 of the trainable parameters (names + fp32 bytes): equal on every rank when
    DDP kept the replicas in sync. A hash of tensors in memory, not of the file (lora_file_sha256)."""
    lora_file_sha256: str | None = None
    """sha256 of the saved LoRA file's bytes (None until it is written)."""
    writes_per_rank: list[list[str]] = field(default_factory=list)

    @property
    def lora_sha256_per_rank(self) -> list[str]:
        """Former name of adapter_sha256_per_rank (it never hashed the file); kept for old readers."""
        return self.adapter_sha256_per_rank


def compile_counts(since: dict | None = None) -> dict[str, int]:
    """torch.compile's process-wide counters (graphs compiled, graph breaks), minus `since`: with
    static shapes, one graph per block kind and aspect bucket."""
    from torch._dynamo.utils import counters

    now = {"unique_graphs": int(counters["stats"]["unique_graphs"]),
           "graph_breaks": int(sum(counters["graph_break"].values()))}
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


class RunFiles:
    """The files of one run's folder that rank 0 writes, and the list of them (`written`)."""

    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank
        self.written: list[str] = []           # every file this rank wrote (DDP: rank 0 only)

    def note(self, path) -> Path:
        if str(path) not in self.written:
            self.written.append(str(path))
        return Path(path)

    def text(self, path: Path, text: str) -> None:
        assert self.rank == 0, "only rank 0 writes"
        atomic_write_text(path, text)

    def json(self, path: Path, obj) -> None:
        self.text(path, json.dumps(obj, indent=1, default=str))
        self.written.append(str(path))

    def summary(self, result: TrainResult) -> None:
        """Write train_summary.json (setting the LoRA file's hash on `result` first)."""
        if result.lora_path is not None:
            result.lora_file_sha256 = hashlib.sha256(result.lora_path.read_bytes()).hexdigest()
        summary = {k: v for k, v in dataclasses.asdict(result).items()
                   if k not in ("losses", "patch_report", "data_wait_s")}
        summary["patch_report"] = repr(result.patch_report) if result.patch_report is not None else None
        summary["lora_sha256_per_rank"] = summary["adapter_sha256_per_rank"]  # former name, for old readers
        self.json(self.out / "train_summary.json", summary)


class Metrics:
    """Rows of metrics.jsonl: kept as tensors until a logging step reads them (one sync), then
    appended to the file, the result and a window of recent values (`history`); and the progress bar."""

    KEYS = ("loss", "lr", "grad_norm", "data_wait_s", "step_time_s", "val_loss")

    def __init__(self, files: RunFiles, window: int):
        self.files = files
        self.path = files.out / "metrics.jsonl"
        self.history = {k: deque(maxlen=window) for k in self.KEYS}
        self.pending: list[dict] = []
        self.bar = None

    def start(self, steps: int, start_step: int, show: bool) -> None:
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not show)

    def add(self, row: dict, result: TrainResult, flush: bool) -> None:
        self.pending.append(row)
        self.bar.update(1)
        if flush:
            self.flush(result)

    def close(self, result: TrainResult) -> None:
        self.flush(result)
        self.bar.close()
        result.final_loss = result.losses[-1] if result.losses else float("nan")

    def flush(self, result: TrainResult) -> None:
        bar = self.bar
        if not self.pending:
            return
        rows = []
        for r in self.pending:
            r = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
            # When the row's values arrived from the device (seconds since the loop started): with
            # log_every=1, consecutive differences are whole step times, device work included.
            r["logged_s"] = time.perf_counter() - self.t0
            rows.append(r)
            for k in self.history:
                if k in r:
                    self.history[k].append(r[k])
            result.losses.append(r["loss"])
            result.data_wait_s.append(r["data_wait_s"])
        self.pending.clear()
        if self.files.rank == 0:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            self.files.note(self.path)
        last = rows[-1]
        post = {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}
        if "grad_norm" in last:
            post["gnorm"] = f"{last['grad_norm']:.3f}"
        bar.set_postfix(post, refresh=False)

    def trim(self, upto_step: int) -> None:
        """On resume keep metrics.jsonl rows up to the resumed step, so the history reads once."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the half line of a process killed while appending
            if isinstance(row, dict) and row.get("step", 0) <= upto_step:
                keep.append(line)
        self.files.text(self.path, "".join(line + "\n" for line in keep))


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_curves(files: RunFiles) -> None:
    """loss.png (with its EMA and the validation loss), lr.png and grad_norm.png from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (files.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for key, ylabel, log in (("loss", "training loss", False), ("lr", "learning rate", False),
                             ("grad_norm", "gradient norm", True)):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=1, alpha=0.6 if key == "loss" else 1.0, label=key)
        if key == "loss" and len(ys) > 4:
            ema, s = [], ys[0]
            for y in ys:
                s = 0.9 * s + 0.1 * y
                ema.append(s)
            ax.plot(xs, ema, lw=2, label="EMA 0.9")
            vals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            if vals:
                ax.plot(*zip(*vals), "o-", label="validation")
            ax.legend()
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = files.out / f"{key}.png"
        atomic_write_bytes(path, _figure_bytes(fig))
        files.written.append(str(path))


def plot_lr_find(res, path: Path) -> None:
    """The range test's loss and smoothed loss over the learning rate, with its suggestion."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(res.lrs, res.losses, alpha=0.4, label="loss")
    ax.plot(res.lrs, res.smoothed, lw=2, label="smoothed (EMA 0.9)")
    ax.axvline(res.suggested_lr, color="g", ls="--", label=f"suggested {res.suggested_lr:.1e}")
    if res.steepest_lr:
        ax.axvline(res.steepest_lr, color="0.5", ls=":", label=f"steepest descent {res.steepest_lr:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test" + ("" if res.diverged_at else " (never diverged)"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, _figure_bytes(fig))


class Profiler:
    """`--profile N`: a torch.profiler trace of N steps after warm-up (rank 0), and memory per step."""

    WARM = 2

    def __init__(self, files: RunFiles, device: torch.device, steps: int, steps_left: int):
        self.files, self.device, self.samples = files, device, []
        if steps_left < self.WARM + 1 + steps:
            warnings.warn(f"--profile {steps}: only {steps_left} steps left, fewer than {self.WARM} wait "
                          f"+ 1 warm-up + {steps} profiled", stacklevel=3)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.dir = files.out / "profile"
        self.dir.mkdir(parents=True, exist_ok=True)

        def on_ready(prof):
            path = self.dir / "trace.json"
            prof.export_chrome_trace(str(path))
            files.written.append(str(path))

        self.prof = profile(activities=acts, schedule=schedule(wait=self.WARM, warmup=1, active=steps, repeat=1),
                            on_trace_ready=on_ready, record_shapes=True, profile_memory=True, with_stack=True)
        self.prof.start()

    def step(self, step: int) -> None:
        self.prof.step()
        if self.device.type == "cuda":
            self.samples.append({"step": step, "allocated": torch.cuda.memory_allocated(self.device),
                                 "reserved": torch.cuda.memory_reserved(self.device),
                                 "peak": torch.cuda.max_memory_allocated(self.device)})
        else:
            import psutil

            self.samples.append({"step": step, "rss": psutil.Process().memory_info().rss})

    def stop(self) -> None:
        self.prof.stop()
        # Per-step memory (always), plus torch's categorised timeline where it can build one.
        self.files.json(self.dir / "memory_steps.json", self.samples)
        try:
            dev = str(self.device) if self.device.type == "cuda" else "cpu"
            path = self.dir / "memory_timeline.json"
            self.prof.export_memory_timeline(str(path), device=dev)
            self.files.written.append(str(path))
        except Exception as e:  # noqa: BLE001 -- torch's exporter is experimental; the trace still stands
            warnings.warn(f"memory timeline not exported ({type(e).__name__}: {e}); see memory_steps.json",
                          stacklevel=2)


def oom_report(step: int, phase: str, device: torch.device, transformer, optimizer) -> list[str]:
    """The first lines of a TrainingOOM message: where, how much memory, and the largest tensors."""
    lines = [f"CUDA out of memory at step {step} (during {phase})."]
    if torch.cuda.is_available():
        dev = device if device.type == "cuda" else None
        lines.append(f"  allocated {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB, "
                     f"reserved {torch.cuda.memory_reserved(dev) / 2**30:.2f} GiB, "
                     f"peak {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    owners = []
    for name, p in transformer.named_parameters():
        owners.append((p.numel() * p.element_size(), f"parameter {name} {tuple(p.shape)} {p.dtype}"))
        if p.grad is not None:
            owners.append((p.grad.numel() * p.grad.element_size(), f"grad of {name}"))
    names = {id(p): n for n, p in transformer.named_parameters()}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                owners.append((v.numel() * v.element_size(), f"optimizer {k} of {names.get(id(p), '?')}"))
    owners.sort(key=lambda t: -t[0])
    lines.append("  largest known tensors:")
    return lines + [f"    {b / 2**20:9.1f} MiB  {what}" for b, what in owners[:8]]


OOM_HINTS = ("  try: a lower resolution (--set resolution=512), batch_size=1 with gradient_accumulation, "
             "gradient_checkpointing=true, the memory-lean mode, or QLoRA (--set quantize=nf4).")


class NonFiniteGuard:
    """The first step whose loss or gradient went non-finite, kept on the device so no step syncs:
    `check` reads it (one sync) on logging steps and before anything is written."""

    def __init__(self, device: torch.device):
        self.first = torch.full((2,), -1, dtype=torch.int64, device=device)  # [step, cause bits 1 loss | 2 grad]

    def note(self, step: int, loss: torch.Tensor, grad_norm, params) -> None:
        if grad_norm is None:  # one fused multi-tensor norm, not a kernel per parameter, on the hot path
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        cause = (~torch.isfinite(loss)).long() + 2 * (~torch.isfinite(grad_norm.float())).long()    # 0-dim
        new = torch.stack([torch.full_like(cause, step), cause])                                    # [2]
        self.first = torch.where((self.first[0] < 0) & (cause > 0), new, self.first)

    def check(self, params: list, global_step: int, cfg, last_ckpt) -> None:
        """Raise TrainingDiverged when a step went non-finite or a trained parameter is."""
        params_ok = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
        (step, cause), params_ok = self.first.tolist(), bool(params_ok)
        if step < 0 and params_ok:
            return
        what = ({1: "loss", 2: "gradient", 3: "loss and gradient"}[cause] if step >= 0
                else "trained parameters (after an optimizer update)")
        at = f"step {step}" if step >= 0 else f"step {global_step} or earlier"
        last = (f"the last good checkpoint is {last_ckpt}" if last_ckpt is not None
                else "no checkpoint of this run was written")
        raise TrainingDiverged(
            f"training diverged: non-finite {what} at {at} (learning_rate {cfg.learning_rate:g}, "
            f"max_grad_norm {cfg.max_grad_norm:g}); stopped without writing a checkpoint or LoRA from it; "
            f"{last}. Lower learning_rate, keep max_grad_norm > 0, or check the data")


def oom_error(trainer, err: Exception) -> TrainingOOM:
    """The error an out-of-memory step raises: where memory went, and, when the step failed
    before the optimizer touched anything, a checkpoint of the last completed step (params and
    Adam state are then consistent; mid-update they would not be) that resumes at this step."""
    lines = oom_report(trainer.global_step + 1, trainer.signals.phase, trainer.device, trainer.transformer,
                       trainer.optimizer)
    if trainer.signals.phase in ("forward", "backward") and trainer.global_step > 0:
        trainer.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        trainer.batches.seek(*trainer._step_start[:2])
        checkpoints.restore_rng_state(trainer._step_start[2])
        try:
            lines.append(f"  checkpoint of step {trainer.global_step} written to {trainer.save_checkpoint()}")
        except Exception as e:  # noqa: BLE001 -- memory may still be too tight; say so
            lines.append(f"  could not write a checkpoint ({type(e).__name__}: {e})")
    else:
        lines.append("  no checkpoint written (nothing completed yet, or the optimizer was mid-update)")
    return TrainingOOM("\n".join(lines + [OOM_HINTS]))


def is_log_step(cfg, step: int) -> bool:
    """Steps whose metrics are logged and flushed (and whose gradient norm is computed)."""
    return step % cfg.log_every == 0 or step == cfg.steps
