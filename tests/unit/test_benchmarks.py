"""The benchmarks in benchmarks/ on the CPU: their command lines, the parts that run here (the caches
benchmark, the kernel benchmark's timed loop under TRITON_INTERPRET), and the records they build from
a variant's results. A speed record is judged with the evidence checked in its timed loop: the fast
path seen gives a timing verdict, a path not seen gives did-not-run, no check gives unverified."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxlab import bench, store

ROOT = Path(__file__).resolve().parents[2]
CUDNN_FWD = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0"
FLASH_FWD = ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
             "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, "
             "false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)")
# inductor names fused elementwise kernels after the ops they absorb: not proof that cuDNN ran.
INDUCTOR_CUDNN = "triton_poi_fused__scaled_dot_product_cudnn_attention_backward_add_cat_transpose_view_7"
COMPILED = "Torch-Compiled Region: 0/0"


def _timings(median: float, n: int = 12, seed: int = 0) -> list[float]:
    return (median * (1 + 0.01 * np.random.default_rng(seed).standard_normal(n))).tolist()


@pytest.mark.parametrize("module", ["train", "infer"])
def test_help_runs_on_the_cpu_as_a_module(module):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout and "--preset" in out.stdout


def test_kernels_help_runs_on_the_cpu(capsys):
    from benchmarks import kernels

    with pytest.raises(SystemExit) as exit_:
        kernels.main(["--help"])
    assert exit_.value.code == 0
    assert "--repeats" in capsys.readouterr().out


# --- train: the parent turns each variant's result (and its evidence) into records ----------------
def _variant(name: str, samples: list[float], evidence: dict | None) -> dict:
    res = {"variant": name, "samples_ms": samples, "median_ms": float(np.median(samples)), "peak_gib": 40.0,
           "losses": [0.5] * 16, "warmup_s": [30.0], "profile_ms": {"attention": 90.0, "gemm": 170.0, "other": 50.0}}
    return res if evidence is None else {**res, "evidence": evidence}


def _train_evidence(name: str, *, names, deltas=None, calls: int = 12) -> dict:
    from benchmarks import train

    compiled = bool(train.FLUXLAB.get(name, {}).get("compile")) or (name in train.STOCK and train.STOCK[name][1])
    expect = train.variant_expect(name, compiled=compiled, n_attention=57)
    return bench.Evidence.check(expect, deltas=deltas or {}, calls=calls, names=names, profiled=True).to_dict()


def test_train_records_judge_each_variant_with_its_timed_loop_evidence(tmp_path):
    from benchmarks import train

    eager_counts = {"attention.cudnn": 57 * 12}
    results = {
        "stock_eager": _variant("stock_eager", _timings(546), _train_evidence("stock_eager", names=[FLASH_FWD])),
        # cuDNN kernels seen in the profiled window of the timed loop
        "fluxlab_fast": _variant("fluxlab_fast", _timings(343, seed=1),
                                 _train_evidence("fluxlab_fast", names=[CUDNN_FWD, INDUCTOR_CUDNN, COMPILED])),
        # only inductor's kernel named after the cuDNN op: the anchored pattern does not take it
        "fluxlab_lean": _variant("fluxlab_lean", _timings(343, seed=2),
                                 _train_evidence("fluxlab_lean", names=[INDUCTOR_CUDNN, COMPILED])),
        # eager: the kernel ran, but some attention calls fell back to flash (a counter that must stay still)
        "fluxlab_eager": _variant("fluxlab_eager", _timings(343, seed=3), _train_evidence(
            "fluxlab_eager", names=[CUDNN_FWD], deltas={**eager_counts, "attention.flash": 12})),
        # a result without an evidence check (as older children wrote)
        "fluxlab_qlora_nf4": _variant("fluxlab_qlora_nf4", _timings(343, seed=4), None),
        "fluxlab_kernels": {"variant": "fluxlab_kernels", "error": "CUDA error: an illegal memory access", "rc": 1},
    }
    recs = {r["benchmark"]: r for r in train.write_records(results, flops=3e14, ceil={"tflops": 800.0, "tbps": 4.5},
                                                            params={"preset": "flux1-dev"}, db=tmp_path / "b.db")}
    fast = recs["train_step/fluxlab_fast/vs_stock_eager"]
    assert fast["verdict"] == "faster" and fast["ratio"] > 1.5
    assert fast["metrics"]["evidence"]["ran"] is True and CUDNN_FWD in fast["metrics"]["evidence"]["kernel_names"]
    assert fast["metrics"]["baseline_evidence"]["ran"] is True
    lean = recs["train_step/fluxlab_lean/vs_stock_eager"]
    assert lean["verdict"] == "did-not-run" and "no profiled event fully matches" in lean["metrics"]["reason"]
    assert lean["metrics"]["timing_verdict"] == "faster"
    eager = recs["train_step/fluxlab_eager/vs_stock_eager"]
    assert eager["verdict"] == "did-not-run" and "attention.flash moved 12x" in eager["metrics"]["reason"]
    assert recs["train_step/fluxlab_qlora_nf4/vs_stock_eager"]["verdict"] == "unverified"
    assert recs["train_step/fluxlab_kernels"]["verdict"] == "error"
    assert recs["train_step/stock_eager"]["ratio"] is None  # no other stock baseline ran
    # what the store holds is what was returned, provenance included
    stored = {r["benchmark"]: r for r in store.query(tmp_path / "b.db")}
    assert stored.keys() == recs.keys() and stored["train_step/fluxlab_fast/vs_stock_eager"]["git_commit"]


def test_train_variant_child_runs_on_the_cpu_and_its_result_feeds_the_records(home, tmp_path):
    """The child's code path on the tiny preset: one timed step through bench.run, its evidence, the
    split profile. On the CPU cuDNN cannot run, so the evidence must say so, and the record too."""
    import argparse

    from benchmarks import train

    ap = argparse.ArgumentParser()
    train.add_step_args(ap)
    a = ap.parse_args(["--preset", "tiny", "--res", "64", "--steps", "2", "--warmup", "0", "--device", "cpu"])
    res = json.loads(json.dumps(train.run_variant("fluxlab_eager", a)))  # what the parent reads back
    assert len(res["samples_ms"]) == 2 and len(res["losses"]) == 2 + 3  # timed + profiled evidence + split
    ev = res["evidence"]
    assert ev["checked"] == "timed-loop" and ev["calls"] == 2 and not ev["ran"]
    assert "attention.cudnn moved 0x" in ev["reason"] and "cudnn needs a CUDA device" in ev["reason"]
    stock = _variant("stock_eager", _timings(2 * res["median_ms"]), _train_evidence("stock_eager", names=[FLASH_FWD]))
    recs = train.write_records({"stock_eager": stock, "fluxlab_eager": res}, flops=1e9, ceil=None,
                               params={"preset": "tiny"}, db=tmp_path / "t.db")
    assert {r["benchmark"]: r["verdict"] for r in recs}["train_step/fluxlab_eager/vs_stock_eager"] == "did-not-run"


def test_train_expectations_name_the_claimed_backend_and_patched_families():
    from benchmarks import train

    stock = train.variant_expect("stock_compile", compiled=True, n_attention=57)
    assert any(__import__("re").fullmatch(p, FLASH_FWD) for p in stock.kernels)
    assert any(__import__("re").fullmatch(p, CUDNN_FWD) for p in stock.forbid)
    kern = train.variant_expect("fluxlab_kernels", compiled=False, n_attention=57,
                                patched={"qk_norm_rope": 57, "adaln": 95, "rope": 0})
    assert kern.counters == {"attention.cudnn": 57, "qk_norm_rope.fwd": 57, "qk_norm_rope.bwd": 57,
                             "adaln.fwd": 95, "adaln.bwd": 95}
    assert bench.family_pattern("qk_norm_rope") in kern.kernels and bench.family_pattern("rope") not in kern.kernels
    # compiled code does not bump fluxlab.attention's counters: only kernels are required then
    assert train.variant_expect("fluxlab_fast", compiled=True, n_attention=57).counters == {}


# --- kernels: the timed loop under TRITON_INTERPRET, tiny shapes ---------------------------------
def _tiny_rope():
    from benchmarks import kernels

    return kernels.case_rope(32, kernels.Dims(H=2, D=32, C=32, S_TXT=4, dtype=torch.float32, device="cpu"))


def test_kernels_timed_loop_sees_the_family_or_reads_did_not_run(tmp_path, monkeypatch):
    from benchmarks import kernels

    case = _tiny_rope()
    recs = kernels.run_case(case, None, repeats=3, block_ms=0.05, device="cpu", meta={}, compile_backend="eager")
    fl = {r["pass"]: r for r in recs if r["impl"] == "fluxlab"}
    calls = 3 * fl["fwd+bwd"]["timing"]["calls_per_sample"]
    assert fl["fwd"]["evidence"]["ran"] and fl["fwd+bwd"]["evidence"]["ran"]
    assert fl["fwd+bwd"]["evidence"]["counters"]["rope.bwd"] >= calls
    assert all(r["evidence"] is None for r in recs if r["impl"] != "fluxlab")
    # The same benchmark with the fast path switched off: the timing still exists, the claim does not.
    monkeypatch.setenv("FLUXLAB_DISABLE", "rope")
    planted = kernels.run_case(case, None, repeats=3, block_ms=0.05, device="cpu", meta={}, compile_backend="eager")
    stored = {r["benchmark"]: r for r in kernels.export(planted, tmp_path)}
    off = stored["kernels.rope.fwd.fluxlab"]
    assert off["verdict"] == "did-not-run"
    assert "counter rope moved 0x" in off["metrics"]["reason"] and "FLUXLAB_DISABLE" in off["metrics"]["reason"]
    assert stored["kernels.rope.fwd.compiled"]["verdict"] is None  # the baseline itself
    assert (tmp_path / "records.jsonl").read_text().count("\n") == len(planted)


def test_kernels_another_familys_kernel_does_not_count():
    from benchmarks import kernels

    ex = kernels.family_expect({"name": "adaln.gated"}, backward=False, cuda=True)
    other = bench.Evidence.check(ex, deltas={"adaln": 10}, calls=10, names=["_fl_rope_kernel"], profiled=True)
    own = bench.Evidence.check(ex, deltas={"adaln": 10}, calls=10, names=["_fl_adaln_fwd_kernel"], profiled=True)
    assert not other.ran and own.ran


# --- caches: the whole benchmark on the tiny preset ---------------------------------------------
def test_caches_benchmark_records_hit_and_miss_evidence(home, tmp_path):
    from benchmarks import caches

    out = tmp_path / "caches.jsonl"
    assert caches.main(["--out", str(out), "--repeats", "2", "--warmup", "0", "--batch", "1", "--max-seq", "8"]) == 0
    recs = {r["benchmark"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"caches/cold", "caches/warm", "caches/warm_disk", "caches/encode/vae", "caches/encode/t5",
                         "caches/encode/clip"}
    cold, warm, disk = recs["caches/cold"], recs["caches/warm"], recs["caches/warm_disk"]
    for r in (cold, warm, disk):
        m = r["metrics"]
        assert r["git_commit"] and m["cold_ms"] == cold["metrics"]["median_ms"]
        assert m["warm_ms"] == warm["metrics"]["median_ms"]
        # The preparation is part of the step: a fraction of it, measured per timed call.
        assert len(m["data_ms_samples"]) == 2 and 0 < m["data_overhead_fraction"] < 1
    assert warm["verdict"] in bench.VERDICTS and warm["samples"]["baseline"] == cold["samples"]["candidate"]
    ev = {n: r["metrics"]["evidence"] for n, r in (("cold", cold), ("warm", warm), ("warm_disk", disk))}
    assert ev["warm"]["ran"] and ev["warm"]["counters"]["latent.hits"] == 2 and ev["warm"]["counters"]["latent.misses"] == 0
    assert ev["cold"]["ran"] and ev["cold"]["counters"]["latent.misses"] == 2
    assert ev["warm_disk"]["counters"]["text.hits"] == 2 and ev["warm_disk"]["counters"]["text.misses"] == 0
    # Cold pays the encoders, so its preparation is the larger share of its step.
    assert cold["metrics"]["data_overhead_fraction"] > warm["metrics"]["data_overhead_fraction"]
    assert all(recs[f"caches/encode/{k}"]["metrics"]["median_ms"] > 0 for k in ("vae", "t5", "clip"))


def test_caches_bad_size_is_one_line_and_writes_nothing(tmp_path, capsys):
    from benchmarks import caches

    out = tmp_path / "caches.jsonl"
    assert caches.main(["--out", str(out), "--res", "40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--res" in err[0] and not out.exists()


# --- infer: records from a part's raw results ----------------------------------------------------
def _infer_args() -> dict:
    return {"preset": "flux1-schnell", "res": 1024, "dtype": "auto", "device": "cuda", "repeats": 12,
            "text_len": 512, "compile_backend": "inductor", "steps": 4, "guidance": 0.0, "gen_text_len": 256,
            "gens": 12, "leak_n": 10}


def test_infer_forward_records_carry_the_timed_loop_evidence(tmp_path):
    from benchmarks import infer

    def ev(name, names):
        return bench.Evidence.check(infer.forward_expect(name, cuda=True), deltas={}, calls=12, names=names,
                                    profiled=True).to_dict()

    err = {"max_abs": 0.01, "rel_l2": 0.001, "finite": True}
    common = {"first_call_s": 1.0, "error_vs_ref": err, "diff_vs_stock-eager": err, "fused_attn": 0,
              "compiled_blocks": 57, "kernels": None}
    data = {"tokens": {"image": 4096, "text": 512}, "variants": {
        "stock-eager": {**common, "samples_ms": _timings(180), "evidence": ev("stock-eager", [CUDNN_FWD])},
        "stock-compile": {**common, "samples_ms": _timings(136, seed=1), "evidence": ev("stock-compile", [CUDNN_FWD, COMPILED])},
        "fluxlab": {**common, "samples_ms": _timings(120, seed=2), "evidence": ev("fluxlab", [CUDNN_FWD, COMPILED])},
        # CUDA graphs replayed flash kernels: the claimed cuDNN path did not run
        "fluxlab-cg": {**common, "samples_ms": _timings(110, seed=3), "evidence": ev("fluxlab-cg", [FLASH_FWD, COMPILED])},
    }}
    recs, _ = infer.records_for("forward", data, _infer_args(), tmp_path / "i.db")
    by = {r["benchmark"]: r for r in recs}
    assert by["inference/forward/fluxlab"]["verdict"] == "faster"
    assert by["inference/forward/fluxlab"]["metrics"]["evidence"]["ran"] is True
    assert by["inference/forward/fluxlab"]["metrics"]["vs_stock_compile"]["verdict"] == "faster"
    cg = by["inference/forward/fluxlab-cg"]
    assert cg["verdict"] == "did-not-run" and "forbidden" in cg["metrics"]["reason"]
    assert all(r["metrics"]["evidence"] is not None for r in recs)


def test_infer_cpu_forward_expectation_cannot_pass_for_cudnn():
    from benchmarks import infer

    ex = infer.forward_expect("fluxlab", cuda=False)
    seen = bench.Evidence.check(ex, deltas={}, calls=4, names=[COMPILED, "aten::_scaled_dot_product_attention_math"],
                                profiled=True)
    assert not seen.ran and infer.forward_expect("stock-eager", cuda=False) is None


def _generate_data(leak_values: list[int]) -> dict:
    from fluxlab.inference import LeakReport, report_dict, summarize_latency

    def lat(median, seed):
        return report_dict(summarize_latency([x / 1e3 for x in _timings(median, seed=seed)]))

    ran = bench.Evidence.check(bench.Expect(kernels=(infer_compiled(),)), deltas={}, calls=12, names=[COMPILED],
                               profiled=True).to_dict()
    leak = LeakReport(metric="allocated", values=leak_values, growth_bytes=leak_values[-1] - leak_values[0],
                      budget_bytes=50 * 2**20, verdict="leak" if leak_values[-1] - leak_values[0] > 50 * 2**20 else "pass")
    return {"latency": {"stock": lat(786, 0), "stock-compile": lat(640, 1), "fluxlab": lat(631, 2)},
            "evidence": {"stock-compile": ran, "fluxlab": ran},
            "vram": {"stages": {"loaded": {"value": 2**34}}}, "vram_checks_ok": True, "leak": report_dict(leak),
            "determinism": {"message": "bit-identical"}, "determinism_ok": True,
            "image_max_abs_diff_vs_stock": 0.01, "session": {}, "kernels": None, "compiled_blocks": 57}


def infer_compiled() -> str:
    from benchmarks import infer

    return infer.COMPILED_REGION


def test_infer_generate_is_judged_against_stock_compile_and_leaks_by_the_slope_rule(tmp_path):
    from benchmarks import infer

    MiB = 2**20
    # one late reading 60 MiB up: last-minus-first says leak, the slope's CI does not
    recs, _ = infer.records_for("generate", _generate_data([0, 0, 0, 0, 0, 0, 0, 0, 0, 60 * MiB]), _infer_args(),
                                tmp_path / "a.db")
    by = {r["benchmark"]: r for r in recs}
    assert by["inference/generate"]["verdict"] == "faster"
    vs_compile = by["inference/generate/vs_stock_compile"]
    assert vs_compile["params"]["baseline"] == "stock-compile" and vs_compile["metrics"]["evidence"]["ran"]
    assert 0.95 < vs_compile["ratio"] < 1.1
    assert by["inference/leak"]["verdict"] == "pass" and by["inference/leak"]["metrics"]["growth_verdict"] == "leak"
    # steady growth of 10 MiB per generation: 100 MiB over 10 against a 50 MiB budget
    recs, _ = infer.records_for("generate", _generate_data([i * 10 * MiB for i in range(10)]), _infer_args(),
                                tmp_path / "b.db")
    assert {r["benchmark"]: r for r in recs}["inference/leak"]["verdict"] == "leak"


# --- ddp: the weak-scaling record is judged with the N-GPU run's evidence ------------------------
def test_ddp_record_needs_the_all_reduce_seen_and_keeps_protected_fields(tmp_path):
    import dataclasses

    from benchmarks import ddp, train

    expect = train.variant_expect("fluxlab_eager", compiled=False, n_attention=57)
    expect = dataclasses.replace(expect, kernels=(*expect.kernels, *ddp.DDP_PATTERNS))
    device = {"device": "cuda", "device_name": "NVIDIA H200", "cuda": "13.0"}

    def run(names, seed):
        ev = bench.Evidence.check(expect, deltas={"attention.cudnn": 57 * 12}, calls=12, names=names, profiled=True)
        return {"samples_ms": _timings(700, seed=seed), "evidence": ev.to_dict(), "device": device}

    single = run([CUDNN_FWD], 0)
    ok = ddp.write_record(single, run([CUDNN_FWD, "DistributedDataParallel.forward", "nccl:all_reduce"], 1), 2,
                          {"gpus": 2}, tmp_path / "d.db")
    assert ok["metrics"]["evidence"]["ran"] and ok["device_name"] == "NVIDIA H200" and ok["git_commit"]
    assert ok["verdict"] in ("no-difference", "inconclusive", "faster", "slower")
    assert ok["metrics"]["scaling"] == pytest.approx(2 * ok["ratio"])
    # the step ran but nothing was all-reduced: not a DDP measurement
    alone = ddp.write_record(single, run([CUDNN_FWD, "DistributedDataParallel.forward"], 2), 2, {"gpus": 2},
                             tmp_path / "d.db")
    assert alone["verdict"] == "did-not-run" and "nccl" in alone["metrics"]["reason"]


# --- pipeline: the user's train command end to end, interrupted and resumed; buckets -------------
def test_pipeline_benchmark_resumes_bitwise_and_times_every_bucket(home, tmp_path):
    """On the tiny preset (CPU): run B is really interrupted by SIGTERM, resumed where it stopped,
    and its loss curve equals the uninterrupted run's; the bucket part trains over three aspect
    buckets and times each with its own position-id hits as evidence."""
    from benchmarks import pipeline

    out = tmp_path / "out"
    assert pipeline.main(["--model", "tiny", "--res", "256", "--steps", "24", "--interrupt-at", "5", "--device", "cpu",
                          "--images", "9", "--bucket-steps", "6", "--repeats", "3", "--out", str(out)]) == 0
    recs = {r["benchmark"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    res = recs["pipeline/resume"]["metrics"]
    assert recs["pipeline/resume"]["verdict"] == "pass", res
    assert res["rc"] == {"A": 0, "B": 143, "C": 0}
    assert 5 <= res["stopped_at"] < 24 and res["resumed_from"] == res["stopped_at"]
    assert res["deterministic"] and res["max_abs_diff_after"] == 0.0
    assert len(res["losses_resumed"]) == 24 and res["losses_resumed"] == res["losses_uninterrupted"]
    train = recs["pipeline/train"]["metrics"]
    assert 0 < train["data_wait_ms"] < train["step_ms"] and 0 < train["data_overhead_fraction"] < 1
    assert train["cache_stats_cold"]["text"]["misses"] > 0 and train["cache_stats_warm"]["text"]["misses"] == 0
    b = recs["pipeline/buckets"]["metrics"]
    assert b["buckets"] == ["192x320", "256x256", "320x192"]
    assert sum(b["steps_per_bucket"].values()) == 6
    # The run's own look-ups (one per step), apart from the timed steps that came after it.
    assert {k: v["hits"] + v["misses"] for k, v in b["position_by_bucket"].items()} == \
        {k: n for k, n in b["steps_per_bucket"].items() if n}
    for bucket in b["buckets"]:
        r = recs[f"pipeline/buckets/{bucket}"]
        ev = r["metrics"]["evidence"]
        assert ev["ran"] and ev["counters"]["position.hits"] >= 3, ev
        assert r["metrics"]["position_after_timing"]["misses"] == 1   # computed once per bucket, then hit
