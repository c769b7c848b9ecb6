"""Kill -9 campaign: `fluxlab train` killed at random moments (start-up, steps, checkpoint saves,
retention every step, the final LoRA save, plotting), resumed with `--resume latest` each time,
and finally run to the end. Counts what the guarantees forbid:

    corrupt_loads     a visible checkpoint that does not load after a kill, or a resume that
                      skipped one
    failed_resumes    a resumed run that exited non-zero on its own (not killed)
    leftovers         hidden temp / delete folders or temp files still there after the final run
    lora_mismatches   a final LoRA that is not bitwise equal to the uninterrupted run's

    python tests/fault_campaign.py --kills 60      # the full campaign (minutes)

`tests/unit/test_faults_training.py` runs a 3-kill sample of it in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"num_workers": 0, "progress": False, "max_sequence_length": 16, "batch_size": 2, "rank": 4,
            "lora_dropout": 0.1, "lr_warmup_steps": 2, "device": "cpu", "log_every": 1, "checkpoint_every": 1,
            "keep_last": 1, "validation_every": 0}


def _hidden_leftovers(out: Path) -> list[str]:
    """Hidden folders/files a killed write leaves (the run marker is not one)."""
    found = [p.name for p in out.glob(".*") if p.name != ".fluxlab-run"] if out.is_dir() else []
    ck = out / "checkpoints"
    found += [f"checkpoints/{p.name}" for p in ck.glob(".*")] if ck.is_dir() else []
    return sorted(found)


def _lora_sha(out: Path) -> str | None:
    """SHA-256 over the LoRA's tensor names and bytes (bitwise equality; file metadata aside)."""
    from safetensors.torch import load_file

    f = out / "pytorch_lora_weights.safetensors"
    if not f.exists():
        return None
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(f)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0  # absent, or a half-written last line


def _train(cfg: Path, out: Path, resume: bool, env: dict, kill: tuple[int, float] | float | None):
    """Run one `fluxlab train`. `kill`: None (run to the end), seconds (SIGKILL after that long), or
    (step, jitter): SIGKILL `jitter` seconds after metrics.jsonl shows `step` (lands in steps,
    checkpoint saves, retention, the final save and plotting). Returns (rc, stderr, the step this
    process had reached when killed: 0 while it was still starting up)."""
    import tempfile

    cmd = [sys.executable, "-m", "fluxlab", "train", str(cfg), "--set", f"output_dir={out}"]
    if resume:
        cmd += ["--resume", "latest"]
    with tempfile.TemporaryFile("w+") as errf:  # a file, not a pipe: a full pipe would stall the child
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errf, text=True)
        at = None
        if isinstance(kill, tuple):
            step, jitter = kill
            while proc.poll() is None and _last_step(out) < step:
                time.sleep(0.01)
            time.sleep(jitter)
        elif kill is not None:
            try:
                proc.wait(timeout=kill)
            except subprocess.TimeoutExpired:
                pass
        if kill is not None and proc.poll() is None:
            try:  # this process has not touched metrics.jsonl yet: it was still starting up
                fresh = (out / "metrics.jsonl").stat().st_mtime >= t0
            except OSError:
                fresh = False
            at = _last_step(out) if fresh else 0
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=600)
        errf.seek(0)
        return proc.returncode, errf.read(), at


def write_config(work: Path, steps: int, workers: int = 0) -> Path:
    import yaml

    data = work / "shapes"
    if not data.exists():
        from fluxlab.data import make_shapes_dataset

        make_shapes_dataset(data, n=16, seed=0, size=64)
    base = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg = work / "campaign.yaml"
    cfg.write_text(yaml.safe_dump({**base, **SETTINGS, "data": str(data), "steps": steps, "num_workers": workers}))
    return cfg


