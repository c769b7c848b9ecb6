"""Fault injection, real tiny training runs: a diverging run stops with a named step and writes
nothing from it; an earlier run's folder is refused, moved aside by --overwrite and never
deleted; hashed-but-unusable checkpoints fall back under `--resume latest`; a signal in each phase
ends cleanly with 130/143 and one message; kill -9 at random points (a CI sample of
tests/fault_campaign.py) loses nothing and leaves nothing behind."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save

from fluxlab import checkpoints
from fluxlab.checkpoints import CheckpointError
from fluxlab.cli import main
from fluxlab.config import ConfigError, load_config
from fluxlab.trainer import LORA_FILE, RUN_MARKER, Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"num_workers": 0, "progress": False, "max_sequence_length": 16, "batch_size": 2, "rank": 4,
            "device": "cpu", "log_every": 1, "lr_warmup_steps": 0, "validation_every": 0}


def _cfg(shapes, out, **kw):
    return load_config(ROOT / "configs" / "tiny.yaml", {k: str(v) for k, v in
                                                         {**SETTINGS, "data": shapes, "output_dir": out, **kw}.items()})


def _yaml(tmp_path, shapes, out, **kw) -> Path:
    base = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump({**base, **SETTINGS, "data": str(shapes), "output_dir": str(out), **kw}))
    return path


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _rehash(path: Path) -> None:
    mpath = path / checkpoints.MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    for name in checkpoints.CHECKPOINT_FILES:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    mpath.write_text(json.dumps(manifest))


# --- non-finite guard -----------------------------------------------------------------------------
def test_a_diverging_run_stops_names_the_step_and_writes_nothing_from_it(pipe, shapes, tmp_path):
    out = tmp_path / "nan"
    cfg = _cfg(shapes, out, steps=5, learning_rate=1e30, max_grad_norm=0, checkpoint_every=1, keep_last=0)
    tr = Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    with pytest.raises(TrainingDiverged, match=r"non-finite .* at step \d+") as e:
        tr.train()
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    assert 1 <= bad_step <= 5
    saved = [s for s, _ in checkpoints.list_checkpoints(out / "checkpoints")]
    assert all(s < bad_step for s in saved)  # nothing from the bad step or after it
    for _, p in checkpoints.list_checkpoints(out / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in checkpoints.load_checkpoint(p).tensors.values())
    assert not (out / LORA_FILE).exists() and not (out / "train_summary.json").exists()


def test_the_cli_exits_4_with_one_line_when_training_diverges(shapes, home, tmp_path, capsys):
    out = tmp_path / "nan-cli"
    rc = main(["train", str(_yaml(tmp_path, shapes, out, steps=4, learning_rate=1e30, max_grad_norm=0))])
    assert rc == 4
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fluxlab")]
    assert err[-1].startswith("fluxlab: error: training diverged: non-finite") and "step" in err[-1]
    assert not (out / LORA_FILE).exists()


# --- output folders -------------------------------------------------------------------------------
def test_an_earlier_run_is_refused_then_moved_aside_by_overwrite_never_deleted(pipe, shapes, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(shapes, out, steps=2, checkpoint_every=1), pipe=copy.deepcopy(pipe)).setup().train()
    assert (out / RUN_MARKER).is_file()
    before = _tree(out)
    capsys.readouterr()
    rc = main(["train", str(_yaml(tmp_path, shapes, out, steps=3))])
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume latest" in err and "--overwrite" in err
    assert _tree(out) == before
    # --overwrite: the earlier run moves aside whole; the new run's final checkpoint survives
    # retention although the old one had more steps.
    tr = Trainer(_cfg(shapes, out, steps=1, keep_last=1), pipe=copy.deepcopy(pipe), overwrite=True).setup()
    res = tr.train()
    (aside,) = tmp_path.glob("run.replaced-*")
    assert _tree(aside) == before
    assert res.checkpoint_path == out / "checkpoints" / "step_1" and res.checkpoint_path.exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert Path(summary["checkpoint_path"]).exists()
    # and --resume continues this folder's run, not the old one
    tr = Trainer(_cfg(shapes, out, steps=2, keep_last=1), pipe=copy.deepcopy(pipe), resume="latest").setup()
    assert tr.global_step == 1


def test_leftovers_are_cleaned_at_start_and_foreign_files_survive_retention(pipe, shapes, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(shapes, out, steps=2, checkpoint_every=1, keep_last=1), pipe=copy.deepcopy(pipe)).setup().train()
    ck = out / "checkpoints"
    foreign = ck / "step_1"  # pruned earlier; now a user's own folder of that name
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (ck / ".del-step_0-0123abcd").mkdir()          # a kill during retention
    (ck / ".old-step_2-0123abcd").mkdir()          # a kill while replacing a step
    (out / ".metrics.jsonl.abc123.tmp").write_text("half")  # a kill during an atomic write
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                 # a kill while appending a row
    capsys.readouterr()
    tr = Trainer(_cfg(shapes, out, steps=4, checkpoint_every=1, keep_last=1), pipe=copy.deepcopy(pipe),
                 resume="latest").setup()
    tr.train()
    err = capsys.readouterr().err
    assert "removed 3 leftover(s)" in err and "skipping corrupt checkpoint" not in err.split("resumed")[-1]
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not [p for p in list(out.glob(".*")) + list(ck.glob(".*")) if p.name != RUN_MARKER]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# --- hashed but unusable checkpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(pipe, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    Trainer(_cfg(shapes, out, steps=4, checkpoint_every=2, keep_last=3), pipe=copy.deepcopy(pipe)).setup().train()
    return out


def _wrong_shape_adapter(p: Path):
    tensors = load_file(str(p / checkpoints.TENSORS_FILE))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    (p / checkpoints.TENSORS_FILE).write_bytes(save(tensors))


def _missing_adapter_tensor(p: Path):
    tensors = load_file(str(p / checkpoints.TENSORS_FILE))
    tensors.pop(sorted(tensors)[0])
    (p / checkpoints.TENSORS_FILE).write_bytes(save(tensors))


def _optimizer_of_another_model(p: Path):
    import io

    state = torch.load(p / checkpoints.STATE_FILE, weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = [0]
    buf = io.BytesIO()
    torch.save(state, buf)
    (p / checkpoints.STATE_FILE).write_bytes(buf.getvalue())


def _meta_step_disagrees(p: Path):
    meta = json.loads((p / checkpoints.META_FILE).read_text())
    (p / checkpoints.META_FILE).write_text(json.dumps({**meta, "step": 3}))


@pytest.mark.parametrize("tamper,bad_file", [
    (_wrong_shape_adapter, checkpoints.TENSORS_FILE), (_missing_adapter_tensor, checkpoints.TENSORS_FILE),
    (_optimizer_of_another_model, checkpoints.STATE_FILE), (_meta_step_disagrees, checkpoints.META_FILE),
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_resume_latest_falls_back_past_a_hashed_but_unusable_checkpoint(pipe, shapes, two_checkpoints, tmp_path,
                                                                        capsys, tamper, bad_file):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    bad = out / "checkpoints" / "step_4"
    tamper(bad)
    _rehash(bad)
    capsys.readouterr()
    tr = Trainer(_cfg(shapes, out, steps=4, checkpoint_every=2, keep_last=3), pipe=copy.deepcopy(pipe),
                 resume="latest").setup()
    assert tr.global_step == 2
    err = capsys.readouterr().err
    assert f"checkpoint {bad}" in err and str(bad / bad_file) in err and "resumed from" in err
    # The same checkpoint named explicitly: one line naming the file, exit 2, no traceback.
    rc = main(["train", str(_yaml(tmp_path, shapes, tmp_path / "other", steps=6, checkpoint_every=2)),
               "--resume", str(bad)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(bad / bad_file) in err and "Traceback" not in err


def test_resume_with_a_different_config_is_a_config_error_not_a_fallback(pipe, shapes, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    with pytest.raises(ConfigError, match="rank"):
        Trainer(_cfg(shapes, out, steps=6, rank=8), pipe=copy.deepcopy(pipe), resume="latest").setup()


def test_resume_latest_with_no_usable_checkpoint_refuses_instead_of_starting_over(pipe, shapes, two_checkpoints,
                                                                                 tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for _, p in checkpoints.list_checkpoints(out / "checkpoints"):
        _meta_step_disagrees(p)
        _rehash(p)
    with pytest.raises(CheckpointError, match="can be resumed"):
        Trainer(_cfg(shapes, out, steps=6), pipe=copy.deepcopy(pipe), resume="latest").setup()


# --- signals in every phase -------------------------------------------------------------------------------
_SIGNAL_CHILD = textwrap.dedent("""
    import os, signal, sys
    from fluxlab import trainer as T
    from fluxlab.cli import main
    phase, sig, cfg = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3]
    fired = []
    def hook(name, when=lambda self: True):
        real = getattr(T.Trainer, name)
        def wrapped(self, *a, **k):
            if not fired and when(self):
                fired.append(1)
                os.killpg(os.getpgid(0), sig)  # the whole group, DataLoader workers included
                if phase == "loop-twice":
                    os.killpg(os.getpgid(0), sig)  # the impatient second Ctrl-C
            return real(self, *a, **k)
        setattr(T.Trainer, name, wrapped)
    {"start-up": lambda: hook("_load_pipeline"), "loop": lambda: hook("step", lambda s: s.global_step == 2),
     "loop-twice": lambda: hook("step", lambda s: s.global_step == 2),
     "final-save": lambda: hook("save_lora"), "plotting": lambda: hook("_plot_curves")}[phase]()
    sys.exit(main(["train", cfg]))
