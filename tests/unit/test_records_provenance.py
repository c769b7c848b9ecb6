"""Records are evidence: committed ones never change, new ones say exactly what code made them,
and a speed verdict without an evidence check cannot be stored as faster/slower."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fluxlab import store

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
# From this commit on, benchmarks/results/ is append-only (an earlier rewrite predates the rule).
APPEND_ONLY_SINCE = "18a39ee"


def _git(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"git {' '.join(args)} failed ({out.stderr.strip()}): this test needs the full history "
                    f"of the checkout (not a shallow clone)")
    return out.stdout


def test_committed_records_are_append_only():
    _git("cat-file", "-e", f"{APPEND_ONLY_SINCE}^{{commit}}")
    commits = [APPEND_ONLY_SINCE] + _git("rev-list", "--reverse", f"{APPEND_ONLY_SINCE}..HEAD", "--", RESULTS).split()
    versions: dict[str, list[str]] = {}
    for commit in commits:
        for path in _git("ls-tree", "--name-only", f"{commit}:{RESULTS}").split():
            lines = _git("show", f"{commit}:{RESULTS}/{path}").splitlines()
            old = versions.get(path)
            assert old is None or lines[:len(old)] == old, \
                f"{RESULTS}/{path} was edited in {commit[:8]}: records are append-only (add a superseding record)"
            versions[path] = lines
        gone = set(versions) - set(_git("ls-tree", "--name-only", f"{commit}:{RESULTS}").split())
        assert not gone, f"{sorted(gone)} deleted in {commit[:8]}"
    # The working tree too: an edit not yet committed fails here before it can land.
    for path, old in versions.items():
        now = (ROOT / RESULTS / path).read_text().splitlines()
        assert now[:len(old)] == old, f"{RESULTS}/{path} differs from its committed lines"


def _records_since_rule() -> list[dict]:
    old = {line for path in _git("ls-tree", "--name-only", f"{APPEND_ONLY_SINCE}:{RESULTS}").split()
           for line in _git("show", f"{APPEND_ONLY_SINCE}:{RESULTS}/{path}").splitlines()}
    return [json.loads(line) for f in sorted((ROOT / RESULTS).glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip() and line not in old]


def test_new_records_come_from_a_clean_or_hashed_tree_and_supersede_real_ids():
    all_ids = {json.loads(line)["id"] for f in (ROOT / RESULTS).glob("*.jsonl")
               for line in f.read_text().splitlines() if line.strip()}
    for rec in _records_since_rule():
        where = f"record {rec['id'][:8]} ({rec['benchmark']})"
        assert rec.get("git_commit"), f"{where} has no git commit"
        assert rec.get("git_dirty") is False or rec.get("git_diff_sha256"), f"{where}: dirty tree without a diff hash"
        assert rec.get("supersedes") in (None, *all_ids), f"{where} supersedes an unknown id"
        assert rec.get("verdict") not in store.SPEED_VERDICTS or (rec["metrics"].get("evidence") or {}).get("ran")


def test_speed_verdict_without_evidence_is_stored_unverified(tmp_path):
    db = tmp_path / "r.db"
    bare = store.record("x/speed", verdict="faster", ratio=1.5, store=db, display=False)
    assert bare["verdict"] == "unverified" and bare["metrics"]["timing_verdict"] == "faster"
    ok = store.record("x/speed", verdict="faster", ratio=1.5, store=db, display=False,
                      metrics={"evidence": {"ran": True, "reason": "rope +20"}})
    assert ok["verdict"] == "faster"
    assert store.record("x/equal", verdict="no-difference", store=db, display=False)["verdict"] == "no-difference"


@pytest.mark.parametrize("field", store.PROTECTED)
def test_overrides_cannot_touch_identity_time_verdict_or_git(tmp_path, field):
    with pytest.raises(ValueError, match=field):
        store.record("x", store=tmp_path / "r.db", display=False, provenance_overrides={field: "forged"})
    rec = store.record("x", store=tmp_path / "r.db", display=False, provenance_overrides={"host": "gpu-box"})
    assert rec["host"] == "gpu-box"


def test_dirty_tree_records_carry_a_hash_of_the_diff(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        _git(*args, cwd=repo)
    (repo / "a.py").write_text("x = 1\n")
    _git("add", "a.py", cwd=repo)
    _git("commit", "-qm", "one", cwd=repo)
    monkeypatch.setattr(store, "_CHECKOUT", repo)
    clean = store.provenance()
    assert clean["git_dirty"] is False and clean["git_diff_sha256"] is None
    (repo / "a.py").write_text("x = 2\n")
    first = store.provenance()["git_diff_sha256"]
    (repo / "a.py").write_text("x = 3\n")
    second = store.provenance()["git_diff_sha256"]
    (repo / "new.py").write_text("y = 1\n")
    third = store.provenance()["git_diff_sha256"]
    assert len({first, second, third}) == 3 and all(len(h) == 64 for h in (first, second, third))


def test_a_stated_commit_wins_over_a_stale_git_folder(tmp_path, monkeypatch):
    # A tree copied to a GPU machine may carry an old .git: the commit the caller states is the truth.
    monkeypatch.setenv("FLUXLAB_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("FLUXLAB_GIT_DIRTY", "0")
    p = store.provenance()
    assert p["git_commit"] == "0123abc" and p["git_dirty"] is False and p["git_diff_sha256"] is None
    monkeypatch.setenv("FLUXLAB_GIT_DIRTY", "1")
    monkeypatch.setenv("FLUXLAB_GIT_DIFF_HASH", "f" * 64)
    p = store.provenance()
    assert p["git_dirty"] is True and p["git_diff_sha256"] == "f" * 64
