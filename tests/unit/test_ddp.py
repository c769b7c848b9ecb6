"""DDP: 2 processes on the gloo backend (CPU), each running `fluxlab train` with the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Ranks end with identical LoRA,
rank 0 alone writes, and `--resume latest` works under DDP.

The processes are forked from the test process (torch.multiprocessing, start_method="fork") so
they skip re-importing torch and diffusers, which costs ~10 s per process on a small CI box.
"""

import json
import os
import socket
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


def _rank_main(rank: int, port: int, argv: list[str], log_dir: str) -> None:
    import torch

    from fluxlab.cli import main

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    # Each rank's stderr to its own file, as torchrun's --log-dir would.
    fd = os.open(os.path.join(log_dir, f"rank{rank}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    rc = main(argv)
    assert rc == 0, f"rank {rank}: fluxlab train exited {rc}"


def _launch(cfg: Path, log_dir: Path, *extra: str) -> str:
    import torch.multiprocessing as mp

    log_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(_free_port(), ["train", str(cfg), *extra], str(log_dir)),
                       nprocs=2, join=True, start_method="fork")
    return (log_dir / "rank0.err").read_text()


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

    _launch(cfg, tmp / "log1")
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

    err = _launch(cfg, tmp / "log2", "--set", "steps=5", "--resume", "latest")
    assert "resumed from" in err and "step_3 at step 3" in err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["start_step"] == 3 and summary["steps_done"] == 5
    assert summary["lora_sha256_per_rank"][0] == summary["lora_sha256_per_rank"][1] != digests[0]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    checkpoints.verify_checkpoint(out / "checkpoints" / "step_5")