""")


@pytest.mark.parametrize("phase,sig,workers", [
    ("start-up", "SIGTERM", 0), ("loop", "SIGTERM", 2), ("loop-twice", "SIGINT", 2), ("final-save", "SIGTERM", 2),
    ("plotting", "SIGINT", 2),
])
def test_a_signal_in_each_phase_ends_cleanly_with_128_plus_the_signal(shapes, home, tmp_path, phase, sig, workers):
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, shapes, out, steps=4, checkpoint_every=0, num_workers=workers)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_CHILD, phase, sig, str(cfg)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    err = proc.stderr
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    assert "Traceback" not in err
    if phase == "start-up":
        assert f"{sig} received during start-up" in err
        assert not (out / "checkpoints").exists()
        return
    assert err.count(f"{sig} received") == 1, err[-3000:]  # once: from the main process alone
    if phase == "loop-twice":  # aborted at once, mid-step: nothing half-written, nothing claimed
        assert f"{sig} again: aborted at once at step 2" in err and "no checkpoint of this run" in err
        assert not (out / "checkpoints").exists() and not (out / LORA_FILE).exists()
        assert [p.name for p in out.glob(".*")] == [RUN_MARKER]
        return
    path, skipped = checkpoints.latest_checkpoint(out / "checkpoints")
    assert path is not None and not skipped
    if phase == "loop":  # the step in flight finishes, its checkpoint is written, no final LoRA
        assert checkpoints.load_checkpoint(path).step == 3 and not (out / LORA_FILE).exists()
        assert "resume with:" in err
    else:  # the final save finished: the run is complete
        assert checkpoints.load_checkpoint(path).step == 4 and (out / LORA_FILE).exists()
        assert json.loads((out / "train_summary.json").read_text())["steps_done"] == 4
        assert "the run is complete" in err


# --- kill -9 at random points (CI sample of the campaign) ---------------------------------------------------
def test_three_random_kills_lose_nothing_and_leave_nothing(pipe, home, tmp_path):
    spec = importlib.util.spec_from_file_location("fault_campaign", ROOT / "tests" / "fault_campaign.py")
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    # The uninterrupted reference, in this process (the campaign's CLI runs must match it bitwise).
    cfg = yaml.safe_load(campaign.write_config(tmp_path, steps=3).read_text())
    ref = load_config(None, {k: str(v) if not isinstance(v, list) else ",".join(v) for k, v in
                             {**cfg, "output_dir": tmp_path / "reference"}.items()})
    Trainer(ref, pipe=copy.deepcopy(pipe)).setup().train()
    counts = campaign.campaign(tmp_path, kills=3, per_chain=3, steps=3, max_delay=4.5, seed=1, log=print)
    assert counts["kills"] == 3
    assert counts["corrupt_loads"] == counts["failed_resumes"] == counts["leftovers"] == 0, counts
    assert counts["lora_mismatches"] == 0, counts


def test_lr_find_writes_beside_a_run_and_a_run_may_follow_it(pipe, shapes, tmp_path):
    from fluxlab.trainer import lr_find

    out = tmp_path / "run"
    res = lr_find(_cfg(shapes, out, lr_find_steps=3), pipe=copy.deepcopy(pipe))
    assert (out / "lr_find.json").exists() and (out / RUN_MARKER).exists() and len(res.lrs) >= 1
    Trainer(_cfg(shapes, out, steps=1), pipe=copy.deepcopy(pipe)).setup().train()  # lr-find is not a run
    assert (out / LORA_FILE).exists()
    lr_find(_cfg(shapes, out, lr_find_steps=3), pipe=copy.deepcopy(pipe))  # and it never touches one
    assert (out / LORA_FILE).exists() and (out / "train_summary.json").exists()
