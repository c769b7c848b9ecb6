"""Validation targets: a researcher's own target validates without editing fluxlab, and a fast path
that never ran reads did-not-run, for every built-in target and for an external one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from examples import my_gelu
from fluxlab import bench, targets

CPU = torch.device("cpu")


def _verdict(T, dtype=torch.float32, seed=0, repeats=6):
    args = T.inputs(T.default_shapes[0], CPU, dtype, seed)
    m, c = T.measure(args, repeats=repeats, warmup=1, device=CPU)
    return m, c


def test_motivating_case_a_fast_path_that_silently_takes_the_old_path_did_not_run():
    # bf16 input: my_fast_gelu silently falls back to F.gelu, the baseline itself.
    for seed in range(3):
        m, c = _verdict(my_gelu.T, torch.bfloat16, seed)
        assert c.verdict == "did-not-run", c.reason
        assert "fluxlab_example::fast_gelu" in m.evidence["candidate"].reason
    # fp32 input: the fast path really runs, and the verdict is a timing verdict (whatever it says).
    m, c = _verdict(my_gelu.T, torch.float32, repeats=8)
    assert m.evidence["candidate"].ran and m.evidence["candidate"].kernel_names == ["fluxlab_example::fast_gelu"]
    assert c.verdict not in ("did-not-run", "unverified") and c.timing_verdict == c.verdict


def test_external_target_with_counters_and_resolve_by_import_path():
    hits = {"my.fast": 0}

    def fast(x):
        hits["my.fast"] += 1
        return x * 2

    T = targets.define("double", make_inputs=my_gelu.make, candidate=fast, baselines={"mul": lambda x: x + x},
                       counters=lambda: dict(hits), default_shapes=((8, 8),))
    m, c = _verdict(T)
    assert m.evidence["candidate"].ran and m.evidence["candidate"].counters == {"my.fast": 6 * m.calls_per_sample["candidate"]}
    lazy = targets.define("lazy", make_inputs=my_gelu.make, candidate=lambda x: x + x, baselines={"mul": lambda x: x * 2},
                          counters=lambda: dict(hits), default_shapes=((8, 8),))
    assert _verdict(lazy)[1].verdict == "did-not-run"
    assert targets.resolve("examples.my_gelu:T") is my_gelu.T
    with pytest.raises(KeyError, match="not a Target"):
        targets.resolve("examples.my_gelu:make")
    with pytest.raises(KeyError, match="cannot import"):
        targets.resolve("examples.no_such_module:T")
    with pytest.raises(ValueError, match="kernels=.*counters="):
        targets.define("blind", make_inputs=my_gelu.make, candidate=F.gelu, baselines={"eager": F.gelu})


def test_correctness_check_catches_a_wrong_fast_path():
    wrong = targets.define("wrong_gelu", make_inputs=my_gelu.make, candidate=lambda x: F.gelu(x, approximate="tanh"),
                           baselines={"eager": F.gelu}, kernels=[r"aten::gelu"])
    bad = wrong.check((64, 256), CPU, torch.float32)
    assert not bad["ok"] and bad["max_abs_err"] > bad["bound"]
    assert my_gelu.T.check((64, 256), CPU, torch.float32)["ok"]


CPU_TARGETS = [n for n, T in targets.TARGETS.items() if T.available(CPU)[0]]


def test_builtin_targets_cover_every_fluxlab_fast_path():
    assert set(targets.TARGETS) == {"rope", "qk_norm_rope", "adaln", "adaln.gated", "sparse_delta", "attention",
                                    "position_ids", "text_embeddings", "latents", "compile"}
    assert "attention" not in CPU_TARGETS  # cuDNN: checked by `make test-gpu`


@pytest.mark.parametrize("name", CPU_TARGETS)
def test_planted_disabled_fast_path_is_did_not_run_for_every_builtin_target(name, monkeypatch):
    T = targets.TARGETS[name]
    monkeypatch.setenv("FLUXLAB_DISABLE", name.split(".")[0])
    for seed in range(2):
        m, c = _verdict(T, seed=seed, repeats=5)
        assert c.verdict == "did-not-run", (name, c.verdict, m.evidence["candidate"].reason)
    assert T.check(T.default_shapes[0], CPU, torch.float32)["ok"]


@pytest.mark.parametrize("name", ["rope", "adaln.gated", "sparse_delta", "position_ids", "latents"])
def test_enabled_builtin_targets_run_and_get_a_timing_verdict(name):
    m, c = _verdict(targets.TARGETS[name], repeats=6)
    assert m.evidence["candidate"].ran, m.evidence["candidate"].reason
    assert c.verdict in bench.VERDICTS and c.verdict not in ("did-not-run", "unverified")


def test_disable_names_are_validated_by_one_parser(monkeypatch):
    from fluxlab import kernels

    monkeypatch.setenv("FLUXLAB_DISABLE", "compile,rope")
    assert targets.TARGETS["compile"].disabled() and kernels.disabled() == {"rope"}
    monkeypatch.setenv("FLUXLAB_DISABLE", "compiel")
    with pytest.raises(ValueError, match="compiel"):
        targets.TARGETS["compile"].disabled()


def test_cache_targets_encode_with_the_model_they_are_given(home):
    """use_model swaps the pipeline the cache targets encode with: a FLUX folder loads without its
    transformer, the fast path still hits, and its output still equals the encoder's own."""
    from fluxlab import models

    folder = str(models.tiny_pipeline_path())
    try:
        targets.use_model(folder)
        T = targets.get("text_embeddings")
        cache, caption = T.inputs((16,), torch.device("cpu"), torch.float32, 0)
        assert cache.pipe.transformer is None and cache.pipe.text_encoder_2 is not None
        assert cache.max_sequence_length == 16 and targets._STATE["model"] == folder
        assert T.check((16,), torch.device("cpu"), torch.float32, 0)["ok"]
        m, _ = T.measure(T.inputs((16,), torch.device("cpu"), torch.float32, 0), repeats=3, warmup=1,
                         device=torch.device("cpu"))
        assert m.evidence["candidate"].ran
    finally:
        targets.use_model("tiny")
    assert "pipe" not in targets._STATE and targets._STATE["model"] == "tiny"
