"""DDP through torchrun: 2 processes on the gloo backend (CPU). Ranks end with identical LoRA,
rank 0 alone writes, and `--resume latest` works under DDP."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fluxlab import checkpoints

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "fluxlab", "train", str(cfg), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    from fluxlab import models
    from fluxlab.data import make_shapes_dataset

    base = tmp_path_factory.getbasetemp()
    home = os.environ.get("FLUXLAB_HOME") or str(base / "fluxlab_home")
    os.environ["FLUXLAB_HOME"] = home
    models.tiny_pipeline_path()  # build once here, not racing in two ranks
    shapes = make_shapes_dataset(base / "shapes16", n=16, seed=0, size=64)
    return shapes, tmp_path_factory.mktemp("ddp")


def test_ddp_two_ranks_on_gloo_agree_rank0_writes_and_resume_works(setup_dirs):
    shapes, tmp = setup_dirs
    out = tmp / "run"
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        **yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()),
        "data": str(shapes), "output_dir": str(out), "device": "cpu", "num_workers": 0, "progress": False,
        "max_sequence_length": 16, "batch_size": 2, "rank": 4, "log_every": 1, "lr_warmup_steps": 0,
        "checkpoint_every": 0, "validation_every": 0, "steps": 3}))

    first = _torchrun(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    digests = summary["lora_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]       # gradients were all-reduced
    writes = summary["writes_per_rank"]
    assert writes[1] == [] and any(w.endswith("pytorch_lora_weights.safetensors") for w in writes[0])
    # Had rank 1 appended metrics too, every step would appear twice.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    ckpt = checkpoints.load_checkpoint(out / "checkpoints" / "step_3")
    assert ckpt.meta["world_size"] == 2 and len(ckpt.state["rng_per_rank"]) == 2
    assert ckpt.state["sampler"]["world_size"] == 2

    second = _torchrun(cfg, "--set", "steps=5", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step_3 at step 3" in second.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["start_step"] == 3 and summary["steps_done"] == 5
    digests = summary["lora_sha256_per_rank"]
    assert digests[0] == digests[1] != json.loads(json.dumps(first and ""))  # ranks agree after resume
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    checkpoints.verify_checkpoint(out / "checkpoints" / "step_5")