def campaign(work: Path, *, kills: int, per_chain: int = 6, steps: int = 10, max_delay: float = 8.0,
             seed: int = 0, workers: int = 0, log=print) -> dict:
    """Kill chains (up to `per_chain` SIGKILLs each, then a resume to the end) until `kills`
    SIGKILLs have landed; return the counts (see module doc)."""
    from fluxlab import checkpoints

    work.mkdir(parents=True, exist_ok=True)
    cfg = write_config(work, steps, workers)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    rng = random.Random(seed)
    ref = work / "reference"  # a caller may have trained it already (same config, uninterrupted)
    if not _lora_sha(ref):
        rc, err, _ = _train(cfg, ref, False, env, None)
        assert rc == 0, err[-2000:]
    want = _lora_sha(ref)
    counts = {"kills": 0, "chains": 0, "runs_completed_before_their_kill": 0, "resumes": 0, "corrupt_loads": 0,
              "failed_resumes": 0, "checkpoint_loads_checked": 0, "kills_that_left_hidden_temps": 0,
              "leftovers": 0, "lora_mismatches": 0, "kills_by_phase": {}}
    while counts["kills"] < kills:
        c = counts["chains"]
        counts["chains"] += 1
        out = work / f"chain{c}"
        started = done = False
        for _ in range(per_chain):
            if counts["kills"] >= kills:
                break
            # Mostly kills timed by training progress (steps, saves, retention, the final save); a
            # quarter at a random time, which mostly lands in start-up.
            kill = (rng.uniform(0.3, max_delay) if rng.random() < 0.25
                    else (min(steps, (_last_step(out) if started else 0) + rng.randint(1, 4)), rng.uniform(0.0, 0.4)))
            rc, err, at = _train(cfg, out, started, env, kill)
            counts["resumes"] += started
            started = True
            if rc == 0:  # finished before its kill: the chain ends with this run
                counts["runs_completed_before_their_kill"] += 1
                done = True
                break
            if rc != -signal.SIGKILL:
                counts["failed_resumes"] += 1
                log(f"chain {c}: run exited {rc}: {err[-1500:]}")
                continue
            counts["kills"] += 1
            where = ("start-up (no step yet)" if not at else "after the last step (final save)" if at >= steps
                     else "during training")
            counts["kills_by_phase"][where] = counts["kills_by_phase"].get(where, 0) + 1
            counts["kills_that_left_hidden_temps"] += bool(_hidden_leftovers(out))
            for _, p in checkpoints.list_checkpoints(out / "checkpoints"):
                counts["checkpoint_loads_checked"] += 1
                try:
                    checkpoints.load_checkpoint(p)
                except checkpoints.CheckpointError as e:
                    counts["corrupt_loads"] += 1
                    log(f"chain {c}: corrupt visible checkpoint after a kill: {e}")
            if "skipping" in err:
                counts["corrupt_loads"] += 1
                log(f"chain {c}: a resume skipped a checkpoint: {err[-1500:]}")
        if not done:
            rc, err, _ = _train(cfg, out, started, env, None)  # the last resume runs to the end
            counts["resumes"] += started
            if rc != 0:
                counts["failed_resumes"] += 1
                log(f"chain {c}: final run exited {rc}: {err[-1500:]}")
            if "skipping" in err:
                counts["corrupt_loads"] += 1
        left = _hidden_leftovers(out)
        counts["leftovers"] += len(left)
        same = _lora_sha(out) == want
        counts["lora_mismatches"] += not same
        summary = json.loads((out / "train_summary.json").read_text())
        if not Path(summary["checkpoint_path"]).exists():
            log(f"chain {c}: train_summary.json names a missing checkpoint {summary['checkpoint_path']}")
            counts["failed_resumes"] += 1
        log(f"chain {c}: kills so far {counts['kills']}, leftovers {left}, LoRA {'equal' if same else 'DIFFERENT'}")
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--per-chain", type=int, default=6)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--max-delay", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the runs")
    ap.add_argument("--work", default="runs/fault_campaign")
    a = ap.parse_args()
    os.environ.setdefault("FLUXLAB_HOME", str(Path(a.work).resolve() / "home"))
    t0 = time.time()
    counts = campaign(Path(a.work).resolve(), kills=a.kills, per_chain=a.per_chain, steps=a.steps,
                      max_delay=a.max_delay, seed=a.seed, workers=a.workers)
    counts["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(counts))
    bad = counts["corrupt_loads"] + counts["failed_resumes"] + counts["leftovers"] + counts["lora_mismatches"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
