"""Fault injection, bad input: every user-caused fault is one named line on stderr, exit 2, no
traceback, and nothing written; internal bugs keep their traceback; output folders that are not
fluxlab's, or hold an earlier run, are refused with their files untouched."""

import hashlib
import os
from pathlib import Path

import pytest

from fluxlab import checkpoints, cli, errors, store
from fluxlab.cli import main
from fluxlab.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _tree(path: Path) -> dict[str, str]:
    """Every file under `path` with the SHA-256 of its bytes (the 'untouched' witness)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fluxlab: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# --- non-finite and out-of-range config values -----------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("learning_rate", "inf"), ("learning_rate", "nan"), ("guidance_scale", "nan"), ("guidance_scale", "-inf"),
    ("adam_epsilon", "0"), ("adam_beta2", "1.0"), ("adam_beta1", "-0.1"), ("logit_mean", "inf"),
    ("max_grad_norm", "nan"), ("weight_decay", "inf"), ("lora_alpha", "nan"), ("mode_scale", "nan"),
    ("lr_find_max", "inf"), ("guidance_scale", "-1"),
])
def test_non_finite_or_out_of_range_config_is_refused_before_anything_runs(tmp_path, capsys, key, value):
    out = tmp_path / "run"
    rc = main(["train", str(TINY), "--set", f"{key}={value}", "--set", f"output_dir={out}",
               "--set", f"data={tmp_path / 'no-data'}"])
    assert rc == 2
    _one_line_error(capsys, key)
    assert not out.exists()


# --- YAML ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,words", [
    ("steps: 3\nrank: [1,\n", ["YAML syntax error", "line"]),
    ("steps: 3\n  rank: 2\n", ["YAML syntax error", "line 2"]),
    ("steps: !!python/object/apply:os.system ['touch {marker}']\n", ["unsafe YAML tag", "nothing was run"]),
    ("!!python/object/new:os.system ['touch {marker}']\n", ["unsafe YAML tag"]),
    ("data: !!binary aGVsbG8=\n", ["data", "string"]),
])
def test_yaml_errors_and_unsafe_tags_are_one_line_and_run_nothing(tmp_path, capsys, text, words):
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text.format(marker=marker))
    assert main(["train", str(cfg)]) == 2
    _one_line_error(capsys, *words)
    assert not marker.exists()


def test_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("data: caf\xe9\n".encode("latin-1"))
    assert main(["train", str(cfg)]) == 2
    _one_line_error(capsys, str(cfg), "UTF-8")


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    _one_line_error(capsys, "nope.yaml", "not found")


# --- the error type --------------------------------------------------------------------------------------
def test_every_user_error_is_one_type_and_keeps_its_historical_base():
    from fluxlab.data import DatasetError

    assert cli.UserError is errors.UserError
    for cls, base in ((ConfigError, ValueError), (checkpoints.CheckpointError, ValueError),
                      (store.StoreError, RuntimeError), (DatasetError, ValueError)):
        assert issubclass(cls, errors.UserError) and issubclass(cls, base), cls


@pytest.mark.parametrize("exc", [ValueError("internal"), KeyError("internal"), TypeError("internal")])
def test_internal_bugs_keep_their_traceback(monkeypatch, tmp_path, exc):
    from fluxlab import data

    def buggy(args):
        raise exc

    monkeypatch.setattr(data, "validate_dataset", buggy)  # what `fluxlab data validate` calls
    with pytest.raises(type(exc)):
        main(["data", "validate", str(tmp_path)])


def test_a_bad_notebook_parameter_is_a_user_error(capsys):
    assert main(["notebook", "run", "no_such_notebook_xyz"]) == 2
    _one_line_error(capsys, "no_such_notebook_xyz")


# --- output folders -------------------------------------------------------------------------------------
@pytest.mark.parametrize("where,words", [
    ("/", ["filesystem root"]),
    ("~", ["home folder"]),
    ("", ["output_dir", "empty"]),
    ("   ", ["output_dir", "empty"]),
])
def test_root_home_and_empty_output_dirs_are_refused(capsys, tmp_path, where, words):
    rc = main(["train", str(TINY), "--set", f"output_dir={os.path.expanduser(where)}",
               "--set", f"data={tmp_path}"])
    assert rc == 2
    _one_line_error(capsys, *words)


def test_a_parent_of_home_is_refused(capsys, tmp_path):
    parent = Path.home().resolve().parent
    if parent == Path(parent.anchor):
        pytest.skip("home sits directly under the filesystem root (covered by the root case)")
    assert main(["train", str(TINY), "--set", f"output_dir={parent}", "--set", f"data={tmp_path}"]) == 2
    _one_line_error(capsys, "parent of your home folder")


def test_a_foreign_non_empty_folder_is_refused_and_untouched(capsys, tmp_path):
    foreign = tmp_path / "mine"
    (foreign / "checkpoints" / "step_1").mkdir(parents=True)
    (foreign / "checkpoints" / "step_1" / "notes.txt").write_text("my notes")
    (foreign / "config.yaml").write_text("my: own config\n")
    before = _tree(foreign)
    for extra in ([], ["--resume", "latest"], ["--overwrite"]):
        rc = main(["train", str(TINY), "--set", f"output_dir={foreign}", "--set", f"data={tmp_path}", *extra])
        assert rc == 2
        _one_line_error(capsys, str(foreign), "not created by fluxlab")
    assert _tree(foreign) == before and sorted(p.name for p in foreign.iterdir()) == ["checkpoints", "config.yaml"]


def test_a_file_as_output_dir_is_refused(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", str(TINY), "--set", f"output_dir={f}", "--set", f"data={tmp_path}"]) == 2
    _one_line_error(capsys, str(f), "not a folder")
    assert f.read_text() == "x"


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    rc = main(["train", str(TINY), "--set", f"output_dir={tmp_path / 'r'}", "--set", f"data={tmp_path}",
               "--resume", "latest", "--overwrite"])
    assert rc == 2
    _one_line_error(capsys, "--overwrite", "--resume")
