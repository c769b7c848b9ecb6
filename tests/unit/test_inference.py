"""InferenceSession on the tiny preset (CPU): determinism, prompt checks, preallocated output,
latency aggregation. Timings are never asserted; only plumbing and correctness."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fluxlab.inference import (InferenceSession, PromptTruncationWarning, check_prompt, robust_sigma,
                               summarize_latency)

SIZE = 32  # smallest size the tiny VAE (/8) and 2x2 packing allow beyond 16; keeps each generation fast
T5_MAX = 32


@pytest.fixture(scope="module")
def session():
    s = InferenceSession("tiny", "cpu", steps=1, size=SIZE, max_sequence_length=T5_MAX)
    s.load()
    return s


# --- determinism ---------------------------------------------------------------------------------
def test_same_seed_bit_identical_different_seed_differs(session):
    rep = session.determinism(seed=3, other_seed=4)
    assert rep.identical and rep.differs and rep.ok, rep.message
    assert rep.max_abs_diff_same_seed == 0.0


def test_determinism_reports_a_nondeterministic_generation(session, monkeypatch):
    # Plant non-determinism after the VAE: the check must notice and say so.
    real_decode = session.decode
    monkeypatch.setattr(session, "decode", lambda lat: real_decode(lat) + 1e-3 * torch.rand(1))
    rep = session.determinism(seed=3, other_seed=4)
    assert not rep.identical and not rep.ok
    assert rep.max_abs_diff_same_seed > 0
    assert "seed 3 twice gave different images" in rep.message


# --- prompts ---------------------------------------------------------------------------------------
TAIL = "and a green triangle"


def _warns(prompt, session, max_len=T5_MAX):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, msgs = check_prompt(prompt, session.pipe.tokenizer, session.pipe.tokenizer_2, max_len)
    assert [str(w.message) for w in caught if w.category is PromptTruncationWarning] == msgs
    return msgs


def test_long_prompt_warns_naming_dropped_text_for_clip_and_t5(session):
    prompt = "a red circle " * 40 + TAIL  # > 77 CLIP tokens and > 32 T5 tokens
    msgs = _warns(prompt, session)
    clip = [m for m in msgs if m.startswith("prompt is") and "CLIP drops" in m]
    t5 = [m for m in msgs if "T5 drops" in m]
    assert len(clip) == 1 and len(t5) == 1, msgs
    # What is dropped is the end of the prompt, and the message says so.
    assert clip[0].rstrip("'").endswith(TAIL) and t5[0].rstrip("'").endswith(TAIL)
    kept_clip = session.pipe.tokenizer(prompt, truncation=True, max_length=77).input_ids
    assert TAIL not in session.pipe.tokenizer.decode(kept_clip, skip_special_tokens=True)


def test_prompt_over_t5_only_warns_for_t5_and_short_prompt_is_silent(session):
    n_clip = lambda p: len(session.pipe.tokenizer(p).input_ids)  # noqa: E731
    n_t5 = lambda p: len(session.pipe.tokenizer_2(p).input_ids)  # noqa: E731
    mid = "a red circle " * 8 + TAIL
    assert n_clip(mid) <= 77 and n_t5(mid) > T5_MAX  # premise of the test
    msgs = _warns(mid, session)
    assert len(msgs) == 1 and "T5 drops" in msgs[0]
    assert _warns("a red circle", session) == []


def test_generate_warns_on_truncation(session):
    with pytest.warns(PromptTruncationWarning, match="CLIP drops"):
        session.generate("a red circle " * 40 + TAIL, seed=0)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_a_clear_error(session, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        session.generate(prompt, seed=0)


@pytest.mark.parametrize("prompt", [None, 42, ["a red circle"], b"a red circle"])
def test_non_string_prompt_is_a_clear_error(session, prompt):
    with pytest.raises(TypeError, match="prompt must be a str"):
        session.generate(prompt, seed=0)


# --- preallocated output ---------------------------------------------------------------------------
def test_preallocated_output_is_written(session):
    out = torch.full((3, SIZE, SIZE), float("nan"))  # poison: any pixel left unwritten stays NaN
    image, _ = session.generate("a red circle", seed=5, out=out)
    assert image is out
    assert not torch.isnan(out).any()
    ref, _ = session.generate("a red circle", seed=5)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", [(3, SIZE, SIZE + 16), (SIZE, SIZE, 3), (1, 3, SIZE, SIZE)])
def test_preallocated_output_shape_mismatch_is_refused(session, shape):
    out = torch.full(shape, float("nan"))
    with pytest.raises(ValueError, match=r"out has shape"):
        session.generate("a red circle", seed=0, out=out)
    assert torch.isnan(out).all()  # refused before any write


# --- latency aggregation ---------------------------------------------------------------------------
def test_percentiles_are_exact_on_samples_with_known_percentiles():
    # 1..1001 shuffled: the q-th percentile (linear interpolation) is exactly 1 + 10*q.
    x = np.random.default_rng(0).permutation(np.arange(1, 1002, dtype=float))
    rep = summarize_latency(x)
    for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p99.9", 99.9)):
        assert rep.percentiles_s[name] == pytest.approx(1 + 10 * q, rel=1e-12)
    assert rep.samples_s == x.tolist() and rep.n == 1001


def test_planted_outlier_is_flagged_and_clean_samples_are_not():
    # Clean samples spread like a normal (sigma 0.01) but, by construction, within 2 sigma.
    clean = 1.0 + 0.01 * norm.ppf(np.linspace(0.025, 0.975, 40))
    np.random.default_rng(1).shuffle(clean)
    assert summarize_latency(clean).outliers == []
    planted = clean.copy()
    planted[17] = 1.5  # 50 sigma away
    assert summarize_latency(planted).outliers == [17]
    # With a plain std the outlier inflates sigma; the robust sigma stays near the true 0.01.
    assert robust_sigma(planted) < 0.02 < np.std(planted)


def test_latency_keeps_raw_samples_warmup_and_stages(session):
    rep = session.latency(["a red circle", "a blue square"], seeds=[0, 1, 2], warmup=1)
    assert rep.n == 3 and len(rep.warmup_s) == 1
    assert set(rep.stages_s) == {"encode", "denoise", "decode"}
    for k, v in rep.stages_s.items():
        assert len(v) == 3 and all(t > 0 for t in v), k
    np.testing.assert_allclose(rep.samples_s, np.sum([rep.stages_s[k] for k in rep.stages_s], axis=0))


def test_leak_test_and_vram_stages_report_on_cpu(session):
    leak = session.leak_test(n=3, budget_bytes=50 * 2**20, warmup=0)
    assert leak.metric == "rss" and len(leak.values) == 3
    assert leak.growth_bytes == leak.values[-1] - leak.values[0]
    assert leak.verdict == ("leak" if leak.growth_bytes > leak.budget_bytes else "pass")
    prof = InferenceSession("tiny", "cpu", steps=1, size=SIZE, max_sequence_length=T5_MAX).vram_stages(
        {"peak": 1, "cleanup_leftover": 2**40})
    assert list(prof.stages) == ["baseline", "loaded", "peak", "after_cleanup"]
    assert prof.value("peak") >= prof.value("loaded") > 0
    # A 1-byte peak budget must fail; a 1 TiB leftover budget must pass.
    assert [c["ok"] for c in prof.checks] == [False, True] and prof.verdict == "fail"


# --- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(quantize="nf4"), "needs a CUDA device"),
    (dict(quantize="fp8"), "quantize must be one of"),
    (dict(size=40), "multiple of 16"),
    (dict(steps=0), "steps must be"),
    (dict(max_sequence_length=1024), "max_sequence_length"),
])
def test_bad_options_are_refused_up_front(kw, match):
    with pytest.raises(ValueError, match=match):
        InferenceSession("tiny", "cpu", **kw)


# --- helpers the benchmark relies on ---------------------------------------------------------------
def test_shared_copy_shares_weights_and_refuses_a_source_missing_tensors():
    from fluxlab.inference import shared_copy
    from fluxlab.models import build_transformer

    tr = build_transformer("tiny", "cpu", torch.float32)
    twin = shared_copy(tr)
    assert twin is not tr
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(tr.parameters(), twin.parameters()))
    with torch.no_grad():
        twin.fuse_qkv_projections()  # extra to_qkv tensors in the source are fine for a stock twin
    assert sum(p.numel() for p in shared_copy(twin).parameters()) == sum(p.numel() for p in tr.parameters())
    del tr.transformer_blocks[0].attn.to_q  # a source without a stock tensor is refused
    with pytest.raises(ValueError, match="lacks"):
        shared_copy(tr)


def test_compile_blocks_compiles_every_block_even_after_a_class_swapping_patch():
    from fluxlab import kernels
    from fluxlab.inference import kernels_available
    from fluxlab.models import compile_blocks
    from fluxlab.models import build_transformer

    if not kernels_available():
        pytest.skip("fluxlab.kernels.patch is not on this checkout")
    tr = build_transformer("tiny", "cpu", torch.float32)
    kernels.patch(tr)
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    assert compile_blocks(tr, backend="eager") == len(blocks) == 4
    assert all(b._compiled_call_impl is not None for b in blocks)
