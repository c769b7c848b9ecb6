"""A kernel change is not finished until the GPU suite has passed on it.

`make test-gpu` (benchmarks/gpu_tests.py) writes a store record `tests/gpu` with the commit it ran on; its
records.jsonl is committed under benchmarks/results/. The test below fails when a file under
fluxlab/kernels/ or fluxlab/attention.py differs between that commit (of the newest passing record) and
HEAD, so a kernel change without a GPU run shows in CI (which clones the full history).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WATCHED = ("fluxlab/kernels", "fluxlab/attention.py")
HOW = "run `make test-gpu` on a GPU machine and commit its records.jsonl under benchmarks/results/"


def gpu_records(results: Path) -> list[dict]:
    """Every `tests/gpu` record in results/*.jsonl."""
    out = []
    for path in sorted(results.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip() and '"tests/gpu"' in line:
                rec = json.loads(line)
                if rec.get("benchmark") == "tests/gpu":
                    out.append(rec)
    return out


def newest_passing(records: list[dict]) -> dict | None:
    """The newest record of a passing run on a clean commit (nothing failed, nothing uncommitted)."""
    ok = [r for r in records if r.get("verdict") == "pass" and r.get("git_commit") and r.get("git_dirty") is False
          and (r.get("metrics") or {}).get("failed") == 0 and (r.get("metrics") or {}).get("errors", 0) == 0]
    return max(ok, key=lambda r: r["utc"], default=None)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)


def watched_changes(root: Path, commit: str) -> list[str]:
    """Files under WATCHED that differ between `commit` and HEAD. Fails (never passes) when git or the
    commit is not there to ask, e.g. in a shallow clone."""
    try:
        head = _git(root, "rev-parse", "HEAD")
    except OSError as e:
        pytest.fail(f"git is not available ({e}), so kernel changes since the last GPU run cannot be checked")
    if head.returncode != 0:
        pytest.fail(f"{root} is not a git checkout ({head.stderr.strip()}): cannot tell what changed since the "
                    "last GPU run")
    if _git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        pytest.fail(f"commit {commit[:12]} of the last passing GPU run is not in this clone (a shallow clone? "
                    "fetch the full history: git fetch --unshallow)")
    diff = _git(root, "diff", "--name-only", commit, "HEAD", "--", *WATCHED)
    assert diff.returncode == 0, diff.stderr
    return diff.stdout.split()


def test_kernels_unchanged_since_the_last_passing_gpu_run():
    records = gpu_records(ROOT / "benchmarks" / "results")
    if not records:
        pytest.skip(f"no tests/gpu record in benchmarks/results/ yet: {HOW}")
    last = newest_passing(records)
    assert last is not None, f"no passing tests/gpu record on a clean commit in benchmarks/results/: {HOW}"
    changed = watched_changes(ROOT, last["git_commit"])
    assert not changed, (f"{', '.join(changed)} changed after commit {last['git_commit'][:12]}, the last passing "
                         f"GPU run ({last['utc']}, {last.get('device_name')}): {HOW}")


def _commit(repo: Path, msg: str) -> str:
    for args in (("add", "-A"), ("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", msg)):
        assert _git(repo, *args).returncode == 0
    return _git(repo, "rev-parse", "HEAD").stdout.strip()


def test_the_check_flags_a_kernel_change_after_the_recorded_commit(tmp_path):
    """The check itself, on a scratch repository: a later commit that touches a kernel is named, one that
    touches only other files is not, and a record of an unknown commit fails rather than passes."""
    if _git(tmp_path, "init", "-q").returncode != 0:
        pytest.skip("git is not available here")
    (tmp_path / "fluxlab" / "kernels").mkdir(parents=True)
    (tmp_path / "fluxlab" / "kernels" / "rope.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("a\n")
    tested = _commit(tmp_path, "kernels as tested on the GPU")
    rec = {"benchmark": "tests/gpu", "verdict": "pass", "git_commit": tested, "git_dirty": False,
           "utc": "2026-01-01T00:00:00Z", "metrics": {"passed": 3, "failed": 0, "skipped": 0}}
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "tests_gpu.jsonl").write_text(json.dumps(rec) + "\n")
    assert newest_passing(gpu_records(results))["git_commit"] == tested

    (tmp_path / "README.md").write_text("b\n")
    _commit(tmp_path, "docs only")
    assert watched_changes(tmp_path, tested) == []
    (tmp_path / "fluxlab" / "kernels" / "rope.py").write_text("x = 2\n")
    _commit(tmp_path, "a kernel change")
    assert watched_changes(tmp_path, tested) == ["fluxlab/kernels/rope.py"]

    failing = {**rec, "verdict": "fail", "utc": "2026-01-02T00:00:00Z", "metrics": {"failed": 1}}
    dirty = {**rec, "git_dirty": True, "utc": "2026-01-03T00:00:00Z"}
    assert newest_passing([rec, failing, dirty])["utc"] == rec["utc"]
    assert newest_passing([failing, dirty]) is None
    with pytest.raises(pytest.fail.Exception, match="not in this clone"):
        watched_changes(tmp_path, "0" * 40)
