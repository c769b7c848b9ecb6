"""TrainConfig: YAML + --set casting, unknown keys, invalid combinations (no model is loaded)."""

from pathlib import Path

import pytest
import torch
import yaml

from fluxlab.cli import main
from fluxlab.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _yaml(tmp_path, **values) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(values))
    return p


def test_unknown_yaml_key_is_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate'.*did you mean 'learning_rate'"):
        load_config(_yaml(tmp_path, lerning_rate=1e-4))


def test_unknown_set_key_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'batchsize' in --set; did you mean 'batch_size'"):
        load_config(TINY, {"batchsize": "2"})


def test_cli_exits_nonzero_naming_the_unknown_key(tmp_path, capsys):
    rc = main(["train", str(TINY), "--set", "chekpoint_every=5", "--set", f"output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "chekpoint_every" in err and "did you mean 'checkpoint_every'" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_set_values_are_cast_to_the_field_type():
    cfg = load_config(TINY, {"steps": "7", "learning_rate": "3e-4", "gradient_checkpointing": "true",
                             "progress": "no", "target_modules": "attn.to_q, attn.to_k", "guidance_scale": "2",
                             "model": "tiny", "lora_dropout": "0.25"})
    assert cfg.steps == 7 and isinstance(cfg.steps, int)
    assert cfg.learning_rate == pytest.approx(3e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.gradient_checkpointing is True and cfg.progress is False
    assert cfg.target_modules == ["attn.to_q", "attn.to_k"]
    assert cfg.guidance_scale == 2.0 and isinstance(cfg.guidance_scale, float)
    assert cfg.lora_dropout == 0.25


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-4 as the string "1e-4"; the config must still see a number.
    assert load_config(_yaml(tmp_path, learning_rate="1e-4")).learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("key,value", [("steps", "ten"), ("steps", "2.5"), ("progress", "maybe"),
                                       ("learning_rate", "fast"), ("batch_size", "true")])
def test_bad_values_name_the_field(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: expected"):
        load_config(None, {key: value})


@pytest.mark.parametrize("overrides,field", [
    ({"resolution": "72"}, "resolution"),
    ({"steps": "0"}, "steps"),
    ({"timestep_sampling": "uniform"}, "timestep_sampling"),
    ({"lr_find_min": "2", "lr_find_max": "1"}, "lr_find_min"),
    ({"adapter": "dora"}, "adapter"),
    ({"lora_dropout": "1.0"}, "lora_dropout"),
    ({"compile_mode": "max_autotune"}, "compile_mode"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        load_config(None, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusals")
@pytest.mark.parametrize("overrides,field", [
    ({"mixed_precision": "bf16"}, "mixed_precision"),
    ({"quantize": "nf4"}, "quantize"),
    ({"quantize": "int8", "device": "cpu"}, "quantize"),
])
def test_gpu_only_settings_are_refused_on_the_cpu(overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}: .*(GPU|CUDA)"):
        load_config(None, overrides)


def test_dataset_too_small_for_one_optimizer_step_names_the_field():
    cfg = TrainConfig(batch_size=4, gradient_accumulation=3, device="cpu")
    cfg.check_dataset_size(12)  # exactly one step fits
    with pytest.raises(ConfigError, match=r"^gradient_accumulation: .*4.*3.*= 12 images.*has 11"):
        cfg.check_dataset_size(11)
    with pytest.raises(ConfigError, match="processes \\(2\\) = 24"):
        cfg.check_dataset_size(12, world_size=2)
    held = TrainConfig(batch_size=4, validation_every=5, validation_size=2, device="cpu")
    with pytest.raises(ConfigError, match="held out for validation"):
        held.check_dataset_size(5)


def test_dtype_per_device():
    cfg = TrainConfig(device="cpu")
    assert cfg.compute_dtype(torch.device("cpu")) == torch.float32
    assert TrainConfig(device="cpu", mixed_precision="no").compute_dtype(torch.device("cpu")) == torch.float32


def test_tiny_yaml_has_the_required_keys_each_settable():
    raw = yaml.safe_load(TINY.read_text())
    required = ["model", "data", "output_dir", "steps", "seed", "batch_size", "resolution", "rank",
                "learning_rate", "checkpoint_every", "keep_last", "cache_dir"]
    assert set(required) <= set(raw)
    examples = {"model": "tiny", "data": "x/y", "output_dir": "o", "steps": "9", "seed": "3", "batch_size": "2",
                "resolution": "32", "rank": "2", "learning_rate": "0.5", "checkpoint_every": "4",
                "keep_last": "5", "cache_dir": "c"}
    cfg = load_config(TINY, examples)
    for key, text in examples.items():
        assert str(getattr(cfg, key)) == text or getattr(cfg, key) == float(text), key
    assert load_config(ROOT / "configs" / "flux1-dev.yaml", {"device": "cpu", "mixed_precision": "no"}).resolution == 1024


def test_kernels_and_compile_together_are_refused_naming_the_field():
    from fluxlab.config import config_from_dict

    with pytest.raises(ValueError, match="use_kernels"):
        config_from_dict({"use_kernels": True, "compile": True})
