"""From `fluxlab train` to using what it trained: `fluxlab generate --lora` and
`InferenceSession(lora=...)` load the LoRA through stock `load_lora_weights`."""

import copy
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fluxlab.cli import main
from conftest import tiny_lora_config
from fluxlab.inference import InferenceSession
from fluxlab.trainer import LORA_FILE, Trainer

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a large red circle at the top left on a white background"


@pytest.fixture(scope="module")
def lora_dir(pipe, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("user_path_lora")
    cfg = tiny_lora_config(shapes, out, steps=6, learning_rate="3e-2")
    Trainer(cfg, pipe=copy.deepcopy(pipe)).setup().train()
    assert (out / LORA_FILE).is_file()
    return out


def _image(**kw):
    s = InferenceSession("tiny", "cpu", torch.float32, steps=2, size=32, max_sequence_length=64, **kw)
    return s.generate(PROMPT, 0)[0]  # [3, 32, 32] in [0, 1]


def test_session_lora_changes_the_image_and_scale_zero_gives_the_base(lora_dir, home):
    base = _image()
    tuned = _image(lora=lora_dir)
    off = _image(lora=lora_dir / LORA_FILE, lora_scale=0.0)   # a file path works too
    assert (tuned - base).abs().max() > 1e-2
    assert torch.allclose(off, base, atol=1e-6, rtol=0), (off - base).abs().max()


def test_session_refuses_a_missing_lora_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA there"):
        InferenceSession("tiny", "cpu", lora=tmp_path / "nothing")


def test_generate_cli_with_lora(lora_dir, home, tmp_path, capsys):
    def run(*extra):
        out = tmp_path / f"img{len(list(tmp_path.iterdir()))}.png"
        rc = main(["generate", "--prompt", PROMPT, "--size", "32", "--steps", "2", "--device", "cpu",
                   "--max-sequence-length", "64", "--out", str(out), *extra])
        return rc, out

    rc, base = run()
    assert rc == 0
    rc, tuned = run("--lora", str(lora_dir))
    assert rc == 0 and "LoRA" in capsys.readouterr().out
    rc, off = run("--lora", str(lora_dir), "--lora-scale", "0")
    assert rc == 0
    px = {k: np.asarray(Image.open(p), dtype=np.int16) for k, p in (("base", base), ("tuned", tuned), ("off", off))}
    assert np.abs(px["tuned"] - px["base"]).max() > 2
    assert np.array_equal(px["off"], px["base"])
    # A wrong path: one line naming it, exit 2, no image.
    missing = tmp_path / "nope"
    capsys.readouterr()
    rc, out = run("--lora", str(missing))
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# --- one dataset home ------------------------------------------------------------------------
SHAPES_CMD = re.compile(r"fluxlab data shapes (\S+)((?: --\w+ \d+)*)")


def test_one_dataset_home_in_readme_makefile_config_and_defaults():
    from fluxlab.config import TrainConfig

    home = TrainConfig(device="cpu").data
    tiny = (ROOT / "configs" / "tiny.yaml").read_text()
    assert yaml.safe_load(tiny)["data"] == home
    demo = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    found = {}
    for name, text in (("Makefile demo", demo), ("configs/tiny.yaml", tiny),
                       ("README.md", (ROOT / "README.md").read_text()),
                       ("data/README.md", (ROOT / "data" / "README.md").read_text())):
        cmds = SHAPES_CMD.findall(text)
        assert cmds, f"{name} does not say how to make the dataset"
        found[name] = cmds
    # Every place makes the same folder with the same options, and it is the config's default.
    assert {c for cmds in found.values() for c in cmds} == {(home, " --n 64 --seed 0")}, found


def test_missing_dataset_error_prints_the_command_that_makes_it(tmp_path, capsys):
    missing = tmp_path / "shapes"
    rc = main(["train", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data={missing}", "--set",
               f"output_dir={tmp_path / 'out'}", "--set", "device=cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    (cmd,) = [" ".join(m) for m in SHAPES_CMD.findall(err)]
    assert str(missing) in cmd
    # Running exactly that command makes a dataset the trainer accepts.
    argv = shlex.split(SHAPES_CMD.search(err).group(0))[1:]
    assert main(argv) == 0
    assert main(["data", "validate", str(missing)]) == 0
    assert not (tmp_path / "out").exists()  # the failed run wrote nothing


def test_cache_stats_and_verify_default_to_the_folder_train_uses(lora_dir, home, capsys):
    from fluxlab.config import TrainConfig

    assert Path(TrainConfig(device="cpu").cache_dir) == home / "cache"  # where lora_dir's training cached
    capsys.readouterr()
    assert main(["cache", "stats"]) == 0
    stats = capsys.readouterr().out
    assert "latent" in stats and not any(" entries      0 " in line for line in stats.splitlines()), stats
    assert main(["cache", "verify"]) == 0
    checked = int(re.search(r"checked (\d+) entries", capsys.readouterr().out).group(1))
    assert checked > 0


@pytest.mark.slow
def test_inference_session_notebook_takes_the_lora(lora_dir, home, tmp_path):
    from fluxlab import notebook

    env = {"FLUXLAB_STORE": str(tmp_path / "store.db"), "FLUXLAB_HOME": str(home), "TRITON_INTERPRET": "1"}
    res = notebook.run("inference_session", "ci", {"lora": str(lora_dir), "lora_scale": "0.5"},
                       runs_dir=tmp_path / "runs", env=env)
    assert res.ok, res.error
    assert res.records and all(r["params"]["lora"] == str(lora_dir) and r["params"]["lora_scale"] == 0.5
                               for r in res.records)
